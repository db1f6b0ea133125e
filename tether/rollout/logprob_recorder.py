"""The sampler's log-probs of the tokens it draws, recorded while `generate` runs."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class SampledLogprobs(LogitsProcessor):
    """Records log pi_sampler(o_t) of each sampled token while `generate` runs, one [B, V] at a time.

    It runs last in the processor chain, so it sees the distribution tokens are drawn from (temperature,
    top-k, top-p applied). At step t it keeps log_softmax(scores_t); at step t+1 the token drawn at t is
    the last column of input_ids, so only a [B] gather is kept. Asking generate for `output_scores`
    instead would hold a float [B, T, V] tensor: gigabytes at a real vocabulary and long completions.
    """

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.logprobs.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float(), -1)
        return scores

    def finish(self, completion_BT: torch.Tensor) -> torch.Tensor:
        """Log-probs [B, T] of `completion_BT` (the gather for the last step happens here)."""
        T = completion_BT.shape[1]
        if self.pending is not None and len(self.logprobs) < T:
            self.logprobs.append(self.pending.gather(-1, completion_BT[:, len(self.logprobs):len(self.logprobs) + 1])
                                 .squeeze(-1))
        self.pending = None
        if not self.logprobs:
            return torch.zeros_like(completion_BT, dtype=torch.float32)
        return torch.stack(self.logprobs[:T], 1)
