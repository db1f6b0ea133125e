"""Rollouts: sampling completions from the policy. One small protocol; HF generate and vLLM implement it."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from tether.rollout.batch import Rollout


class RolloutBackend(Protocol):
    def generate(self, rows: list[dict], prompts: list[str], *, group_size: int) -> Rollout:
        """Sample `group_size` completions per prompt; rows are laid out group-contiguously."""
        ...

    def sync_weights(self, policy: nn.Module) -> None:
        """Make the sampler use the policy's current weights (a no-op when it *is* the policy)."""
        ...


__all__ = ["Rollout", "RolloutBackend"]
