"""A small golden run: three short runs whose metrics are stored in `golden_run.json`, so that a refactoring of
the loop (or of anything under it) that changes what a run computes is caught, not only one that breaks it.

The runs: PPO with a separate critic, GAE and the adaptive KL controller; DAPO with refill rounds (dynamic
sampling drops uniform groups and samples more); GRPO with its KL in the loss. Each is 3 steps on a tiny Llama
(hidden 32, 2 layers) whose weights are written here from a seeded uniform draw, so the golden figures do not
depend on how a transformers release initialises a model.

Tolerance, from the arithmetic: the same code gives bit-identical metrics on one machine
(`test_same_seed_same_metrics_bit_for_bit`), but another CPU runs other kernels (AVX2 against AVX-512/AMX,
other blockings) and sums in another order. A float32 reduction of K terms in another order moves its result
by at most about K·u relative (u = 2^-24); the longest reductions of these runs are the loss means over at
most 32 sequences x 4 tokens x 2 epochs (K <= 256) and the model's dot products (K <= 128), and three steps
of updates compound them: 3 x 256 x 6e-8 = 4.6e-5, so `RTOL` = 5e-4 leaves a factor of 10. Metrics that are
0 in exact arithmetic (the mean of whitened advantages, the first step's KL, the sampler/trainer mismatch)
are sums of up to 256 unit-scale terms: `ATOL` = 2e-5 > 256 x 2^-24 = 1.5e-5. A changed sampled token (the
inverse-CDF sampler's uniform landing within ~1e-7 of a boundary: ~1e-4 over all of these runs' tokens) would
fail the test; a behaviour change moves rewards, lengths or losses by far more than these bounds.

Regenerate after a deliberate change of behaviour, and say why in the commit:

    .venv/bin/python tests/train/test_golden_run.py
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
GOLDEN = HERE / "golden_run.json"
STEPS = 3
RTOL, ATOL = 5e-4, 2e-5

RUNS = {
    "ppo_critic_gae_adaptive_kl": {"algorithm.name": "ppo"},
    "dapo_refill": {"algorithm.name": "dapo", "algorithm.max_filter_rounds": 3},
    "grpo_kl_in_loss": {"algorithm.name": "grpo"},
}
# Timings and throughput vary by machine; the weight norms are kept (they are deterministic functions of the
# update).
SKIP_PREFIXES = ("time/", "throughput/")


def golden_model(root: Path) -> str:
    """The tiny Llama of the training tests with its weights redrawn: uniform(-a, a) per tensor from one seeded
    generator, a = 1/sqrt(fan_in) for matrices (the usual scale), norms at 1."""
    from transformers import AutoModelForCausalLM

    from tether.tasks.tiny_model import build_tiny_model

    path = build_tiny_model(root, hidden_size=32, num_layers=2, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                a = p.shape[-1] ** -0.5
                p.copy_(torch.rand(p.shape, generator=gen) * (2 * a) - a)
    model.save_pretrained(path)
    return str(path)


def run_metrics(model_path: str, overrides: dict) -> list[dict[str, float]]:
    from helpers import PROMPTS, digit_fraction

    from tether.config import resolve_config
    from tether.rewards.functions import RewardScorer
    from tether.train.loop import Trainer

    raw = {"model": {"path": model_path}, "steps": STEPS, "seed": 0,
           "rollout": {"max_new_tokens": 4, "prompts_per_step": 8, "group_size": 4},
           "optim": {"lr": 3e-3, "critic_lr": 1e-3}}
    cfg = resolve_config(raw, [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(cfg, rows=PROMPTS, reward_fn=RewardScorer([(digit_fraction, 1.0)]))
    return [{k: v for k, v in trainer.step().metrics.items() if not k.startswith(SKIP_PREFIXES)}
            for _ in range(STEPS)]


def all_runs(root: Path) -> dict[str, list[dict[str, float]]]:
    torch.set_num_threads(1)
    path = golden_model(root)
    return {name: run_metrics(path, over) for name, over in RUNS.items()}


def differences(expected: dict, got: dict) -> list[str]:
    """Every metric outside |got - expected| <= ATOL + RTOL |expected|, and every key present on one side only."""
    out = []
    for run, steps in expected.items():
        for i, (want, have) in enumerate(zip(steps, got[run], strict=True)):
            for key in sorted(set(want) | set(have)):
                if key not in want or key not in have:
                    out.append(f"{run} step {i + 1}: {key} only in {'the golden run' if key in want else 'this run'}")
                    continue
                a, b = have[key], want[key]
                same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= ATOL + RTOL * abs(b)
                if not same:
                    out.append(f"{run} step {i + 1}: {key} = {a!r}, golden {b!r}")
    return out


def test_the_golden_run_reproduces(tmp_path):
    script = Path(__file__).relative_to(HERE.parents[1])
    assert GOLDEN.exists(), f"{GOLDEN} is missing: regenerate it with `python {script}`"
    expected = json.loads(GOLDEN.read_text())
    assert set(expected) == set(RUNS)
    got = all_runs(tmp_path)
    diffs = differences(expected, got)
    assert not diffs, "the golden run changed (regenerate it only for a deliberate change):\n" + "\n".join(diffs)
    # Not vacuous: the runs update, DAPO refills, PPO's critic and adaptive beta act.
    assert all(m["update/optimizer_steps"] > 0 for steps in got.values() for m in steps)
    assert any(m.get("rollout/filtered_groups", 0) > 0 for m in got["dapo_refill"])
    ppo = got["ppo_critic_gae_adaptive_kl"]
    assert ppo[-1]["kl/beta"] != ppo[0]["kl/beta"] and "loss/value" in ppo[0]


def test_the_comparison_catches_a_changed_metric():
    golden = {"r": [{"reward/mean": 0.25, "advantages/mean": 0.0}]}
    assert not differences(golden, {"r": [{"reward/mean": 0.25 * (1 + RTOL / 2), "advantages/mean": ATOL / 2}]})
    assert differences(golden, {"r": [{"reward/mean": 0.25 * (1 + 2 * RTOL), "advantages/mean": 0.0}]})
    assert differences(golden, {"r": [{"reward/mean": 0.25}]})  # a metric that disappeared


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # helpers
    with tempfile.TemporaryDirectory() as tmp:
        runs = all_runs(Path(tmp))
    GOLDEN.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: {', '.join(f'{k} ({len(v)} steps)' for k, v in runs.items())}")
