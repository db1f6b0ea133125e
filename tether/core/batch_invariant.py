"""Batch-invariant float32 forwards: every number a token gets is independent of the batch it runs in, of
its padding, and of whether its keys and values come from a KV cache or from the same forward.

Why: the sampler draws a token from a one-row cached decode step; the trainer scores it in a forward over the
whole sequence. In float32 the two sum the same products in different orders (another matmul kernel for
one row than for a thousand, attention split into other blocks), so log pi_sampler and log pi_trainer differ
by the rounding of a deep forward: up to 3e-5 per token on SmolLM2-135M, where float64 gives 4e-6. RL then
trains a little off-policy without meaning to (Yao et al. 2025, "Your efficient RL framework secretly brings
you off-policy RL training"; He et al. 2025, "Defeating nondeterminism in LLM inference", whose
batch-invariant kernels vLLM and SGLang ship). With this mode on in both, they are bit for bit equal.

How, without kernels of our own: the two reductions whose order depends on the batch are computed so that
their order no longer matters.
- Linear layers: y = x W^T + b with each product x_k w_k taken exactly (two float32 mantissas of 24 bits fit
  float64's 53) and summed in float64, then rounded once to float32. Summing K products in any order moves
  the float64 sum by at most ~K * 2^-53 of its terms' size, a billionth of a float32 ulp, so every order
  rounds to the same float32 except in the rare case of a sum within that distance of a rounding boundary.
- Attention: softmax(q k^T * scale + mask) v in float64, rounded once to float32. Masked keys (padding, the
  future) weigh exactly 0, so a row's result does not depend on how many there are.
Everything else in a decoder (norms, activations, rotary embeddings, residual adds) works row by row, element
by element, in an order that does not depend on the batch; so does the log-softmax, provided both sides call
the same one (the sampler's recorder calls the trainer's, core/logprobs.py).

The cost: float64 matmuls, about twice float32's time on CPU (half as many lanes per vector register), and
with `cache_weights` a float64 copy of every weight it multiplies, twice the float32 weights' size, kept
while the mode is on. The backward stays plain float32:
gradients need no invariance. Only float32 calls change; other dtypes pass through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class _Float64SumLinear(torch.autograd.Function):
    """y = x W^T + b, products exact and summed in float64, rounded once; the backward in float32."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, weight64: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = torch.matmul(x.double(), weight64.t())
        if bias is not None:
            y = y.add_(bias.double())
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = g.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w = g2.t().matmul(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, weight64: Tensor | None = None) -> Tensor:
    """`F.linear` whose every output element is round_f32(sum_k x_k w_k in float64): the same float32 for a
    row whatever else is in the batch. `weight64`: `weight` already in float64 (see `BatchInvariant`)."""
    if weight64 is None:
        weight64 = weight.detach().double()
    return _Float64SumLinear.apply(x, weight, bias, weight64)


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """`F.scaled_dot_product_attention`'s contract, computed in float64 and rounded once to the query's dtype.

    query [..., Hq, L, E], key/value [..., Hkv, S, E]; Hq a multiple of Hkv (query head h reads KV head
    h // (Hq / Hkv), as SDPA's `enable_gqa` and transformers' repeat_kv). attn_mask: bool (True attends) or
    additive, broadcast to [..., Hq, L, S]; is_causal: query i attends keys j <= i (top-left aligned, as
    SDPA). A query with no key to attend gets zeros, not NaN.
    """
    if dropout_p:
        raise ValueError(f"batch-invariant attention has no dropout (got dropout_p={dropout_p}); "
                         "set the model's attention dropout to 0")
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    if key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    scores = torch.matmul(query.double(), key.double().transpose(-1, -2)).mul_(
        scale if scale is not None else 1 / math.sqrt(E))
    keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril_() if is_causal else None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            scores = scores + attn_mask.double()
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a query with every key masked
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (torch.matmul(weights, value.double()) / total).to(query.dtype)


class BatchInvariant(TorchFunctionMode):
    """While active, float32 `F.linear` and `F.scaled_dot_product_attention` calls run as `linear` and
    `attention` above; every other call (and every other dtype) runs as it would.

    `cache_weights`: keep the float64 copy of each weight for the mode's lifetime (refreshed when the weight
    changes in place), for many calls on fixed weights (sampling: one copy per generate call instead of one
    per decode step). Off, each call converts its weight, which a forward over many rows hardly notices.
    """

    def __init__(self, cache_weights: bool = False):
        super().__init__()
        self.cache_weights = cache_weights
        self._weights64: dict[int, tuple[Tensor, int, Tensor]] = {}

    def weight64(self, weight: Tensor) -> Tensor:
        if not self.cache_weights:
            return weight.detach().double()
        hit = self._weights64.get(id(weight))
        if hit is not None and hit[0] is weight and hit[1] == weight._version:
            return hit[2]
        copy = weight.detach().double()
        self._weights64[id(weight)] = (weight, weight._version, copy)
        return copy

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_args(*args, **kwargs)
            if x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
                return linear(x, weight, bias, weight64=self.weight64(weight))
        elif func is F.scaled_dot_product_attention and args[0].dtype == torch.float32:
            return attention(*args, **kwargs)
        return func(*args, **kwargs)


def _linear_args(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple:
    return input, weight, bias


@contextmanager
def batch_invariant(enabled: bool = True, *, cache_weights: bool = False) -> Iterator[None]:
    """`BatchInvariant` for the block if `enabled`, else nothing."""
    with BatchInvariant(cache_weights) if enabled else nullcontext():
        yield
