"""Linear layers on weights pre-packed for oneDNN while a model samples on CPU.

`F.linear` on CPU hands each call's weight to oneDNN in PyTorch's plain row-major layout, and oneDNN copies
it into its blocked layout before multiplying. At the row counts of sampling (32 rows per decode step) that
copy is a large share of the call: a 47M-parameter Llama's 85 linears took 14-16 ms per decode step in bf16
and 31 ms in float32, against 10-11 and 18 ms on weights packed once (AMD EPYC Zen 4, 2 threads,
benchmarks/README.md). The weights only change between `generate` calls, so `installed` packs every plain
`nn.Linear` on entry (one pass over the weights: ~27 ms for that model) and drops the packed copies on exit.

The packed copy costs the linear weights' size again while sampling. The results are the same matmuls
(float32 accumulation) in another order of summation. Calls that need autograd, run under autocast, or get
an input of another dtype fall back to `F.linear` on the module's own weight. The two operators are PyTorch
internals (the ones Inductor's CPU backend emits for frozen linears): `supported` probes them once per dtype
against `F.linear`, and where they are missing, fail or disagree, every layer keeps `F.linear`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_PACKABLE_DTYPES = (torch.bfloat16, torch.float32)


def probe(dtype: torch.dtype, reorder: Callable, linear: Callable) -> bool:
    """True when `linear(x, reorder(w, rows), b, ...)` runs in `dtype` and agrees with `F.linear` on a small
    case. The oneDNN operators are PyTorch internals (Inductor's CPU backend emits them for frozen linears);
    a build or CPU without them, or a changed signature, makes this False rather than breaking sampling."""
    try:
        g = torch.Generator().manual_seed(0)
        w, b, x = (torch.randn(*shape, generator=g).to(dtype) for shape in ((8, 16), (8,), (2, 3, 16)))
        with torch.no_grad():
            out = linear(x, reorder(w, 2), b, "none", [], "")
            want = F.linear(x, w, b)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        return out.shape == want.shape and torch.allclose(out.float(), want.float(), atol=tol, rtol=tol)
    except Exception:  # an unsupported instruction set, a missing operator, another signature
        return False


@functools.cache
def supported(dtype: torch.dtype) -> bool:
    """Whether layers with `dtype` weights can run packed here (probed once per dtype)."""
    ops = torch.ops.mkldnn
    return (dtype in _PACKABLE_DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
            and probe(dtype, ops._reorder_linear_weight, ops._linear_pointwise))


def _packable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    # Exact nn.Linear: subclasses (quantised layers and the like) have forwards of their own. A forward
    # already set on the instance belongs to someone else (accelerate's offload hooks, say).
    return (type(module) is nn.Linear and "forward" not in module.__dict__
            and type(weight) is nn.Parameter and weight.device.type == "cpu" and weight.layout == torch.strided
            and weight.dim() == 2 and supported(weight.dtype))


def _packed_forward(module: nn.Linear, packed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != packed.dtype or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                or (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))):
            return F.linear(x, module.weight, module.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")
    return forward


@contextmanager
def installed(model: nn.Module, rows: int, enabled: bool = True) -> Iterator[int]:
    """Run `model`'s plain CPU `nn.Linear` layers on packed copies of their weights for the block.

    `rows`: the row count oneDNN picks the layout for (the sampling batch). Yields how many layers were
    packed; each layer gets its class's forward back on exit, whatever happens in the block.
    """
    swapped: list[nn.Module] = []
    try:
        if enabled:
            with torch.no_grad():
                for module in model.modules():
                    if _packable(module):
                        packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), max(rows, 1))
                        module.forward = _packed_forward(module, packed)
                        swapped.append(module)
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
