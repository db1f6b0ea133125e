"""Step time under contention: torch's CPU threads and OpenMP's wait policy, with and without another busy process.

On a 2-core machine a training step on two threads slows several times when another process holds a core:
OpenMP threads spin at every barrier waiting for the thread that was descheduled. This script measures one
workload (a ~1M-parameter model, PPO with a separate critic, 8 prompts x 8 completions of up to 8 tokens, the
shape where per-step costs are small ops) under each thread setting, alone and beside a process that spins
on one core, each setting in a fresh interpreter (the OpenMP wait policy is read once, at start-up).

    python benchmarks/threads.py [--steps 8] [--rounds 2]

Prints the median step time of each setting (first step, compilation and warm-up, excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "threads=1": {"threads": 1, "env": {}},
    "threads=2": {"threads": 2, "env": {}},
    "threads=2 passive": {"threads": 2, "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "threads=2 spin 3k": {"threads": 2, "env": {"GOMP_SPINCOUNT": "3000"}},  # libgomp's spin before sleeping
    "threads=2 spin 30k": {"threads": 2, "env": {"GOMP_SPINCOUNT": "30000"}},
    "threads=auto": {"threads": "auto", "env": {}},
}

WORKER = r"""
import json, sys, time
from tether.config import resolve_config
from tether.rewards.functions import RewardScorer
from tether.tasks import get_task
from tether.train.loop import Trainer, configure_process
from tether.train.threads import adjust_between_steps

model, threads, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = resolve_config({"model": {"path": model}, "algorithm": {"name": "ppo"}, "steps": steps, "seed": 0,
                      "threads": threads if threads == "auto" else int(threads),
                      "rollout": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 8},
                      "logging": {"progress": False}})
configure_process(cfg)
task = get_task("arithmetic")
t = Trainer(cfg, rows=task.make_rows("train", 256, seed=0), reward_fn=RewardScorer([(task.reward, 1.0)]))
times = []
for _ in range(steps):
    adjust_between_steps()  # as the job runner does before every step
    t0 = time.perf_counter(); t.step(); times.append(time.perf_counter() - t0)
import torch
print(json.dumps({"times": times[1:], "torch_threads": torch.get_num_threads()}))
"""


def run_setting(model: Path, setting: dict, steps: int) -> dict:
    env = {**os.environ, **setting["env"]}
    for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if k not in setting["env"]:
            env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", WORKER, str(model), str(setting["threads"]), str(steps)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from tether.tasks.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "m", hidden_size=128, num_layers=4, num_heads=4)
        results: dict[tuple[str, bool], list[float]] = {}
        threads_used: dict[tuple[str, bool], int] = {}
        for _ in range(args.rounds):
            for busy in (False, True):
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
                try:
                    time.sleep(0.5 if busy else 0)
                    for name, setting in SETTINGS.items():
                        res = run_setting(model, setting, args.steps)
                        results.setdefault((name, busy), []).extend(res["times"])
                        threads_used[(name, busy)] = res["torch_threads"]
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
        print(f"{'setting':<20} {'alone: s/step (threads)':>24} {'beside a busy core':>20}")
        for name in SETTINGS:
            alone = statistics.median(results[(name, False)])
            busy = statistics.median(results[(name, True)])
            print(f"{name:<20} {alone:>17.3f} ({threads_used[(name, False)]}) {busy:>16.3f} "
                  f"({threads_used[(name, True)]})")


if __name__ == "__main__":
    main()
