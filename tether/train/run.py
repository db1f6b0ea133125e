"""Running a training job: data and rewards from the config, the loop, logs, checkpoints, resume, report."""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tether.config import ConfigError, TrainConfig
from tether.train.distributed import Dist
from tether.train.loop import Trainer

log = logging.getLogger("tether")

# Metrics shown on the live progress bar.
PROGRESS_KEYS = ("reward/mean", "kl/ref_per_token", "kl/beta", "policy/entropy", "completion/length_mean")


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    metrics: list[dict] = field(default_factory=list)   # one dict per step run in this process
    checkpoint: Path | None = None
    interrupted: bool = False
    trainer: Trainer | None = field(default=None, repr=False)


RUNS_DIR = Path("runs")
# Files and folders a run writes into its directory: what `logging.overwrite` deletes, and nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "samples.jsonl", "tensorboard", "plots", "report.html",
             "summary.json", "pipeline.json", "config.yaml", "wandb_run_id")
# Config keys that may differ between a run and its continuation.
_RESUME_FREE_KEYS = (("logging", "run_dir"), ("logging", "overwrite"), ("checkpoint", "resume"), ("steps",))


def default_run_dir(cfg: TrainConfig) -> Path:
    """runs/<time>-<algorithm>, with a -2, -3, ... suffix when a run started in the same second."""
    stem = RUNS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.algorithm.name}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def holds_run(run_dir: Path) -> str | None:
    """What in `run_dir` shows an earlier run (its checkpoints, its logged steps), or None."""
    from tether.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(run_dir)
    if found:
        return f"{len(found)} checkpoint(s), the newest {found[-1].name}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "a metrics.jsonl with logged steps"
    return None


def _comparable(config: dict) -> dict:
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for path in _RESUME_FREE_KEYS:
        node = config
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return config


def find_run_of_config(cfg: TrainConfig, runs_dir: Path = RUNS_DIR) -> Path | None:
    """The newest run under `runs_dir` whose config.yaml is `cfg` (up to run_dir, resume and steps) and that
    has a checkpoint: what `--resume` continues when no run directory is given."""
    import yaml

    from tether.config import to_dict
    from tether.train.checkpoint import complete_checkpoints

    if not runs_dir.is_dir():
        return None
    want = _comparable(to_dict(cfg))
    for run in sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            saved = yaml.safe_load((run / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(saved, dict) and _comparable(saved) == want and complete_checkpoints(run):
            return run
    return None


def prepare_run_dir(cfg: TrainConfig, run_dir: str | Path | None, is_main: bool = True) -> Path:
    """The run directory, checked against what it already holds: a new run never mixes with an old one.

    - no resume: a directory that holds a run is refused, unless logging.overwrite deletes that run first;
    - resume 'latest' / 'auto' without a directory: the newest run of the same config under runs/.
    """
    mode = cfg.checkpoint.resume
    if run_dir is None and cfg.logging.run_dir is None and mode in ("latest", "auto"):
        found = find_run_of_config(cfg)
        if found is not None:
            log.warning("resuming %s: the newest run of this config under %s/ (set logging.run_dir to choose "
                        "another)", found, RUNS_DIR)
            return found
        if mode == "latest":
            raise ConfigError(f"--resume: no run of this config with a checkpoint under {RUNS_DIR}/ to continue; "
                              "give the run's directory (--run-dir DIR or logging.run_dir), or drop --resume "
                              "to start a new run")
    run_dir = Path(run_dir or cfg.logging.run_dir or default_run_dir(cfg))
    if mode == "latest":
        from tether.train.checkpoint import complete_checkpoints

        if not complete_checkpoints(run_dir):  # before anything is written there
            raise _nothing_to_resume(run_dir)
    if mode is None and run_dir.is_dir():
        held = holds_run(run_dir)
        if held and not cfg.logging.overwrite:
            raise ConfigError(f"{run_dir} already holds a run ({held}): continue it with --resume "
                              "(checkpoint.resume=latest), replace it with --overwrite (logging.overwrite=true), "
                              "or give another --run-dir")
        if held and is_main:
            import shutil

            log.warning("logging.overwrite: deleting the run in %s (%s)", run_dir, held)
            for name in RUN_FILES:
                path = run_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    return run_dir


def _nothing_to_resume(run_dir: Path) -> ConfigError:
    return ConfigError(f"--resume: {run_dir} has no checkpoint to continue from; drop --resume to start a new "
                       "run there")


def resume_checkpoint(cfg: TrainConfig, run_dir: Path, trainer: Trainer, clean: bool) -> Path | None:
    """Load the checkpoint the config asks for into `trainer`; returns it, or None for a fresh start.

    'latest' / 'auto' try the run's checkpoints newest first and skip, with a warning naming the reason, any
    that fails its manifest or cannot be loaded; 'latest' with none at all, or every one damaged, is an error.
    """
    from tether.train.checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint, verify_checkpoint

    mode = cfg.checkpoint.resume
    if mode is None:
        return None
    if mode not in ("latest", "auto"):
        path = Path(mode)
        if not path.exists():
            raise ConfigError(f"checkpoint.resume: {path} does not exist")
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"checkpoint.resume: {path} is damaged: {problem}")
        trainer.load(path)
        return path
    latest_checkpoint(run_dir, clean=clean)  # puts back a checkpoint caught mid-replacement, drops leftovers
    skipped = []
    for path in reversed(complete_checkpoints(run_dir)):  # verified one at a time: older ones only if needed
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                trainer.load(path)
            except CheckpointError as e:
                problem = str(e)
        if problem is not None:
            skipped.append(f"{path.name}: {problem}")
            continue
        for line in skipped:
            log.warning("resume: skipped damaged checkpoint %s", line)
        if skipped:
            log.warning("resume: falling back to %s", path)
        return path
    if skipped:
        raise CheckpointError(f"no checkpoint of {run_dir} can be resumed, every one is damaged: "
                              + "; ".join(skipped))
    if mode == "latest":
        raise _nothing_to_resume(run_dir)
    log.warning("checkpoint.resume=auto: no checkpoint in %s, starting a new run", run_dir)
    return None


def load_rows(cfg: TrainConfig) -> tuple[list[dict], Callable | None]:
    """Prompt rows from `data.source`, and the task's own reward when the source is a built-in task. Prompt
    lengths are checked by the Trainer, on the tokens the sampler will feed (collect.rows_that_fit)."""
    src = cfg.data.source
    if src is None:
        raise ConfigError("data.source is not set: give a prompts file (.jsonl/.csv/.parquet), a saved "
                          "dataset directory, or task:NAME")
    if src.startswith("task:"):
        from tether.tasks import get_task

        task = get_task(src[len("task:"):], **cfg.task.options)
        # A multi-turn task's reward is its environment's (env.name).
        reward = None if getattr(task, "environment", None) else task.reward
        return task.make_rows("train", cfg.task.train_size, seed=cfg.seed), reward
    from tether.data import load_prompt_rows

    data = load_prompt_rows(src, prompt_column=cfg.data.prompt_column, on_bad_row=cfg.data.on_bad_row)
    if data.skipped:
        log.warning("%s", data.skipped_summary())
    return data.rows, None


def build_reward(cfg: TrainConfig, extra: list | None = None):
    """A RewardScorer over the configured functions, the reward model, and any Python callables given."""
    from tether.rewards.functions import RewardScorer, load_reward_function

    functions: list[tuple] = []
    for i, entry in enumerate(cfg.reward.functions):
        if isinstance(entry, dict) and "spec" not in entry:
            raise ConfigError(f"reward.functions[{i}]: {entry!r} needs a 'spec' key")
        spec, kwargs, weight = ((entry["spec"], entry.get("kwargs"), float(entry.get("weight", 1.0)))
                                if isinstance(entry, dict) else (str(entry), None, 1.0))
        try:
            functions.append((load_reward_function(spec, kwargs), weight))
        except (ValueError, ImportError, OSError) as e:
            raise ConfigError(f"reward.functions[{i}]: {e}") from e
    for fn in extra or []:
        functions.append(fn if isinstance(fn, tuple) else (fn, 1.0))
    if cfg.reward.reward_model:
        from tether.models import DTYPES
        from tether.rewards.reward_model import RewardModelScorer

        rm = RewardModelScorer(cfg.reward.reward_model, batch_size=cfg.reward.reward_model_batch_size,
                               dtype=DTYPES[cfg.model.frozen_dtype_name()], normalize=cfg.reward.normalize,
                               clip=cfg.reward.clip, trust_remote_code=cfg.model.trust_remote_code)
        functions.append((rm, cfg.reward.reward_model_weight))
    if not functions:
        if cfg.env.name is not None or cfg.model.teacher_path is not None:
            return None  # episodes are scored by their environment's rewards alone, distillation by its teacher
        raise ConfigError("no reward: set reward.functions, reward.reward_model, model.teacher_path, or use a "
                          "task:NAME data source")
    scorer = RewardScorer(functions, on_error=cfg.reward.on_error, timeout_s=cfg.reward.timeout_s)
    scorer.recipe = functools.partial(build_reward, cfg, extra)  # how another process builds the same scorer
    return scorer


def run_training(cfg: TrainConfig, *, rows: list[dict] | None = None, reward_functions: list | None = None,
                 run_dir: str | Path | None = None, eval_fn: Callable[[Trainer], dict] | None = None,
                 dist: Dist | None = None, on_step: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train for `cfg.steps` steps (or continue to it from a checkpoint), logging every step.

    `eval_fn(trainer) -> dict` runs every `logging.eval_every` steps; its figures are logged under `eval/`.
    """
    from tether.logging.metrics import MetricsLogger
    from tether.logging.progress import Progress
    from tether.train.checkpoint import CheckpointWriteError, GracefulStop, latest_checkpoint
    from tether.train.threads import adjust_between_steps

    dist = dist or Dist.from_env(cfg.distributed.backend)
    run_dir = prepare_run_dir(cfg, run_dir, is_main=dist.is_main)
    dist.barrier()  # rank 0 may have deleted an overwritten run: nobody writes before that is done
    extra_rewards = list(reward_functions or [])
    if rows is None:
        rows, task_reward = load_rows(cfg)
        if task_reward is not None and cfg.reward.task_reward:
            extra_rewards.insert(0, task_reward)
    reward = build_reward(cfg, extra_rewards)
    trainer = Trainer(cfg, rows=rows, reward_fn=reward, run_dir=run_dir, dist=dist)

    resume_from = resume_checkpoint(cfg, run_dir, trainer, clean=dist.is_main)  # rank 0 alone cleans
    if resume_from is not None:
        log.info("resumed from %s at step %d", resume_from, trainer.step_count)

    def save() -> Path | None:
        try:
            return trainer.save(ck.keep_last)
        except CheckpointWriteError as e:
            if ck.on_write_error == "stop":
                raise
            log.warning("%s; training goes on (checkpoint.on_write_error=continue)", e)
            return None

    logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                           wandb_project=cfg.logging.wandb_project, enabled=dist.is_main)
    # A resumed run rewrites the logs to end at its checkpoint: no step is lost or repeated.
    logger.truncate_after(trainer.step_count)
    result = RunResult(run_dir=run_dir, steps=trainer.step_count, trainer=trainer)
    ck = cfg.checkpoint
    try:
        with GracefulStop() as stop, Progress(cfg.steps, enabled=dist.is_main and cfg.logging.progress,
                                              initial_step=trainer.step_count, print_every=cfg.logging.log_every,
                                              keys=PROGRESS_KEYS, description=cfg.algorithm.name) as progress:
            while trainer.step_count < cfg.steps:
                adjust_between_steps()  # threads=auto, when the process runs it (configure_process)
                out = trainer.step()
                metrics = dict(out.metrics)
                if eval_fn is not None and cfg.logging.eval_every and out.step % cfg.logging.eval_every == 0:
                    metrics.update({f"eval/{k}": v for k, v in eval_fn(trainer).items()})
                logger.log(out.step, metrics)
                if cfg.logging.samples_per_step and (out.step % cfg.logging.samples_every == 0 or out.step == 1):
                    logger.log_samples(out.step, _sample_rows(out.rollout, cfg.logging.samples_per_step))
                progress.update(out.step, metrics)
                result.metrics.append(metrics)
                result.steps = out.step
                if on_step is not None:
                    on_step(out.step, metrics)
                if ck.every and out.step % ck.every == 0 and out.step < cfg.steps:
                    result.checkpoint = save() or result.checkpoint
                if dist.any(stop.requested):  # a signal may reach one rank first: all must save (collective)
                    log.warning("stop requested: saving a checkpoint at step %d and exiting", out.step)
                    result.checkpoint = save() or result.checkpoint
                    result.interrupted = True
                    break
        if ck.save_final and not result.interrupted and trainer.step_count >= cfg.steps:
            existing = latest_checkpoint(run_dir, clean=False)  # never remove rank 0's checkpoint being written
            if existing is None or not existing.name.endswith(f"{trainer.step_count:06d}"):
                result.checkpoint = save() or result.checkpoint
    finally:
        logger.close()
        trainer.close()
    return result


def _sample_rows(rollout, n: int) -> list[dict]:
    rows = []
    for i in range(min(n, len(rollout))):
        score = rollout.scores_B[i].item()
        row = {"prompt": rollout.prompts[i], "completion": rollout.completions[i],
               "reward": None if score != score else score, "truncated": bool(rollout.truncated_B[i])}
        if rollout.conversations is not None:  # an episode: every turn, with its role
            row["conversation"] = rollout.conversations[i]
        rows.append(row)
    return rows


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
