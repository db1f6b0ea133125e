"""Accumulating step statistics without a host sync per micro-batch: tensors until the end of the step."""

from __future__ import annotations

import torch


class StatAccumulator:
    """Weighted means, sums, mins and maxes of 0-dim tensors; `.item()` happens once, in `result()`."""

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._weight: dict[str, torch.Tensor] = {}
        self._min: dict[str, torch.Tensor] = {}
        self._max: dict[str, torch.Tensor] = {}

    def mean(self, name: str, value: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        w = torch.as_tensor(weight, dtype=torch.float32)
        v = value.detach().float() * w
        self._sum[name] = self._sum.get(name, 0.0) + v
        self._weight[name] = self._weight.get(name, 0.0) + w

    def minimum(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        self._min[name] = torch.minimum(self._min[name], v) if name in self._min else v

    def maximum(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        self._max[name] = torch.maximum(self._max[name], v) if name in self._max else v

    def result(self) -> dict[str, float]:
        out = {}
        if self._sum:
            keys = list(self._sum)
            means = torch.stack([self._sum[k] / torch.clamp(torch.as_tensor(self._weight[k]), min=1e-12)
                                 for k in keys]).tolist()
            out.update(zip(keys, means))
        for d in (self._min, self._max):
            if d:
                out.update(zip(d.keys(), torch.stack(list(d.values())).tolist()))
        return out
