"""Peak memory of RL training with LoRA adapters vs full fine-tuning (which also keeps a frozen reference copy).

    python benchmarks/lora_memory.py [--hidden 512 --layers 8 --steps 3 --lora-r 16 --repeats 1]

Both variants run the same GRPO job (KL to the reference in the loss, so a reference is needed) on a
locally built Llama-config model of tens of millions of parameters, each in its own fresh subprocess:

  full: every weight trains (fp32 weights + gradients + two AdamW moments) and pi_ref is a frozen fp32
        deep copy of the initial policy;
  lora: adapters on the attention projections train; the base weights are frozen and pi_ref is the same
        model with its adapters switched off (no second copy).

The figure is the process's peak resident set size (getrusage ru_maxrss: the kernel's high-water mark) after
a few training steps, as well as the peak minus the RSS measured after imports (the part the run itself
added). Memory figures do not depend on CPU contention, so one repeat is normally enough. At this size the
activations of the update (B x T x 4*hidden MLP intermediates, kept for backward through frozen layers too)
are a large share of the peak; --gradient-checkpointing recomputes them and leaves mostly the weights,
gradients and AdamW moments that LoRA saves.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing
CACHE = Path(__file__).resolve().parent / ".cache"

MiB = 2**20


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    import torch

    from tether.config import resolve_config
    from tether.rewards.functions import RewardScorer
    from tether.train.loop import Trainer, configure_process

    base_rss = _rss_mib()
    lora = args.variant == "lora"
    raw = {
        "model": {"path": args.model, "lora": {"r": args.lora_r if lora else 0, "alpha": 2.0 * args.lora_r},
                  "gradient_checkpointing": args.gradient_checkpointing},
        "algorithm": {"name": "grpo"}, "seed": 0, "steps": args.steps, "threads": args.threads,
        "rollout": {"prompts_per_step": args.prompts, "group_size": args.group,
                    "max_new_tokens": args.max_new_tokens},
        "optim": {"lr": 1e-4, "micro_batch_size": args.prompts * args.group},
    }
    cfg = resolve_config(raw)

    def reward(prompts, completions, **_):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    rows = [{"prompt": f"digits please {i}: "} for i in range(64)]
    t0 = time.perf_counter()
    configure_process(cfg)  # threads and malloc policy, as the CLI applies them
    trainer = Trainer(cfg, rows=rows, reward_fn=RewardScorer([(reward, 1.0)]))
    after_build = _rss_mib()
    total = sum(p.numel() for p in trainer.policy.parameters())
    trainable = sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
    ref_params = (sum(p.numel() for p in trainer.reference.model.parameters())
                  if trainer.reference is not None and trainer.reference.model is not None else 0)
    # Same sampling stream in both variants: at initialisation the LoRA policy equals the base model (B = 0),
    # so the first batch, and nearly the later ones, hold the same completions and the same token counts.
    torch.manual_seed(1)
    metrics = [trainer.step().metrics for _ in range(args.steps)]
    peak = _peak_mib()
    print(json.dumps({
        "variant": args.variant, "peak_mib": peak, "base_rss_mib": base_rss, "after_build_mib": after_build,
        "run_peak_mib": peak - base_rss, "params": total, "trainable": trainable, "reference_params": ref_params,
        "seconds": time.perf_counter() - t0, "tokens": sum(m["completion/tokens"] for m in metrics),
        "finite": all(v == v for m in metrics for v in m.values()), "torch": torch.__version__,
    }))


def run_child(args: argparse.Namespace, variant: str, model: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", model, "--steps", str(args.steps),
           "--lora-r", str(args.lora_r), "--prompts", str(args.prompts), "--group", str(args.group),
           "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (both variants): shows the weight/optimiser part")
    p.add_argument("--child", choices=("full", "lora"))
    p.add_argument("--model")
    args = p.parse_args()
    if args.child:
        args.variant = args.child
        child(args)
        return

    from tether.tasks.tiny_model import build_tiny_model

    model = CACHE / f"lora-memory-h{args.hidden}-l{args.layers}"
    if not (model / "config.json").exists():
        build_tiny_model(model, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads)
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.repeats):
        for variant in ("full", "lora"):
            results[variant].append(run_child(args, variant, str(model)))
    best = {v: min(rs, key=lambda r: r["peak_mib"]) for v, rs in results.items()}
    f, l = best["full"], best["lora"]
    print(f"model: hidden {args.hidden} x {args.layers} layers, {f['params'] / 1e6:.1f}M parameters; "
          f"GRPO, {args.prompts} prompts x {args.group} completions x {args.max_new_tokens} new tokens, "
          f"{args.steps} steps, {args.threads} threads, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, lowest of {args.repeats} run(s)")
    for name, r in (("full fine-tuning + reference copy", f), (f"LoRA r={args.lora_r} (reference = adapters off)", l)):
        print(f"  {name:42s} peak RSS {r['peak_mib']:8.1f} MiB   above imports {r['run_peak_mib']:8.1f} MiB   "
              f"trainable {r['trainable'] / 1e6:6.2f}M   reference copy {r['reference_params'] / 1e6:5.1f}M")
    print(f"  ratio LoRA / full: peak RSS {l['peak_mib'] / f['peak_mib']:.2f}, "
          f"above imports {l['run_peak_mib'] / f['run_peak_mib']:.2f}")
    print(json.dumps({"full": f, "lora": l}))


if __name__ == "__main__":
    main()
