"""The Python entry point: train a policy in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tether.config import ConfigError, resolve_config


def fit(
    model: str,
    prompts: list[dict] | str,
    reward: Callable | list | None = None,
    *,
    algorithm: str = "grpo",
    steps: int = 100,
    run_dir: str | Path | None = None,
    overrides: dict | None = None,
    configure_process: bool = False,
):
    """Train `model` (an AutoModelForCausalLM path or hub name) on `prompts` against `reward`.

    prompts: rows like {"prompt": ..., other columns...}, or a data path (JSONL/JSON/CSV/Parquet/saved dataset)
        or "task:NAME". The other columns reach reward functions as keyword lists.
    reward: a callable f(prompts, completions, **columns) -> list[float | None], a list of them (or of
        (callable, weight) pairs), or None when the config names rewards or the data is a built-in task.
    overrides: {"dotted.key": value} over the config tree (`tether config` lists every key).
    configure_process: also apply the run's process-wide settings to this process, as `tether train` does:
        torch's CPU threads (`threads`, 'auto' by default) and glibc's malloc policy (`keep_freed_memory`).
        Off by default, so that a notebook or a service that calls `fit` keeps its own settings.
    Returns a RunResult (run_dir, metrics per step, last checkpoint, the trainer).
    """
    from tether.train.run import run_training

    raw: dict = {"model": {"path": model}, "algorithm": {"name": algorithm}, "steps": steps}
    rows = None
    if isinstance(prompts, (str, Path)):
        raw["data"] = {"source": str(prompts)}
    else:
        rows = list(prompts)
    nested: dict = {}
    for key, value in (overrides or {}).items():  # {"optim.lr": 1e-6} -> {"optim": {"lr": 1e-6}}
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"overrides: {key!r} conflicts with another override")
        node[last] = value
    cfg = resolve_config(raw, nested)
    functions = [] if reward is None else (list(reward) if isinstance(reward, (list, tuple)) else [reward])
    if configure_process:
        from tether.train.loop import configure_process as apply

        apply(cfg)
    return run_training(cfg, rows=rows, reward_functions=functions, run_dir=run_dir)

