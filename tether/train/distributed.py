"""Data parallelism over torch.distributed: who am I, and reductions that make the update rank-invariant.

With one process every method is the identity, so the loop has one code path.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


class Dist:
    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1

    @classmethod
    def from_env(cls, backend: str | None = None) -> "Dist":
        """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a copy; float64 on the wire so large token counts stay exact)."""
        if not self.enabled:
            return x
        y = x.detach().to(torch.float64).clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.dtype)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.MAX)
        return y

    def min(self, x: torch.Tensor) -> torch.Tensor:
        return -self.max(-x)

    def gather_cat(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped 1-D tensors from every rank, in rank order."""
        if not self.enabled:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def shard(self, items: list, group_size: int = 1) -> list:
        """This rank's contiguous share of a globally drawn list, whole groups kept together."""
        if not self.enabled:
            return items
        n = len(items)
        if n % self.world_size:
            raise ValueError(f"{n} prompts per step cannot be split evenly over {self.world_size} ranks")
        k = n // self.world_size
        return items[self.rank * k:(self.rank + 1) * k]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
