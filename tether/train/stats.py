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

    def result(self, dist=None) -> dict[str, float]:
        """The statistics as floats. With `dist` (a `Dist` over several ranks) every figure is of the whole
        batch: weighted means from the ranks' summed numerators and weights, minima and maxima over ranks. A
        statistic some rank did not record counts there with weight 0."""
        if dist is not None and dist.enabled:
            return self._reduced(dist)
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

    def _reduced(self, dist) -> dict[str, float]:
        names = dist.gather_objects((sorted(self._sum), sorted(self._min), sorted(self._max)))
        means, mins, maxs = (sorted(set().union(*(n[i] for n in names))) for i in range(3))
        zero = torch.zeros(())
        out: dict[str, float] = {}
        if means:
            sums = torch.stack([torch.as_tensor(self._sum.get(k, zero)).float() for k in means]
                               + [torch.as_tensor(self._weight.get(k, zero)).float() for k in means])
            sums = dist.sum(sums)
            out.update(zip(means, (sums[:len(means)] / sums[len(means):].clamp(min=1e-12)).tolist()))
        for keys, d, sign in ((mins, self._min, -1.0), (maxs, self._max, 1.0)):
            if keys:  # a rank without the figure holds -inf for the max (so the others decide it)
                vals = torch.stack([d[k] * sign if k in d else torch.tensor(float("-inf")) for k in keys])
                out.update(zip(keys, (dist.max(vals) * sign).tolist()))
        return out
