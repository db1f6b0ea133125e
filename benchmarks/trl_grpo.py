"""TRL's GRPOTrainer on a tether benchmark model: the reference side of `run.py --vs-trl`.

Runs in TRL's own virtual environment (made by benchmarks/setup_trl.sh), never in tether's:

    benchmarks/.venv-trl/bin/python benchmarks/trl_grpo.py --model benchmarks/.cache/models/medium-v1 \
        --steps 3 [--bf16] [--threads 2]

Settings mirror tether's `grpo` preset as run by run.py: 8 prompts x 4 completions = 32 completions per
optimiser step, 64 new tokens (the workload flags change these as they do tether's; `--chat`: conversational
prompts through the model's chat template; `--lora-r`: peft LoRA, the reference being the adapter-disabled
model, as in tether), temperature 1 with no top-k / top-p truncation, KL to a frozen reference
(beta 0.04, k3 estimator in the loss; TRL loads the reference as a second model from the same path),
clip epsilon 0.2, loss_type "grpo" (mean over each sequence's tokens, then over sequences: tether's
`seq_mean_token_mean`), rewards scaled by the group std, one update per batch (num_iterations=1), AdamW at
the same learning rate, gradient clipping at 1.0, gradient checkpointing and dropout off, no logging sinks.

Prints one `RESULT {json}` line: per-step wall times (first step = warm-up), a split by stage taken by
wrapping GRPOTrainer methods, completion lengths, rewards, and peak RSS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import chat_prompts, digit_fraction, emit, loadavg, make_prompts, peak_rss_mib  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=3, help="measured steps (one warm-up step is added)")
    ap.add_argument("--bf16", action="store_true", help="TRL/Accelerate bf16 mixed precision (autocast)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="completions per forward/backward (gradient accumulation up to the full batch of 32; "
                         "default: all 32 at once, like tether's optim.micro_batch_size=32)")
    ap.add_argument("--chat", action="store_true",
                    help="conversational prompts (common.chat_prompts) through the model's chat template")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank (peft; alpha 2r, no dropout)")
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None, help="scratch directory for the Trainer (default: a temp dir)")
    args = ap.parse_args()

    import tempfile

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import trl
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    load_start = loadavg()
    n_completions = args.prompts_per_step * args.group_size
    micro = args.micro_batch or n_completions
    if n_completions % micro:
        raise SystemExit(f"--micro-batch {micro} must divide the batch of {n_completions} completions")
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="trl-grpo-")
    config = GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=args.bf16,
        fp16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        max_steps=args.steps + 1,
        # TRL 1.x counts completions here; one generation round of 32 completions feeds the 32 / micro
        # accumulation steps of one optimiser step (steps_per_generation defaults to gradient_accumulation_steps).
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=n_completions // micro,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        num_iterations=1,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        gradient_checkpointing=False,
        disable_dropout=True,
        seed=args.seed,
        dataloader_num_workers=0,
        log_completions=False,
        disable_tqdm=True,
    )
    prompts = chat_prompts(256, seed=args.seed) if args.chat else make_prompts(256, seed=args.seed)
    dataset = Dataset.from_dict({"prompt": prompts})
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM")

    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=args.model, reward_funcs=digit_fraction, args=config, train_dataset=dataset,
                          peft_config=peft_config)
    setup_s = time.perf_counter() - t0
    rss_after_setup = peak_rss_mib()

    # Per-stage timers: wrap the trainer's own methods (bound, so only this instance is affected).
    stage = {"generate": 0.0, "score": 0.0, "logprobs": 0.0}

    def timed(name, fn, only_no_grad=False):
        def wrapper(*a, **k):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*a, **k)
            s = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                stage[name] += time.perf_counter() - s
        return wrapper

    trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed("logprobs", trainer._get_per_token_logps_and_entropies,
                                                       only_no_grad=True)

    steps: list[dict] = []
    log_entries: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            for k in stage:
                stage[k] = 0.0
            self.t = time.perf_counter()
            self.c = time.process_time()

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - self.t
            rec = {"time/step": total, **{f"time/{k}": v for k, v in stage.items()},
                   "cpu/step": time.process_time() - self.c}
            rec["time/update"] = total - sum(stage.values())  # loss forward/backward, optimiser, bookkeeping
            steps.append(rec)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                log_entries.append(dict(logs))

    trainer.add_callback(Timer())
    trainer.train()

    # Join the per-step logs (logging_steps=1: one log entry per optimiser step, then a final summary).
    step_logs = [entry for entry in log_entries if "loss" in entry]
    for rec, entry in zip(steps, step_logs):
        rec["completion/length_mean"] = entry.get("completions/mean_length")
        rec["completion/length_max"] = entry.get("completions/max_length")
        rec["reward/mean"] = entry.get("reward")
        rec["kl"] = entry.get("kl")
        rec["completion/tokens"] = (entry.get("completions/mean_length") or float("nan")) * n_completions

    model = trainer.model
    n_params = sum(p.numel() for p in model.parameters())
    emit({
        "side": "trl", "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "bf16": args.bf16, "micro_batch": micro, "optimizer": type(trainer.optimizer).__name__,
        "optimizer_defaults": {k: str(v) for k, v in trainer.optimizer.defaults.items()}, "threads": torch.get_num_threads(), "params": n_params, "setup_s": setup_s,
        "batch": n_completions, "prompt_len": None if args.chat else len(prompts[0]), "lora_r": args.lora_r, "max_new_tokens": args.max_new_tokens,
        "steps": steps, "peak_rss_mib": peak_rss_mib(), "rss_after_setup_mib": rss_after_setup,
        "loadavg_start": load_start, "loadavg_end": loadavg(),
    })


if __name__ == "__main__":
    main()
