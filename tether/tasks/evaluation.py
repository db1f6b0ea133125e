"""Batched generation and task accuracy for any causal LM loaded with AutoModelForCausalLM.

Prompts are left-padded by hand (so tokenizers without a pad token work and the caller's tokenizer is
never modified), generation stops at EOS, and only the new tokens are decoded.
"""

from __future__ import annotations

from typing import Any

import torch

from tether.rollout.prompts import render
from tether.tasks.base import Task


def _pad_id(tokenizer) -> int:
    # Padding positions are masked out, so any id works; EOS is the usual stand-in when there is no pad.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot batch or stop generation")
    return pad


def _left_pad(tokenizer, prompts: list[str], device: torch.device,
              chat_template: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    # As the sampler feeds prompts in training (with the chat template: each prompt a user turn).
    rendered = [render(tokenizer, p, chat_template=chat_template) for p in prompts]
    ids = [tokenizer(text, add_special_tokens=special)["input_ids"] for text, special in rendered]
    if any(len(x) == 0 for x in ids):
        raise ValueError("cannot generate from an empty prompt (it tokenizes to nothing)")
    width = max(len(x) for x in ids)
    pad = _pad_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, attention_mask


def _decode_new(tokenizer, new_tokens: torch.Tensor) -> list[str]:
    eos = tokenizer.eos_token_id
    texts = []
    for row in new_tokens.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]  # cut at the first EOS whatever the pad token decodes to
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    temperature: float = 0.0,
    seed: int | None = 0,
    chat_template: bool = False,
) -> list[str]:
    """Completions for `prompts`: greedy when temperature == 0, else plain sampling (no top-k / top-p);
    with `chat_template`, each prompt is a user turn of the tokenizer's chat template.

    Sampling is reproducible given `seed` (the global torch RNG is forked, so callers' streams are not
    disturbed). The model is put in eval mode for the call and its previous mode restored.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; generation could not stop")
    device = next(model.parameters()).device
    sampling = temperature > 0
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        do_sample=sampling,
    )
    # Spell out every sampling knob: a model's generation_config may carry its own defaults (top_k=50...).
    if sampling:
        options.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        options.update(temperature=None, top_k=None, top_p=None)

    was_training = model.training
    model.eval()
    completions: list[str] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                input_ids, attention_mask = _left_pad(tokenizer, prompts[start : start + batch_size], device,
                                                      chat_template)
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
                completions += _decode_new(tokenizer, out[:, input_ids.shape[1] :])
    finally:
        model.train(was_training)
    return completions


def greedy_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Deterministic greedy completions (new text only, special tokens skipped), batched with left padding."""
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def evaluate_task(
    model,
    tokenizer,
    task: Task,
    rows: list[dict],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    temperature: float = 0.0,
    seed: int | None = 0,
    num_examples: int = 5,
    chat_template: bool = False,
) -> dict:
    """Accuracy and mean reward of `model` on `rows` (greedy unless temperature > 0).

    Returns {"accuracy", "n", "mean_reward", "accuracy_by_group" (when rows carry a "group"),
    "examples": the first `num_examples` as {"prompt", "completion", "answer", "correct"}}.
    """
    if not rows:
        raise ValueError("evaluate_task needs at least one row")
    for i, row in enumerate(rows):
        if "prompt" not in row or "answer" not in row:
            raise ValueError(f"row {i} needs 'prompt' and 'answer' keys, got {sorted(row)}")
    prompts = [row["prompt"] for row in rows]
    completions = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed,
        chat_template=chat_template,
    )
    correct = [task.is_correct(c, row) for c, row in zip(completions, rows)]
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
    rewards = task.reward(prompts, completions, **columns)

    result: dict[str, Any] = {
        "accuracy": sum(correct) / len(rows),
        "n": len(rows),
        "mean_reward": sum(rewards) / len(rows),
    }
    if all("group" in row for row in rows):
        by_group: dict[str, list[bool]] = {}
        for row, ok in zip(rows, correct):
            by_group.setdefault(row["group"], []).append(ok)
        result["accuracy_by_group"] = {g: sum(v) / len(v) for g, v in sorted(by_group.items())}
    result["examples"] = [
        {"prompt": p, "completion": c, "answer": row["answer"], "correct": ok}
        for p, c, row, ok in list(zip(prompts, completions, rows, correct))[:num_examples]
    ]
    return result


def greedy_sampler(model, tokenizer, *, batch_size: int = 64):
    """A `SampleFn` (rollout/episodes.py) that continues token sequences greedily, for evaluation."""
    from tether.rollout.episodes import Sampled

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = _pad_id(tokenizer)

    def sample(sequences: list[list[int]], max_new_tokens: int) -> list:
        out = []
        for s in range(0, len(sequences), batch_size):
            chunk = sequences[s:s + batch_size]
            width = max(len(x) for x in chunk)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 temperature=None, top_k=None, top_p=None, pad_token_id=pad, eos_token_id=eos)
            for row in gen[:, width:].tolist():
                ended = eos in row
                row = row[:row.index(eos) + 1] if ended else row
                out.append(Sampled(row, [0.0] * len(row), ended))
        return out

    return sample


@torch.no_grad()
def evaluate_episodes(model, tokenizer, task, rows: list[dict], *, max_turns: int, max_tokens: int,
                      max_new_tokens: int, chat_template: bool = False, system_prompt: str | None = None,
                      options: dict | None = None, num_examples: int = 5) -> dict:
    """Greedy episodes of `task`'s environment on `rows`: {"accuracy" (the share of episodes the task counts
    a success), "n", "mean_reward", "turns_mean", "tool_calls_mean", "examples" (conversations)}."""
    from tether.envs.loading import load_environment_factory
    from tether.rollout.episodes import ChatFormat, EpisodeRunner, PlainFormat

    make_env = load_environment_factory(task.environment, options)
    tools = getattr(make_env(), "schemas", None)
    fmt = ChatFormat(tokenizer, system_prompt=system_prompt, tools=tools) if chat_template else PlainFormat(tokenizer)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    runner = EpisodeRunner(make_env, fmt, tokenizer, max_turns=max_turns, max_tokens=max_tokens,
                           max_new_tokens=max_new_tokens, context_window=context, env_name=task.environment)
    was_training = model.training
    model.eval()
    try:
        episodes = runner.run(rows, greedy_sampler(model, tokenizer))
    finally:
        model.train(was_training)
    rewards = [sum(r for _, r in e.rewards) for e in episodes]
    n = len(episodes)
    return {
        "accuracy": sum(task.is_success(r) for r in rewards) / n, "n": n, "mean_reward": sum(rewards) / n,
        "turns_mean": sum(e.counts["turns"] for e in episodes) / n,
        "tool_calls_mean": sum(e.counts["tool_calls"] for e in episodes) / n,
        "examples": [{"conversation": e.conversation, "reward": r, "answer": e.row.get("answer")}
                     for e, r in list(zip(episodes, rewards))[:num_examples]],
    }
