"""A model's forward compiled by torch.compile, installed only while it samples."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.fx.experimental._config as fx_config
from torch import nn


def forward_host(model: nn.Module) -> nn.Module:
    """The module whose `forward` generate's decoding loop calls: the model itself, or under a peft wrapper
    the transformers model inside it (the adapters' layers are part of its forward)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class CompiledForward:
    """`torch.compile` of a model class's forward, installed on one module only while it samples.

    generate's per-token Python (cache bookkeeping, masks, rotary, the layers' small element-wise ops) is
    most of a decode step at batch 32 on CPU; compiled, it is fused around the matmuls (47M model, bf16:
    10-20% off sampling on the two CPUs measured, benchmarks/README.md). dynamic=True: the growing KV
    length and each step's prompt length are symbolic, so the graphs (prefill, one decode step) compile once.
    The forward is swapped in only for the duration of `generate`, so training forwards, the reference and
    checkpoints never see it.
    """

    def __init__(self, backend: str | Callable = "inductor") -> None:
        self.backend = backend
        self._compiled: dict[type, Callable] = {}

    @contextmanager
    def installed(self, model: nn.Module) -> Iterator[None]:
        host = forward_host(model)
        cls = type(host)
        if cls not in self._compiled:
            self._compiled[cls] = torch.compile(cls.forward, dynamic=True, backend=self.backend)
        host.forward = types.MethodType(self._compiled[cls], host)
        try:
            # Without duck shapes, sizes that happen to be equal when a graph is traced (prompt length and
            # batch size, say) are not assumed equal forever, which would recompile when they next differ.
            with fx_config.patch(use_duck_shape=False):
                yield
        finally:
            del host.forward  # back to the class's eager forward
