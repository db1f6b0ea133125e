"""The exact KL (algorithm.kl_estimator=full) against the sampled k3: its per-step variance and its cost.

Both runs train a random model of the `small` shape (about 9.9M parameters, tether's character vocabulary)
on the digit-fraction reward, beta 0.1, from the same seed; the policy drifts from the reference, so the KL
grows. Not run.py's benchmark model: its EOS suppression (a gain of 200 on one channel) is built for timing
fixed-length steps, and a few updates undo it, which sends the KL to the reference up by tens of nats.

- Variance (KL in the reward, `rloo` preset with kl_estimator=full): each step, on the same samples of the
  same pi_old, the spread over the batch's sequences of the sequence KL estimate sum_t kl_t: k3 on the
  sampled tokens, or the exact KL of the next-token distributions at each position. Both are unbiased for
  the sequence KL; the exact one has no variance from the sampled token at each position, only from the
  path. The last column is the noise k3 adds on top of the exact per-position values.
- Cost (KL in the loss, `grpo` preset): step time with the reference forward inside each training
  micro-batch (full) against the reference log-prob pass alone (k3), runs alternating k3 / full.

    .venv/bin/python benchmarks/kl_estimators.py [--steps 10] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, SIZES, digit_fraction, make_prompts  # noqa: E402

from tether.config import resolve_config  # noqa: E402
from tether.core.kl import KL_ESTIMATORS  # noqa: E402
from tether.rewards.functions import RewardScorer  # noqa: E402
from tether.tasks.tiny_model import build_tiny_model  # noqa: E402
from tether.train.loop import Trainer  # noqa: E402


def trainer(model: Path, preset: str, estimator: str, threads: int) -> Trainer:
    cfg = resolve_config({"model": {"path": str(model)}, "algorithm": {"name": preset}, "seed": 0,
                          "threads": str(threads), "logging": {"progress": False},
                          "rollout": {"max_new_tokens": 32, "prompts_per_step": 8, "group_size": 4},
                          "optim": {"lr": 3e-4}},
                         ["algorithm.beta=0.1", f"algorithm.kl_estimator={estimator}", "algorithm.minibatches=1"])
    rows = [{"prompt": p} for p in make_prompts(64)]
    return Trainer(cfg, rows=rows, reward_fn=RewardScorer([(digit_fraction, 1.0)]))


def sequence_kl(rollout, estimator: str) -> torch.Tensor:
    mask = rollout.response_mask_BT
    if estimator == "full":
        return (rollout.full_kl_BT * mask).sum(-1)
    old = rollout.old_logprobs_BT if rollout.old_logprobs_BT is not None else rollout.sampler_logprobs_BT
    return (KL_ESTIMATORS[estimator](old, rollout.ref_logprobs_BT) * mask).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    model = CACHE / "models" / "kl-small"
    if not (model / "config.json").exists():
        build_tiny_model(model, max_positions=256, seed=0, **SIZES["small"])

    print(f"variance: rloo (KL in the reward, kl_estimator=full), beta 0.1, {args.steps} steps of 8 x 4 "
          "completions of 32 tokens; both estimators on the same samples of the same pi_old")
    print("step | mean sum_t kl_t (full) | var over sequences: k3, full | mean (k3 sum - full sum)^2")
    t = trainer(model, "rloo", "full", args.threads)
    ratios = []
    for step in range(1, args.steps + 1):
        r = t.step().rollout
        k3_B, full_B = sequence_kl(r, "k3"), sequence_kl(r, "full")
        var_k3, var_full = k3_B.var().item(), full_B.var().item()
        if var_full > 0:
            ratios.append(var_k3 / var_full)
        print(f"{step:4d} | {full_B.mean().item():8.4f} | {var_k3:10.5f} {var_full:10.5f} | "
              f"{(k3_B - full_B).square().mean().item():10.5f}")
    if ratios:
        print(f"variance ratio k3 / full over steps 2-{args.steps}: median {statistics.median(ratios):.2f}x, "
              f"min {min(ratios):.2f}x, max {max(ratios):.2f}x")

    if args.rounds < 1:
        return
    print(f"\ncost: grpo (KL in the loss), {args.steps} steps, {args.rounds} alternating rounds, "
          f"{args.threads} thread(s)")
    times: dict[str, list[float]] = {"k3": [], "full": []}
    for _ in range(args.rounds):
        for e in ("k3", "full"):
            t = trainer(model, "grpo", e, args.threads)
            t.step()  # warm-up
            for _ in range(args.steps):
                t0 = time.perf_counter()
                t.step()
                times[e].append(time.perf_counter() - t0)
    med = {e: statistics.median(v) for e, v in times.items()}
    for e, v in med.items():
        print(f"{e:5s} median step {v:.3f} s (min {min(times[e]):.3f}, max {max(times[e]):.3f})")
    print(f"full / k3: {med['full'] / med['k3']:.2f}x")


if __name__ == "__main__":
    main()
