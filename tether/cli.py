"""`tether` command line: train | sft | reward-model | eval | report | config | import-model | merge-lora."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EPILOG_TRAIN = """\
examples:
  tether train                                    the built-in default: tiny model -> SFT -> PPO on arithmetic
  tether train algorithm.name=grpo                the same pipeline with GRPO
  tether train examples/grpo_math.yaml steps=200  a config file with overrides
  tether train my.yaml --resume                   continue the run from its newest checkpoint that verifies
  tether train my.yaml --run-dir runs/a --overwrite   replace the run in runs/a with a new one

Overrides are key.sub=value pairs over the config tree; `tether config` lists every key.
"""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tether").setLevel(logging.INFO if verbose else logging.WARNING)
    # transformers' own progress bars and warnings drown the run's output at this scale.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    from tether.config import ConfigError, deep_merge, load_yaml, parse_overrides, resolve_config, task_layer
    from tether.pipeline import DEFAULT_JOB, format_summary, run_pipeline
    from tether.train.run import run_training

    overrides = list(args.overrides)
    config_path = None
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    raw = load_yaml(config_path) if config_path else {}
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in the directory and --overwrite deletes it: choose one")
    if args.resume:
        overrides.append("checkpoint.resume=latest")
    if args.overwrite:
        overrides.append("logging.overwrite=true")
    if args.run_dir:
        overrides.append(f"logging.run_dir={args.run_dir}")
    user = deep_merge(raw, parse_overrides(overrides))
    # The pipeline (evaluation before and after, report) runs a built-in task: with the built-in tiny model
    # when model.path is unset, else on the model given.
    source = str((user.get("data") or {}).get("source") or "")
    pipeline = (user.get("model") or {}).get("path") is None or source.startswith("task:")
    if pipeline and not config_path:
        # The built-in default job; the user's overrides apply on top of it.
        default = dict(DEFAULT_JOB)
        if (user.get("algorithm") or {}).get("name", "ppo") != "ppo":
            default.pop("algorithm")  # another algorithm starts from its own preset, untuned
        if task_layer(user):  # a multi-turn task brings its own episode and turn budgets
            default["rollout"] = {k: v for k, v in default["rollout"].items() if k != "max_new_tokens"}
        user = deep_merge(default, user)
    cfg = resolve_config(user)
    from tether.train.loop import configure_process

    configure_process(cfg)  # threads and malloc policy: process-wide, so the command's to set, not the Trainer's
    if pipeline:
        if cfg.data.source is not None and not cfg.data.source.startswith("task:"):
            raise ConfigError("model.path is required when data.source is not a built-in task")
        summary = run_pipeline(cfg)
        print(format_summary(summary))
        return 0
    result = run_training(cfg)
    if result.trainer is not None and not result.trainer.dist.is_main:
        return 0  # under torchrun, rank 0 alone writes the report and prints the summary
    if cfg.logging.report and result.run_dir.exists():
        from tether.logging.report import write_report

        write_report(result.run_dir)
    last = result.metrics[-1] if result.metrics else {}
    print(f"Trained to step {result.steps}; last reward mean {last.get('reward/mean', float('nan')):.4f}")
    print(f"Run directory: {result.run_dir}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from tether.train.sft import run_sft

    if args.data.startswith("task:"):
        from tether.tasks import get_task

        rows = get_task(args.data[5:]).demonstrations(args.n, seed=args.seed)
    else:
        from tether.data import load_prompt_rows

        rows = load_prompt_rows(args.data, prompt_column=args.prompt_column, on_bad_row="error").rows
    out = run_sft(args.model, rows, args.out, steps=args.steps, epochs=None if args.steps else args.epochs,
                  lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    print(f"SFT: {out['steps']} steps, final loss {out['final_loss']:.4f}, saved to {out['out_dir']}")
    return 0


def cmd_reward_model(args: argparse.Namespace) -> int:
    from tether.rewards.training import train_reward_model

    data = args.data
    if data == "builtin:preference":
        from tether.tasks.preference import make_preference_data

        data = make_preference_data(args.n, seed=args.seed)
    metrics = train_reward_model(args.model, data, args.out, epochs=args.epochs, lr=args.lr,
                                 batch_size=args.batch_size, seed=args.seed)
    print(f"Reward model: held-out preference accuracy {metrics['eval_accuracy_before']:.1%} -> "
          f"{metrics['eval_accuracy']:.1%}; saved to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tether.models import load_causal_lm, load_tokenizer
    from tether.tasks import get_task
    from tether.tasks.evaluation import evaluate_task

    path = Path(args.checkpoint)
    if (path / "policy").is_dir():
        path = path / "policy"
    model = load_causal_lm(str(path))
    tokenizer = load_tokenizer(str(path))
    task = get_task(args.task)
    if args.data:
        from tether.data import load_prompt_rows

        rows = load_prompt_rows(args.data, on_bad_row="error").rows
    else:
        rows = task.make_rows("eval", args.n, seed=args.seed)
    model.eval()
    res = evaluate_task(model, tokenizer, task, rows, max_new_tokens=args.max_new_tokens)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=2))
    for ex in res["examples"]:
        print(f"  {ex['prompt']!r} -> {ex['completion']!r} (answer {ex['answer']!r}) {'ok' if ex['correct'] else 'x'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tether.logging.report import write_report

    print(write_report(args.run_dir, must_be_run=True))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from tether.config import describe

    for key, default, help_ in describe():
        print(f"{key} = {default}\n    {help_}")
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    from tether.model_sources import ModelSourceError, builtin_gguf, import_gguf
    from tether.models import ModelLoadError

    try:
        source = builtin_gguf(args.source[len("builtin:"):]) if args.source.startswith("builtin:") else args.source
        print(import_gguf(source, args.out))
    except ModelSourceError as e:
        raise ModelLoadError(str(e)) from None
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from tether.models import merge_lora

    print(merge_lora(args.adapter, args.out, base=args.base))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tether", description="RL post-training of language models: PPO, GRPO, "
                                "REINFORCE and friends, tethered to a reference policy by a KL penalty.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more (INFO level)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run RL training (no arguments: the built-in default pipeline)",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("overrides", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="an optional YAML config, then overrides")
    t.add_argument("--resume", action="store_true",
                   help="continue the run (logging.run_dir, else the newest run of this config under runs/) "
                        "from its newest checkpoint that verifies; an error when there is none")
    t.add_argument("--overwrite", action="store_true",
                   help="start a new run in a run directory that holds one, deleting its checkpoints and logs")
    t.add_argument("--run-dir", help="run directory (logging.run_dir)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sft", help="supervised fine-tuning on (prompt, completion) pairs")
    s.add_argument("--model", required=True, help="model path or hub name")
    s.add_argument("--data", required=True, help="JSONL/CSV/Parquet with prompt and completion, or task:NAME")
    s.add_argument("--out", required=True, help="output directory (a loadable HF model)")
    s.add_argument("--prompt-column", default="prompt")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--epochs", type=float, default=1.0)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--max-length", type=int, default=512)
    s.add_argument("--n", type=int, default=10000, help="demonstrations to draw from a built-in task")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sft)

    r = sub.add_parser("reward-model", help="train a Bradley-Terry reward model on preference pairs")
    r.add_argument("--model", required=True, help="base model path (a causal LM checkpoint is fine)")
    r.add_argument("--data", required=True, help="JSONL or saved dataset of {prompt, chosen, rejected}, or "
                                                 "builtin:preference")
    r.add_argument("--out", required=True)
    r.add_argument("--n", type=int, default=2000, help="pairs drawn from builtin:preference")
    r.add_argument("--epochs", type=int, default=2)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_reward_model)

    e = sub.add_parser("eval", help="greedy evaluation of a model or checkpoint on a built-in task")
    e.add_argument("checkpoint", help="a model directory or a checkpoint directory")
    e.add_argument("--task", default="arithmetic")
    e.add_argument("--data", help="rows with prompt and answer (default: the task's held-out set)")
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--max-new-tokens", type=int, default=8)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_eval)

    rep = sub.add_parser("report", help="(re)write RUN_DIR/report.html")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)

    c = sub.add_parser("config", help="list every config key with its default and meaning")
    c.set_defaults(func=cmd_config)

    im = sub.add_parser("import-model", help="turn a GGUF file (or builtin:NAME) into a plain HF model directory")
    im.add_argument("source", help="FILE.gguf, or builtin:smollm2-135m-instruct")
    im.add_argument("--out", help="output directory (default: the cache entry that model.path=FILE.gguf uses)")
    im.set_defaults(func=cmd_import_model)

    m = sub.add_parser("merge-lora", help="merge a LoRA adapter into its base model")
    m.add_argument("adapter", help="adapter directory (e.g. RUN/checkpoints/step-N/policy)")
    m.add_argument("--out", required=True)
    m.add_argument("--base", help="base model path (default: the adapter's recorded base)")
    m.set_defaults(func=cmd_merge_lora)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `tether train my.yaml --resume steps=20`: overrides after a flag are overrides too.
    if args.command == "train" and extra and not any(x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    from tether.config import ConfigError
    from tether.data import DataError
    from tether.logging.report import NotARunError
    from tether.models import ModelLoadError
    from tether.rewards.functions import RewardError
    from tether.train.checkpoint import CheckpointError, CheckpointWriteError
    from tether.train.loop import TrainingError

    # Each error the user can fix is one line (exit 2); a run that could not go on is exit 1.
    errors = ((ConfigError, "config error", 2), (DataError, "data error", 2), (ModelLoadError, "model error", 2),
              (CheckpointError, "checkpoint error", 2), (NotARunError, "error", 2),
              (CheckpointWriteError, "checkpoint error", 1), ((RewardError, TrainingError), "error", 1))
    try:
        return args.func(args)
    except tuple(t for types, _, _ in errors for t in (types if isinstance(types, tuple) else (types,))) as e:
        prefix, code = next((p, c) for types, p, c in errors if isinstance(e, types))
        print(f"{prefix}: {e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
