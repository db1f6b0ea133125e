"""Speed of the update phase (forward + backward + AdamW over the batch) with bf16 autocast vs plain fp32.

    python benchmarks/bf16_update.py [--hidden 512 --layers 8 --max-new-tokens 64 --pairs 4]
    python benchmarks/bf16_update.py --mode runs [--repeats 2 --steps 3]

Both variants run the same GRPO job on a locally built Llama-config model (~31M parameters at the defaults):

  fp32: fp32 weights, fp32 forward/backward;
  bf16: the same fp32 master weights and AdamW, forwards under torch.autocast(bfloat16) (matmuls in bf16,
        log-prob math in float32; model.autocast=bfloat16).

The figure is the trainer's own `time/update` metric: the K x M minibatch loop with its optimiser steps.

--mode paired (default): one process holds both trainers and alternates whole training steps between them
  (fp32, bf16, bf16, fp32, fp32, bf16, ...) after a warm-up step each; the ratio is the median over pairs of
  fp32 time / bf16 time per completion token. The two steps of a pair run within a minute of each other, so
  slowly varying load from other processes largely cancels; this is the figure to quote on a shared machine.
--mode runs: each variant in its own fresh subprocess, alternating; medians and fastest steps per variant.

Completions are sampled from the random model and run to --max-new-tokens unless EOS is drawn, so the ratio
is per token. On a CPU with AMX, bf16 matmuls are several times faster than fp32 ones; elementwise work
(norms, activations, dtype casts, the fp32 AdamW step) is not, which bounds the gain at this size.
The load average before and after is printed: contention from other processes makes timings noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing
CACHE = Path(__file__).resolve().parent / ".cache"
KEYS = ("time/update", "time/logprobs", "time/generate", "completion/tokens", "update/optimizer_steps")


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [float("nan")] * 3


def make_trainer(args: argparse.Namespace, variant: str, model: str):
    from tether.config import resolve_config
    from tether.rewards.functions import RewardScorer
    from tether.train.loop import Trainer, configure_process

    raw = {
        "model": {"path": model, "autocast": "bfloat16" if variant == "bf16" else None},
        "algorithm": {"name": "grpo"}, "seed": 0, "steps": 1000, "threads": args.threads,
        "rollout": {"prompts_per_step": args.prompts, "group_size": args.group,
                    "max_new_tokens": args.max_new_tokens},
        "optim": {"lr": 1e-5, "micro_batch_size": args.micro_batch_size},
    }

    def reward(prompts, completions, **_):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    rows = [{"prompt": f"digits please {i:03d}: "} for i in range(256)]
    cfg = resolve_config(raw)
    configure_process(cfg)  # threads and malloc policy, as the CLI applies them
    return Trainer(cfg, rows=rows, reward_fn=RewardScorer([(reward, 1.0)]))


def step(trainer) -> dict:
    m = trainer.step().metrics
    return {k: m[k] for k in KEYS}


def per_token(s: dict, key: str = "time/update") -> float:
    return s[key] / s["completion/tokens"]


# ----------------------------------------------------------------------------------------------------------
# paired mode: both trainers in one process, steps alternating


def paired(args: argparse.Namespace, model: str) -> dict:
    trainers = {v: make_trainer(args, v, model) for v in ("fp32", "bf16")}
    for t in trainers.values():
        step(t)  # warm-up
    pairs = []
    for i in range(args.pairs):
        order = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")  # ABBA: a linear drift cancels
        pair = {v: step(trainers[v]) for v in order}
        pairs.append(pair)
        print(f"  pair {i + 1}: fp32 {pair['fp32']['time/update']:.2f} s, bf16 {pair['bf16']['time/update']:.2f} s, "
              f"load {loadavg()[0]:.2f}", flush=True)
    ratios = [per_token(p["fp32"]) / per_token(p["bf16"]) for p in pairs]
    ratios_lp = [p["fp32"]["time/logprobs"] / p["bf16"]["time/logprobs"] for p in pairs]
    return {"pairs": pairs, "ratio_update_per_token": statistics.median(ratios), "ratios": ratios,
            "ratio_logprobs": statistics.median(ratios_lp),
            "params": sum(p.numel() for p in trainers["fp32"].policy.parameters())}


# ----------------------------------------------------------------------------------------------------------
# runs mode: one fresh subprocess per variant and repeat


def child(args: argparse.Namespace) -> None:
    trainer = make_trainer(args, args.child, args.model)
    steps = [step(trainer) for _ in range(args.warmup + args.steps)][args.warmup:]
    print(json.dumps({"variant": args.child, "steps": steps,
                      "params": sum(p.numel() for p in trainer.policy.parameters())}))


def run_child(args: argparse.Namespace, variant: str, model: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", model]
    for k in ("prompts", "group", "max_new_tokens", "steps", "warmup", "threads", "micro_batch_size"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def runs(args: argparse.Namespace, model: str) -> dict:
    results: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        for variant in ("fp32", "bf16"):
            results[variant].append(run_child(args, variant, model))

    def stat(variant: str, fn, key: str = "time/update") -> float:
        return fn([per_token(s, key) for r in results[variant] for s in r["steps"]])

    for v in ("fp32", "bf16"):
        print(f"  {v}: time/update {[round(s['time/update'], 2) for r in results[v] for s in r['steps']]}")
    # Load only ever adds time: the fastest steps are the least disturbed; the medians are shown too.
    return {"runs": results, "params": results["fp32"][0]["params"],
            "ratio_update_per_token": stat("fp32", statistics.median) / stat("bf16", statistics.median),
            "ratio_update_per_token_fastest": stat("fp32", min) / stat("bf16", min),
            "ratio_logprobs": stat("fp32", statistics.median, "time/logprobs")
            / stat("bf16", statistics.median, "time/logprobs")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("paired", "runs"), default="paired")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--pairs", type=int, default=4, help="paired mode: timed step pairs")
    p.add_argument("--steps", type=int, default=3, help="runs mode: measured steps per run")
    p.add_argument("--warmup", type=int, default=1, help="runs mode: untimed first steps per run")
    p.add_argument("--repeats", type=int, default=2, help="runs mode: runs per variant, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=("fp32", "bf16"))
    p.add_argument("--model")
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from tether.tasks.tiny_model import build_tiny_model

    model = CACHE / f"bf16-update-h{args.hidden}-l{args.layers}"
    if not (model / "config.json").exists():
        build_tiny_model(model, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads)
    load_before = loadavg()
    print(f"model: hidden {args.hidden} x {args.layers} layers; GRPO, {args.prompts} prompts x {args.group} "
          f"completions, up to {args.max_new_tokens} new tokens, micro-batch {args.micro_batch_size}, "
          f"{args.threads} threads, mode {args.mode}; load average before {load_before}", flush=True)
    out = paired(args, str(model)) if args.mode == "paired" else runs(args, str(model))
    out.update(load_before=load_before, load_after=loadavg(), mode=args.mode)
    line = f"  {out['params'] / 1e6:.1f}M parameters; update speed bf16 / fp32: " \
           f"{out['ratio_update_per_token']:.2f}x per token (median)"
    if "ratio_update_per_token_fastest" in out:
        line += f", {out['ratio_update_per_token_fastest']:.2f}x (fastest steps)"
    line += f"; no-grad log-prob pass {out['ratio_logprobs']:.2f}x; load average after {out['load_after']}"
    print(line)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
