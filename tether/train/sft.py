"""Supervised fine-tuning on (prompt, completion) rows: the warm start before RL.

Each example is  prompt tokens + completion tokens + EOS, or a multi-turn episode (a row with an "episode":
its assistant turns are learnt, each with its EOS, its environment turns are context only).  The loss is the mean next-token cross-entropy
over the completion tokens and the EOS only: prompt and padding positions get label -100. Batches are
right-padded. AdamW, linear warmup then cosine decay to `min_lr_ratio * lr`, gradient-norm clipping.

The prompt and the completion are tokenized separately and concatenated, so the prompt tokens seen in
training are exactly the ones a generator is given later (tokenizing the joined text could merge tokens
across the boundary with subword tokenizers).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

IGNORE = -100

# The default job before RL:  build_tiny_model(dir, **DEFAULT_MODEL)
#   -> run_sft(dir, get_task("arithmetic").demonstrations(DEFAULT_NUM_DEMOS, seed), out, **DEFAULT_SFT).
# Measured on 2 idle CPU threads: 2,000 steps in 51 s (59 s with build and a 500-problem eval); held-out
# greedy accuracy 41-47% over seeds 0-3 (tether/tasks/arithmetic.py has the full numbers). 16 heads of
# width 8 rather than 4 of 32: with 4 heads (on uniform operands, p 0.6) the loss sat on a plateau near
# 0.8 for 1,000 to over 3,000 steps depending on the seed; with 16 it left it by step 400-800 on the same
# data and by 200-500 on the default data, on every seed tried. One layer never learned addition; 3
# layers or hidden 256 cost more per step without leaving the plateau sooner.
DEFAULT_MODEL = dict(hidden_size=128, num_layers=2, num_heads=16)
DEFAULT_SFT = dict(steps=2000, lr=3e-3, batch_size=64, max_length=32, warmup_steps=50, weight_decay=0.0)
DEFAULT_NUM_DEMOS = 50_000


def _check_rows(rows: list[dict]) -> None:
    if not isinstance(rows, (list, tuple)) or len(rows) == 0:
        raise ValueError("SFT needs a non-empty list of rows {'prompt': str, 'completion': str}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"SFT row {i} is a {type(row).__name__}, expected a dict with 'prompt' and 'completion'")
        if "episode" in row:
            if not isinstance(row["episode"], list) or not all(
                    isinstance(t, dict) and isinstance(t.get("content"), str) and t.get("role") in
                    ("assistant", "user", "tool") for t in row["episode"]):
                raise ValueError(f"SFT row {i}: 'episode' must be a list of {{'role': 'assistant' | 'user' | "
                                 f"'tool', 'content': str}} turns: {row!r}")
            continue
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            raise ValueError(f"SFT row {i} is missing {', '.join(missing)}: {row!r}")
        for k in ("prompt", "completion"):
            if not isinstance(row[k], str):
                raise ValueError(f"SFT row {i}: {k!r} must be a str, got {type(row[k]).__name__}: {row!r}")


def tokenize_examples(tokenizer, prompts: list[str], completions: list[str]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, untruncated; labels are -100 on the prompt."""
    # Batched calls: the Rust tokenizer is much faster on lists than one string at a time.
    prompt_ids = tokenizer(prompts)["input_ids"]  # the tokenizer's usual specials (e.g. BOS), as at generation
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    examples = []
    for p, c in zip(prompt_ids, completion_ids):
        c = c + [tokenizer.eos_token_id]
        examples.append((p + c, [IGNORE] * len(p) + c))
    return examples


def tokenize_rows(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """`tokenize_examples` of (prompt, completion) rows; a row with an "episode" (a multi-turn demonstration)
    is tokenized as a sampled episode would be (rollout/episodes.py) with labels on the assistant turns only."""
    from tether.rollout.episodes import PlainFormat, episode_tokens

    single = [i for i, r in enumerate(rows) if "episode" not in r]
    out: list = [None] * len(rows)
    if single:
        for i, ex in zip(single, tokenize_examples(tokenizer, [rows[i]["prompt"] for i in single],
                                                   [rows[i]["completion"] for i in single])):
            out[i] = ex
    fmt = PlainFormat(tokenizer)
    for i, r in enumerate(rows):
        if out[i] is None:
            ids, mask = episode_tokens(fmt, tokenizer, r["prompt"], r["episode"])
            out[i] = (ids, [t if m else IGNORE for t, m in zip(ids, mask)])
    return out


def tokenize_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    return tokenize_examples(tokenizer, [prompt], [completion])[0]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the next token over the positions whose label is not -100."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Position t predicts token t+1.
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE
    )


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def run_sft(
    model_path: str | Path,
    rows: list[dict],
    out_dir: str | Path,
    *,
    epochs: float | None = None,
    steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 32,
    max_length: int = 256,
    seed: int = 0,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    min_lr_ratio: float = 0.1,
    max_grad_norm: float = 1.0,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Fine-tune the causal LM at `model_path` on `rows` and save it (safetensors) + tokenizer to `out_dir`.

    Give the budget as `epochs` (may be fractional) or `steps`, not both; with neither, one epoch.
    `progress` logs a line about every tenth of the run. Deterministic given `seed` on CPU.
    Returns {"final_loss", "first_loss", "losses", "steps", "examples", "epochs", "seconds",
    "tokens_per_s", "out_dir"}; "final_loss" is the mean over the last 10% of steps (at most 50).
    """
    _check_rows(rows)
    if epochs is not None and steps is not None:
        raise ValueError("give either epochs or steps, not both")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if epochs is not None and not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs!r}")
    if batch_size < 1 or max_length < 2 or lr <= 0:
        raise ValueError(f"need batch_size >= 1, max_length >= 2 and lr > 0; got {batch_size}, {max_length}, {lr}")

    torch.manual_seed(seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer at {model_path} has no EOS token; SFT appends one to every completion")
    if tokenizer.pad_token is None:
        # Padding is masked from attention and loss, so reusing EOS is safe; the saved tokenizer keeps it so
        # later stages can batch too.
        tokenizer.pad_token = tokenizer.eos_token
        log(f"sft: tokenizer has no pad token; using the EOS token {tokenizer.eos_token!r} for padding")
    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=False, dtype=torch.float32).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    kept: list[tuple[list[int], list[int]]] = []
    truncated = 0
    for input_ids, labels in tokenize_rows(tokenizer, rows):
        truncated += len(input_ids) > max_length
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        # A prompt that fills max_length leaves nothing to learn from (labels are shifted by one).
        if any(label != IGNORE for label in labels[1:]):
            kept.append((input_ids, labels))
    if truncated:
        log(f"sft: {truncated} of {len(rows)} rows are longer than max_length={max_length} and were truncated")
    if len(kept) < len(rows):
        log(f"sft: skipped {len(rows) - len(kept)} rows whose prompt fills max_length={max_length}")
    if not kept:
        raise ValueError(f"no row has a completion token left within max_length={max_length}")

    batches_per_epoch = math.ceil(len(kept) / batch_size)
    total_steps = steps if steps is not None else max(1, round((epochs or 1.0) * batches_per_epoch))
    warmup_steps = min(warmup_steps, total_steps)

    # No weight decay on biases and norm weights (1-d tensors), the usual AdamW recipe.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))

    order_rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    log_every = max(1, total_steps // 10)
    log(f"sft: {len(kept)} examples, {total_steps} steps of batch {batch_size} ({total_steps / batches_per_epoch:.2f} epochs) on {device}")
    model.train()
    start = time.perf_counter()
    for step in range(total_steps):
        # Walk through shuffled epochs; a new permutation whenever the previous one runs out.
        if len(order) < batch_size:
            perm = list(range(len(kept)))
            order_rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        batch = {k: v.to(device) for k, v in collate([kept[i] for i in idx], tokenizer.pad_token_id).items()}

        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
        loss = completion_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()

        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        if progress and ((step + 1) % log_every == 0 or step == 0):
            recent = losses[-log_every:]
            log(f"sft: step {step + 1}/{total_steps}  loss {sum(recent) / len(recent):.4f}  lr {optimizer.param_groups[0]['lr']:.2e}")
    seconds = time.perf_counter() - start

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    tail = losses[-max(1, min(50, total_steps // 10)) :]
    return {
        "final_loss": sum(tail) / len(tail),
        "first_loss": losses[0],
        "losses": losses,
        "steps": total_steps,
        "examples": len(kept),
        "epochs": total_steps * batch_size / len(kept),
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "out_dir": str(out),
    }
