"""The built-in default job: tiny model -> SFT -> evaluation -> RL -> evaluation -> report.

It runs through the same code paths as a hub model: the tiny model is saved with `save_pretrained` and every
later stage loads it by path. What it builds is cached (keyed by its settings) so a second run starts at RL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from tether.config import TrainConfig
from tether.train.run import RunResult, run_training, write_summary

log = logging.getLogger("tether")

# The default pipeline's tiny model and SFT budget, tuned so that SFT plateaus on the imperfect
# demonstrations and RL has a real gap to close (see tether/tasks/arithmetic.py for the measurements).
DEFAULT_MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 16, "max_positions": 64}
DEFAULT_SFT = {"steps": 2000, "lr": 3e-3, "batch_size": 64, "demonstrations": 50000, "warmup_steps": 50}

# `tether train` with no arguments: PPO with a critic, GAE and an adaptive KL to the SFT reference.
# examples/tiny_default.yaml holds the same settings as a file (a test keeps the two equal).
DEFAULT_JOB = {
    "seed": 0,
    # Tiny models gain little from a second thread, and 2-thread runs slow down 3-10x when anything else
    # holds a core; one thread degrades gently.
    "threads": 1,
    "steps": 50,
    "task": {"name": "arithmetic", "eval_size": 200},
    # Only for ppo: another algorithm.name drops this section and starts from that preset as it is.
    "algorithm": {"name": "ppo", "beta": 0.3, "kl_target": 0.05, "kl_horizon": 1000},
    "rollout": {"prompts_per_step": 16, "group_size": 4, "max_new_tokens": 5, "temperature": 1.0},
    "optim": {"lr": 5e-5, "critic_lr": 1e-3, "micro_batch_size": 64},
    "logging": {"eval_every": 10, "samples_every": 10},
}


def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether"))


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def prepare_sft_model(cfg: TrainConfig, echo=print) -> tuple[Path, dict]:
    """Build (or reuse from the cache) the tiny base model and its SFT checkpoint for `cfg.task`."""
    from tether.tasks import get_task
    from tether.tasks.tiny_model import build_tiny_model
    from tether.train.sft import run_sft

    source = cfg.data.source or ""
    task_name = cfg.task.name or (source[len("task:"):] if source.startswith("task:") else "arithmetic")
    task = get_task(task_name, **cfg.task.options)
    model_kw = {**DEFAULT_MODEL, **getattr(task, "model_defaults", {}), **cfg.task.model_size}
    sft_kw = dict(DEFAULT_SFT)
    if cfg.task.sft_steps:
        sft_kw["steps"] = cfg.task.sft_steps
    spec = {"task": task_name, "options": cfg.task.options, "model": model_kw, "sft": sft_kw if cfg.task.sft else None,
            "seed": cfg.seed, "version": 1,
            # The task's first demonstrations, digested: when a release changes a task's prompts or
            # demonstrations, the cache builds a new SFT model instead of reusing one trained on the old ones.
            "demonstrations": _key(task.demonstrations(4, seed=cfg.seed)) if cfg.task.sft else None}
    root = cache_dir() / "pipeline" / f"{task_name}-{_key(spec)}"
    final = root / ("sft" if cfg.task.sft else "base")
    info_path = root / "info.json"
    if final.exists() and info_path.exists():
        echo(f"Using cached model {final}")
        return final, json.loads(info_path.read_text())
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    base = build_tiny_model(tmp / "base", seed=cfg.seed, **model_kw)
    info = {"spec": spec, "build_seconds": time.perf_counter() - t0}
    echo(f"Built tiny Llama-architecture model ({model_kw}) in {info['build_seconds']:.1f}s")
    if cfg.task.sft:
        demos = task.demonstrations(sft_kw["demonstrations"], seed=cfg.seed)
        echo(f"SFT on {len(demos)} imperfect demonstrations of '{task_name}' ...")
        out = run_sft(base, demos, tmp / "sft", steps=sft_kw["steps"], lr=sft_kw["lr"],
                      batch_size=sft_kw["batch_size"], warmup_steps=sft_kw["warmup_steps"], seed=cfg.seed,
                      log=lambda m: log.info(m), progress=True)
        info["sft"] = {k: v for k, v in out.items() if k != "losses"}
        echo(f"SFT done in {out['seconds']:.1f}s (final loss {out['final_loss']:.3f})")
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    # Publish atomically: a crash mid-build never leaves a cache entry that looks complete.
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return final, info


def evaluate_policy(model, tokenizer, cfg: TrainConfig, rows: list[dict]) -> dict:
    from tether.tasks import get_task
    from tether.tasks.evaluation import evaluate_task

    task = get_task(cfg.task.name or "arithmetic", **cfg.task.options)
    was_training = model.training
    model.eval()
    try:
        if cfg.env.name is not None and getattr(task, "environment", None):  # greedy episodes
            from tether.tasks.evaluation import evaluate_episodes

            return evaluate_episodes(model, tokenizer, task, rows, max_turns=cfg.env.max_turns,
                                     max_tokens=cfg.env.max_tokens, max_new_tokens=cfg.rollout.max_new_tokens,
                                     chat_template=cfg.model.chat_template, system_prompt=cfg.model.system_prompt,
                                     options=cfg.env.options)
        return evaluate_task(model, tokenizer, task, rows, max_new_tokens=cfg.rollout.max_new_tokens,
                             chat_template=cfg.model.chat_template)
    finally:
        model.train(was_training)


def run_pipeline(cfg: TrainConfig, *, echo=print) -> dict:
    """The default job end to end. Returns the summary (also written to RUN_DIR/summary.json)."""
    from tether.models import load_causal_lm, load_tokenizer
    from tether.tasks import get_task

    t_start = time.perf_counter()
    source = cfg.data.source or ""
    task_name = cfg.task.name or (source[len("task:"):] if source.startswith("task:") else "arithmetic")
    cfg.task.name = task_name
    if cfg.model.path is None:
        path, build_info = prepare_sft_model(cfg, echo=echo)
        cfg.model.path = str(path)
    else:
        build_info = {}
    if cfg.data.source is None:
        cfg.data.source = f"task:{task_name}"
    task = get_task(task_name, **cfg.task.options)
    eval_rows = task.make_rows("eval", cfg.task.eval_size, seed=cfg.seed)

    tokenizer = load_tokenizer(cfg.model.path)
    sft_model = load_causal_lm(cfg.model.path)
    before = evaluate_policy(sft_model, tokenizer, cfg, eval_rows)
    del sft_model
    echo(f"Held-out greedy accuracy before RL: {before['accuracy']:.1%} ({before['n']} problems)")

    def eval_fn(trainer) -> dict:
        res = evaluate_policy(trainer.policy, trainer.tokenizer, cfg, eval_rows)
        return {"accuracy": res["accuracy"]}

    result: RunResult = run_training(cfg, eval_fn=eval_fn)
    trainer = result.trainer
    after = evaluate_policy(trainer.policy, trainer.tokenizer, cfg, eval_rows)
    last = result.metrics[-1] if result.metrics else {}
    kl_window = [m["kl/ref_per_token"] for m in result.metrics[-10:] if "kl/ref_per_token" in m]
    summary = {
        "task": task_name, "algorithm": cfg.algorithm.name, "steps": result.steps,
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "accuracy_gain_points": 100 * (after["accuracy"] - before["accuracy"]),
        "accuracy_by_group_before": before.get("accuracy_by_group"),
        "accuracy_by_group_after": after.get("accuracy_by_group"),
        "final_kl_per_token": sum(kl_window) / len(kl_window) if kl_window else None,
        "kl_target": cfg.algorithm.kl_target, "final_beta": last.get("kl/beta"),
        "reward_first": result.metrics[0]["reward/mean"] if result.metrics else None,
        "reward_last": last.get("reward/mean"),
        "model_path": cfg.model.path,
        "seconds_total": time.perf_counter() - t_start,
        "run_dir": str(result.run_dir),
    }
    write_summary(result.run_dir, summary)
    # Details that would crowd the report's summary: the model build / SFT record and example completions.
    (result.run_dir / "pipeline.json").write_text(json.dumps(
        {"build": build_info, "eval_examples_before": before["examples"], "eval_examples_after": after["examples"]},
        indent=2))
    if cfg.logging.report:
        from tether.logging.report import write_report

        summary["report"] = str(write_report(result.run_dir))
    return summary


def format_summary(s: dict) -> str:
    lines = [
        f"Task: {s['task']}   algorithm: {s['algorithm']}   steps: {s['steps']}",
        f"Held-out greedy accuracy: {s['accuracy_before']:.1%} after SFT -> {s['accuracy_after']:.1%} after RL "
        f"({s['accuracy_gain_points']:+.1f} points)",
    ]
    if s.get("final_kl_per_token") is not None:
        target = f" (target {s['kl_target']})" if s.get("kl_target") else ""
        lines.append(f"Final KL to the reference per token: {s['final_kl_per_token']:.4f}{target}")
    lines.append(f"Total time: {s['seconds_total']:.0f}s")
    lines.append(f"Run directory: {s['run_dir']}")
    if s.get("report"):
        lines.append(f"Report: {s['report']}")
    return "\n".join(lines)

