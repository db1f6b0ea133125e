"""Train a reward model on preference pairs with the Bradley-Terry loss.

Each row is {prompt, chosen, rejected}. The model (a sequence classifier with one output, built on any causal
LM checkpoint: the score head is new) gives a scalar r(prompt + completion); the loss is
-log sigmoid(r(chosen) - r(rejected)), i.e. the chosen completion should score higher. A held-out slice
measures preference accuracy (fraction of pairs with r(chosen) > r(rejected)) before and after training.
The result is saved with `save_pretrained` (safetensors) next to its tokenizer, ready for `RewardModelScorer`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tether.rewards.reward_model import encode_pairs, prepare_tokenizer

PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


def load_preference_data(data: str | Path | list[dict]) -> list[dict]:
    """Rows {prompt, chosen, rejected} from a list, a JSONL file, or a directory written by
    `datasets.Dataset.save_to_disk` (a DatasetDict must have a "train" split). Every row is checked: all three
    fields must be non-empty strings; an error names the first bad row (0-based) and the problem."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise ValueError(f"{str(path)!r} holds splits {list(ds)}; expected a 'train' split")
                ds = ds["train"]
            rows = [dict(r) for r in ds]
            where = str(path)
        elif path.is_file():
            rows = []
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{str(path)!r} line {line_no} is not valid JSON: {e}") from e
            where = str(path)
        else:
            raise ValueError(f"preference data {str(path)!r} is neither a JSONL file nor a dataset directory")
    elif isinstance(data, list):
        rows, where = data, "the preference data"
    else:
        raise ValueError(f"preference data must be a path or a list of dicts, got {type(data).__name__}")

    if not rows:
        raise ValueError(f"{where} has no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: row {i} is a {type(row).__name__}, expected a dict with keys {PREFERENCE_KEYS}")
        for key in PREFERENCE_KEYS:
            if key not in row:
                raise ValueError(f"{where}: row {i} is missing the key {key!r} (has {sorted(row)})")
            if not isinstance(row[key], str) or not row[key]:
                raise ValueError(f"{where}: row {i} has {key}={row[key]!r}; expected a non-empty string")
    return [{k: row[k] for k in PREFERENCE_KEYS} for row in rows]


def split_preference_data(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then the first `eval_fraction` of rows (at least one if the fraction is > 0) is held out."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(eval_fraction * len(rows))) if eval_fraction > 0 else 0
    if len(rows) - n_eval < 1:
        raise ValueError(f"{len(rows)} rows leave nothing to train on with eval_fraction={eval_fraction}")
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def pair_rewards(model, tokenizer, batch: list[dict], *, max_length: int, chat_template: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each [B], from one forward pass over the 2B sequences."""
    prompts = [r["prompt"] for r in batch]
    enc = encode_pairs(
        tokenizer,
        prompts + prompts,
        [r["chosen"] for r in batch] + [r["rejected"] for r in batch],
        max_length=max_length,
        chat_template=chat_template,
    )
    rewards = model(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0].float()
    return rewards[: len(batch)], rewards[len(batch) :]


@torch.no_grad()
def preference_accuracy(model, tokenizer, rows: list[dict], *, batch_size: int, max_length: int, chat_template: bool = False, device="cpu") -> float:
    """Fraction of rows where the model scores `chosen` strictly above `rejected`; NaN for no rows."""
    if not rows:
        return math.nan
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        rc, rr = pair_rewards(model, tokenizer, rows[start : start + batch_size], max_length=max_length, chat_template=chat_template, device=device)
        correct += (rc > rr).sum().item()
    model.train(was_training)
    return correct / len(rows)


def train_reward_model(
    base_model: str | Path,
    data: str | Path | list[dict],
    out_dir: str | Path,
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 16,
    eval_fraction: float = 0.1,
    max_length: int = 512,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    chat_template: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = print,
    log_every: int = 50,
) -> dict[str, float]:
    """Train a Bradley-Terry reward model from `base_model` on `data` and save it to `out_dir`.

    Deterministic given `seed` (split, head initialisation and batch order are all seeded). `chat_template`
    must match the `RewardModelScorer` that will use the model. Returns {train_loss (mean over the last
    epoch), eval_accuracy_before, eval_accuracy, n_train, n_eval, train_time_s}."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    log = log or (lambda msg: None)
    rows = load_preference_data(data)
    train_rows, eval_rows = split_preference_data(rows, eval_fraction, seed)

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(base_model), max_length)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat_template=True but the tokenizer of {str(base_model)!r} has no chat template")
    torch.manual_seed(seed)  # the new score head is initialised from the global generator
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=1, dtype=torch.float32, use_safetensors=True
    )
    # Sequence classifiers pool at the last non-pad token, so the config must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)

    acc_kw = dict(batch_size=batch_size, max_length=max_length, chat_template=chat_template, device=device)
    acc_before = preference_accuracy(model, tokenizer, eval_rows, **acc_kw)
    log(f"reward model: {len(train_rows)} train / {len(eval_rows)} eval pairs, held-out accuracy before {acc_before:.3f}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    step, t0 = 0, time.perf_counter()
    epoch_loss = math.nan
    for epoch in range(epochs):
        order = torch.randperm(len(train_rows), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), batch_size):
            batch = [train_rows[i] for i in order[start : start + batch_size]]
            r_chosen, r_rejected = pair_rewards(model, tokenizer, batch, max_length=max_length, chat_template=chat_template, device=device)
            loss = -F.logsigmoid(r_chosen - r_rejected).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if log_every and step % log_every == 0:
                log(f"reward model: epoch {epoch} step {step} loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}")
        epoch_loss = sum(losses) / len(losses)
        log(f"reward model: epoch {epoch} mean loss {epoch_loss:.4f}")
    train_time = time.perf_counter() - t0

    acc = preference_accuracy(model, tokenizer, eval_rows, **acc_kw)
    log(f"reward model: held-out accuracy {acc_before:.3f} -> {acc:.3f} ({train_time:.1f}s)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics = {
        "train_loss": epoch_loss,
        "eval_accuracy_before": acc_before,
        "eval_accuracy": acc,
        "n_train": len(train_rows),
        "n_eval": len(eval_rows),
        "train_time_s": train_time,
    }
    (out / "reward_model_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
