"""The sampler's log-probs of the tokens it draws, recorded while `generate` runs."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from tether.core.logprobs import token_logprobs


class SampledLogprobs(LogitsProcessor):
    """Records log pi_sampler(o_t) of each sampled token while `generate` runs, one [B, V] at a time.

    It runs last in the processor chain, so it sees the distribution tokens are drawn from (temperature,
    top-k, top-p applied). At step t it keeps a float32 copy of the scores; at step t+1 the token drawn at t is
    the last column of input_ids, and its log-prob comes from the trainer's own kernel
    (`core.logprobs.token_logprobs`), so that equal logits give bit-for-bit equal log-probs on both sides.
    Asking generate for `output_scores` instead would hold a float [B, T, V] tensor: gigabytes at a real
    vocabulary and long completions.

    Not torch's CPU `log_softmax`: it sums a row's exponentials in float32 lane by lane, and over 49,152 of
    them that sum is off by about 1e-5 relative (SmolLM2-135M, even from float64 logits), where the trainer's
    kernel agrees with float64 to float32's rounding.
    """

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None  # the last step's scores [B, V]
        self.logprobs: list[torch.Tensor] = []

    def _gather(self, tokens_B1: torch.Tensor) -> torch.Tensor:
        return token_logprobs(self.pending.unsqueeze(1), tokens_B1)[:, 0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.logprobs.append(self._gather(input_ids[:, -1:]))
        self.pending = scores.to(torch.float32, copy=True)  # a copy: generate may change its scores after this
        return scores

    def finish(self, completion_BT: torch.Tensor) -> torch.Tensor:
        """Log-probs [B, T] of `completion_BT` (the gather for the last step happens here)."""
        T = completion_BT.shape[1]
        if self.pending is not None and len(self.logprobs) < T:
            self.logprobs.append(self._gather(completion_BT[:, len(self.logprobs):len(self.logprobs) + 1]))
        self.pending = None
        if not self.logprobs:
            return torch.zeros_like(completion_BT, dtype=torch.float32)
        return torch.stack(self.logprobs[:T], 1)
