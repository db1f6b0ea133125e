"""TRL's GRPOTrainer on tether's arithmetic task: the TRL side of `learning.py --trl`.

Runs in TRL's own virtual environment (made by benchmarks/setup_trl.sh), never in tether's:

    benchmarks/.venv-trl/bin/python benchmarks/trl_learning.py --model SFT_DIR --rows train.jsonl \
        --out OUT_DIR --steps 20 --save-every 2 --seed 0

`--rows` holds the task's training rows ({"prompt", "answer"}), written by learning.py from tether's task, so
both trainers draw from the same problems. The reward is the arithmetic task's default score: 1 when the
stripped completion equals the answer, else 0 (tether.tasks.arithmetic with partial_credit off).

Settings mirror tether's `grpo` preset as learning.py runs it: prompts_per_step x group_size completions per
optimiser step (16 x 4 by default), max_new_tokens new tokens, temperature 1 without truncation, KL to a
frozen reference in the loss (k3, beta 0.04), clip epsilon 0.2, loss_type "grpo" (tether's
`seq_mean_token_mean`), rewards scaled by the group std, one update per batch, AdamW (no weight decay) at a
constant learning rate, gradient clipping at 1.0, dropout off.

Saves the policy as a plain HF directory at OUT_DIR/step-K every `--save-every` optimiser steps (and after the
last); learning.py evaluates those with tether's greedy evaluator, so both sides are scored by one code path.
Prints one `RESULT {json}` line with the per-step rewards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402


def exact_match(completions, answer, **_):
    """The arithmetic task's reward without partial credit: the stripped completion equals the answer."""
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", required=True, help="JSONL training rows with prompt and answer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in open(args.rows) if line.strip()]
    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "answer": [str(r["answer"]) for r in rows]})
    n_completions = args.prompts_per_step * args.group_size
    config = GRPOConfig(
        output_dir=os.path.join(args.out, "trainer"), use_cpu=True, bf16=False, fp16=False, report_to="none",
        logging_steps=1, save_strategy="no", max_steps=args.steps,
        per_device_train_batch_size=n_completions, gradient_accumulation_steps=1,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=args.beta, num_iterations=1, epsilon=0.2, loss_type="grpo",
        scale_rewards="group", gradient_checkpointing=False, disable_dropout=True, seed=args.seed,
        dataloader_num_workers=0, log_completions=False, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=args.model, reward_funcs=exact_match, args=config, train_dataset=dataset)

    def save(step: int) -> None:
        path = os.path.join(args.out, f"step-{step}")
        trainer.model.save_pretrained(path, safe_serialization=True)
        trainer.processing_class.save_pretrained(path)

    rewards: list[float] = []

    class Saver(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step % args.save_every == 0 or state.global_step == args.steps:
                save(state.global_step)

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    trainer.add_callback(Saver())
    trainer.train()
    emit({"side": "trl", "trl": trl.__version__, "steps": args.steps, "samples_per_step": n_completions,
          "rewards": rewards})


if __name__ == "__main__":
    main()
