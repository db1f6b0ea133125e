"""Learning per sample: every preset on the built-in arithmetic task from the same SFT model at equal samples,
over several seeds, beside TRL's GRPOTrainer; and on-policy distillation from a PPO-trained teacher.

    .venv/bin/python benchmarks/learning.py                                   # every preset, seeds 0-2
    .venv/bin/python benchmarks/learning.py --presets grpo,ppo --seeds 0 --trl  # with TRL's GRPO (setup_trl.sh)

Each run is `tether train` (the default job's pipeline) in its own subprocess: the tiny model and its SFT
checkpoint are built once per seed and cached (TETHER_CACHE under benchmarks/.cache/learning), so every preset
of a seed starts from the very same SFT model and is evaluated on the same held-out problems (greedy, the
pipeline's evaluator). Equal samples: rollout.prompts_per_step x rollout.group_size completions per generation
round and the same number of optimiser steps for every preset, at the same learning rate; DAPO's refill rounds
are counted (rollout/generation_rounds), and its row reports the accuracy reached within the others' sample
budget. Settings a preset does not fix (lr, batch, tokens) are the default job's (tether/pipeline.py).

`--opd` (on by default with ppo in --presets): the student is the SFT model, the teacher the PPO run's final
checkpoint of the same seed (model.teacher_path), the task reward off (reward.task_reward=false): the student
learns from the teacher's per-token log-probs alone.

`--trl`: TRL's GRPOTrainer (benchmarks/trl_learning.py, in benchmarks/.venv-trl) on the same SFT model, the
same training rows, samples, learning rate and GRPO settings; its saved policies are scored by the same
evaluator as tether's runs.

`--variant LABEL=PRESET:key=value,...` (repeatable): a preset with overrides, as its own row; for example
`--variant grpo-mb2=grpo:algorithm.minibatches=2` separates "which loss" from "how many updates per batch".

Prints a markdown table (mean and spread over seeds; the paired column is the per-seed difference from GRPO at
the earliest budget, mean ± standard error, since the seeds' SFT models differ more than the presets do) and
writes every figure to OUT/learning.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CACHE, HERE, parse_result  # noqa: E402

ROOT = HERE.parent
TRL_PYTHON = HERE / ".venv-trl" / "bin" / "python"
PRESETS = ["ppo", "grpo", "dr_grpo", "dapo", "rloo", "reinforce", "gspo", "cispo", "sapo", "reinforce_pp",
           "reinforce_pp_baseline"]


def tether_run(preset: str, seed: int, run_dir: Path, args, extra: list[str] = ()) -> dict:
    """One `tether train` run; returns its eval curve as [(samples, accuracy)] and the summary."""
    cmd = [sys.executable, "-m", "tether.cli", "train", f"algorithm.name={preset}", f"seed={seed}",
           f"steps={args.steps}", f"task.sft_steps={args.sft_steps}", f"task.eval_size={args.eval_size}",
           f"logging.eval_every={args.eval_every}", f"rollout.prompts_per_step={args.prompts_per_step}",
           f"rollout.group_size={args.group_size}", f"optim.lr={args.lr}", f"logging.run_dir={run_dir}",
           "logging.progress=false", "logging.report=false", "logging.overwrite=true", "threads=1", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    if proc.returncode:
        return {"error": (proc.stdout + proc.stderr)[-2000:], "cmd": " ".join(cmd)}
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_round = args.prompts_per_step * args.group_size
    samples, curve = 0, [(0, summary["accuracy_before"])]
    for m in metrics:
        samples += int(m.get("rollout/generation_rounds", 1)) * per_round
        if "eval/accuracy" in m:
            curve.append((samples, m["eval/accuracy"]))
    if curve[-1][0] != samples:
        curve.append((samples, summary["accuracy_after"]))
    return {"curve": curve, "before": summary["accuracy_before"], "after": summary["accuracy_after"],
            "samples": samples, "reward_first": summary["reward_first"], "reward_last": summary["reward_last"],
            "kl": summary["final_kl_per_token"], "model_path": summary["model_path"],
            "seconds": time.perf_counter() - t0}


def trl_run(seed: int, sft_path: str, out: Path, args) -> dict:
    """TRL's GRPOTrainer from the same SFT model; its saved policies scored by tether's evaluator."""
    import transformers

    from tether.models import load_causal_lm, load_tokenizer
    from tether.tasks import get_task
    from tether.tasks.evaluation import evaluate_task

    transformers.utils.logging.disable_progress_bar()
    task = get_task("arithmetic")
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "train.jsonl"
    with rows_file.open("w") as f:
        for row in task.make_rows("train", 20000, seed=seed):  # the pipeline's training rows (task.train_size)
            f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"]}) + "\n")
    cmd = [str(TRL_PYTHON), str(HERE / "trl_learning.py"), "--model", sft_path, "--rows", str(rows_file),
           "--out", str(out), "--steps", str(args.steps), "--save-every", str(args.eval_every),
           "--prompts-per-step", str(args.prompts_per_step), "--group-size", str(args.group_size),
           "--lr", str(args.lr), "--seed", str(seed)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    if proc.returncode:
        return {"error": (proc.stdout + proc.stderr)[-2000:], "cmd": " ".join(cmd)}
    result = parse_result(proc.stdout)
    eval_rows = task.make_rows("eval", args.eval_size, seed=seed)  # the pipeline's held-out rows
    per_step = args.prompts_per_step * args.group_size

    def accuracy(path) -> float:
        model = load_causal_lm(str(path)).eval()
        return evaluate_task(model, load_tokenizer(str(path)), task, eval_rows, max_new_tokens=5)["accuracy"]

    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("step-*"))
    curve = [(0, accuracy(sft_path))] + [(s * per_step, accuracy(out / f"step-{s}")) for s in steps]
    return {"curve": curve, "before": curve[0][1], "after": curve[-1][1], "samples": curve[-1][0],
            "reward_first": result["rewards"][0], "reward_last": result["rewards"][-1], "trl": result["trl"],
            "seconds": time.perf_counter() - t0}


def _env() -> dict:
    return {**os.environ, "TETHER_CACHE": str(CACHE / "learning"), "OMP_NUM_THREADS": "1",
            "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}


def at_budget(curve: list, budget: int) -> float:
    """Accuracy at the last evaluation within `budget` samples."""
    return [acc for samples, acc in curve if samples <= budget][-1]


def mean_sd(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def paired(runs: list[dict], base: list[dict] | None, budget: int) -> str:
    """Mean ± standard error over seeds of (this run - the GRPO run of the same seed) at `budget` samples."""
    if not base or len(base) != len(runs) or len(runs) < 2:
        return "-"
    diffs = [100 * (at_budget(r["curve"], budget) - at_budget(b["curve"], budget)) for r, b in zip(runs, base)]
    return f"{statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.1f}"


def table(results: dict, budget: int, checkpoints: list[int]) -> str:
    base = results.get("tether grpo")
    head = ("| trainer / preset | seeds | before | " + " | ".join(f"at {c} samples" for c in checkpoints)
            + f" | gain (points) | vs grpo at {checkpoints[0]}, paired | samples used |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ranked = sorted(results.items(), key=lambda kv: -statistics.mean(
        at_budget(r["curve"], budget) - r["before"] for r in kv[1]))
    for name, runs in ranked:
        cells = [mean_sd([at_budget(r["curve"], c) for r in runs]) for c in checkpoints]
        gain = mean_sd([at_budget(r["curve"], budget) - r["before"] for r in runs])
        used = "/".join(str(r["samples"]) for r in runs)
        lines.append(f"| {name} | {len(runs)} | {mean_sd([r['before'] for r in runs])} | " + " | ".join(cells)
                     + f" | {gain} | {paired(runs, base, checkpoints[0])} | {used} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--sft-steps", type=int, default=700, help="the reduced SFT of the tests (plateaus ~35%%)")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--no-opd", action="store_true")
    ap.add_argument("--trl", action="store_true", help="TRL's GRPOTrainer too (needs benchmarks/setup_trl.sh)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=PRESET:key=value,...",
                    help="a preset with overrides, as its own row (repeatable)")
    ap.add_argument("--out", default=str(CACHE / "learning" / "runs"))
    args = ap.parse_args()

    presets = [p for p in args.presets.split(",") if p]
    variants = []
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        preset, _, sets = rest.partition(":")
        if not label or not preset:
            raise SystemExit(f"--variant {spec!r}: expected LABEL=PRESET:key=value,...")
        variants.append((label, preset, [kv for kv in sets.split(",") if kv]))
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    budget = args.steps * args.prompts_per_step * args.group_size
    checkpoints = [budget * k // 4 for k in (1, 2, 4)]
    results: dict[str, list[dict]] = {}
    errors = []

    def record(name: str, res: dict) -> None:
        if "error" in res:
            errors.append((name, res))
            print(f"  {name}: FAILED\n{res['error']}", flush=True)
            return
        results.setdefault(name, []).append(res)
        print(f"  {name}: {100 * res['before']:.1f}% -> {100 * res['after']:.1f}% in {res['samples']} samples "
              f"({res['seconds']:.0f} s)", flush=True)

    for seed in seeds:
        print(f"seed {seed}", flush=True)
        for preset in presets:
            res = tether_run(preset, seed, out / f"{preset}-{seed}", args)
            record(f"tether {preset}", res)
            if preset == "ppo" and "error" not in res and not args.no_opd:
                teacher = out / f"ppo-{seed}" / "checkpoints" / f"step-{args.steps:06d}" / "policy"
                opd = tether_run("opd", seed, out / f"opd-{seed}", args,
                                 [f"model.teacher_path={teacher}", "reward.task_reward=false"])
                opd["teacher"] = res["after"]
                record("tether opd (teacher: ppo)", opd)
        for label, preset, sets in variants:
            record(f"tether {label}", tether_run(preset, seed, out / f"{label}-{seed}", args, sets))
        if args.trl and presets:
            sft = results[f"tether {presets[0]}"][-1]["model_path"]
            record("TRL GRPOTrainer", trl_run(seed, sft, out / f"trl-{seed}", args))

    print(f"\nHeld-out greedy accuracy (%), {args.eval_size} problems per seed, from the SFT model "
          f"({args.sft_steps} steps); {args.prompts_per_step} x {args.group_size} samples a round, "
          f"{args.steps} steps, lr {args.lr}; seeds {args.seeds} (mean ± sd):\n")
    print(table(results, budget, checkpoints))
    if "tether opd (teacher: ppo)" in results:
        teachers = [r["teacher"] for r in results["tether opd (teacher: ppo)"]]
        print(f"\nOPD teachers (the PPO runs' final policies): {', '.join(f'{100 * t:.1f}%' for t in teachers)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"\nfigures: {out / 'learning.json'}")
    if errors:
        raise SystemExit(f"{len(errors)} run(s) failed: {', '.join(name for name, _ in errors)}")


if __name__ == "__main__":
    main()
