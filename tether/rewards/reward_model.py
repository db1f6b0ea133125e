"""A learned reward model (a sequence classifier with one output) used as a reward function.

The reward model has its own tokenizer: prompts and completions arrive as text and are re-tokenized, so the
policy and the reward model may use different vocabularies.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
    return resolved


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, max_length: int) -> PreTrainedTokenizerBase:
    """Right padding (so position ids need no fixing), left truncation (the end of the completion is what is
    being judged, so keep it), and a pad token: the EOS token if the tokenizer has none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the reward model's tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    tokenizer.model_max_length = max_length
    return tokenizer


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    *,
    max_length: int,
    chat_template: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenize prompt+completion pairs for a reward model. Without a chat template the texts are simply
    concatenated; with one, the prompt is the user turn and the completion the assistant turn. Shared by
    scoring and `train_reward_model` so both see exactly the same inputs."""
    if chat_template:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
            )
            for p, c in zip(prompts, completions)
        ]
        add_special_tokens = False  # the template already places BOS etc.
    else:
        texts = [p + c for p, c in zip(prompts, completions)]
        add_special_tokens = True
    return tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
        return_tensors="pt",
    )


class RewardModelScorer:
    """Scores (prompt, completion) pairs with a reward model loaded from `path` (a directory written by
    `save_pretrained`, e.g. by `train_reward_model`). Usable directly as a reward function; logs as
    "reward_model".

    The model must be an `AutoModelForSequenceClassification` with `num_labels == 1`. Its tokenizer is loaded
    from the same path; if it has no pad token the EOS token is used, and the model config's `pad_token_id`
    is set to match (sequence classifiers read the score at the last non-pad token, so they need it).
    Weights are loaded from safetensors only; `trust_remote_code` is off unless asked for.

    normalize: keep a running mean/variance of all raw scores seen (Welford, updated with each call's batch
               before it is applied) and return standardised scores.
    clip:      clamp the (normalised) scores to [-clip, clip].
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 16,
        max_length: int = 512,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        chat_template: bool = False,
        normalize: bool = False,
        clip: float | None = None,
        trust_remote_code: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be positive or None, got {clip}")
        from tether.model_sources import resolve_model_source

        path = Path(resolve_model_source(str(path)))  # a .gguf file or builtin: name is imported first
        if not path.is_dir():
            raise ValueError(f"reward model path {str(path)!r} is not a directory")
        # Check the head before loading weights: a causal LM or a multi-class classifier is not a reward model.
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if config.num_labels != 1:
            raise ValueError(
                f"reward model at {str(path)!r} has num_labels={config.num_labels}; a reward model needs exactly "
                f"one output (num_labels=1). Train one with tether.rewards.training.train_reward_model."
            )
        self.tokenizer = prepare_tokenizer(
            AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code), max_length
        )
        if chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"chat_template=True but the tokenizer at {str(path)!r} has no chat template")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat_template = chat_template
        self.normalize = normalize
        self.clip = clip
        self.__name__ = "reward_model"
        # Running statistics of raw scores (Chan et al.'s parallel form of Welford's algorithm).
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @torch.no_grad()
    def raw_scores(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """Unnormalised, unclipped [B] float32 scores, computed in micro-batches of `batch_size`."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        out = []
        for start in range(0, len(prompts), self.batch_size):
            enc = encode_pairs(
                self.tokenizer,
                prompts[start : start + self.batch_size],
                completions[start : start + self.batch_size],
                max_length=self.max_length,
                chat_template=self.chat_template,
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        scores = self.raw_scores(list(prompts), list(completions)).double()
        if self.normalize and len(scores):
            self._update_stats(scores)
            std = math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0
            scores = (scores - self.mean) / max(std, 1e-8)
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores.tolist()

    def _update_stats(self, x: torch.Tensor) -> None:
        n_b = len(x)
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.count * n_b / n
        self.count = n
