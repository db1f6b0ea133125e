"""The sampler's log-probs of the tokens it draws, recorded while `generate` runs."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class SampledLogprobs(LogitsProcessor):
    """Records log pi_sampler(o_t) of each sampled token while `generate` runs, one [B, V] at a time.

    It runs last in the processor chain, so it sees the distribution tokens are drawn from (temperature,
    top-k, top-p applied). At step t it keeps the float32 scores and their logsumexp; at step t+1 the token
    drawn at t is the last column of input_ids, so only a [B] gather is kept: log p = z_tok - logsumexp(z).
    Asking generate for `output_scores` instead would hold a float [B, T, V] tensor: gigabytes at a real
    vocabulary and long completions.

    Why logsumexp and not `log_softmax`: torch's CPU log_softmax sums a row's exponentials in float32 lane by
    lane, and over 49,152 of them that sum is off by about 1e-5 relative, so every recorded log-prob was off
    by up to 1.3e-5 (SmolLM2-135M, even from float64 logits), while `logsumexp` sums pairwise like the
    trainer's own log-prob kernel (core/logprobs.py) and agrees with float64 to float32's rounding.
    """

    def __init__(self) -> None:
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (scores [B, V], logsumexp [B])
        self.logprobs: list[torch.Tensor] = []

    def _gather(self, tokens_B1: torch.Tensor) -> torch.Tensor:
        z, lse = self.pending
        return z.gather(-1, tokens_B1).squeeze(-1) - lse

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.logprobs.append(self._gather(input_ids[:, -1:]))
        z = scores.to(torch.float32, copy=True)  # one copy: generate may change its scores after this
        self.pending = (z, torch.logsumexp(z, -1))
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
