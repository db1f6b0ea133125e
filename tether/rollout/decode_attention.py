"""Attention for one-token decode steps on CPU: two small matmuls instead of SDPA's flash kernel.

During sampling every decode step attends one new query token per row to the KV cache. On a CPU without AMX
(AMD EPYC Zen 4 measured), PyTorch's flash-attention kernel, which SDPA picks for bf16 and fp32, spends
0.6-1.2 ms per layer on that at batch 32, 8 heads and up to 88 cached positions: 40% of a 47M-parameter
model's sampling time. Written as `q @ k^T`, a softmax and `p @ v`, all in float32, with the query heads of
each KV head stacked as rows so that grouped-query attention needs no copy of K and V, the step costs a
quarter of that, and sampling a fifth to a third less (benchmarks/README.md). On a Xeon with AMX the flash
kernel was the faster one (sampling 5% slower with matmuls), hence `speedups.use_matmul_decode("auto")`.

It is registered with transformers' attention interface under `NAME`, with SDPA's mask function, on first use
(`registered`: those are transformers internals, guarded), and installed on a model only while it samples
(`installed`): prompts and every training forward (query length
above one) still go to SDPA, whose memory stays linear in the sequence length. Models on another attention
implementation (eager, flash-attention, flex) are left alone, as are GPU tensors, where SDPA's decode kernels
are fast.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger("tether")

NAME = "tether_sdpa_matmul_decode"

# Keyword arguments some architectures pass that the matmul path does not implement (logit soft-capping,
# attention sinks, additive position biases): with any of them set, SDPA (or its error) handles the call.
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def matmul_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, Q, D], key/value [B, Hkv, S, D], mask [B, 1, Q, S]
    (bool: True attends; or additive float) or None; returns ([B, Q, H, D], None).

    One query token on CPU takes the matmul path; anything else goes to transformers' SDPA function.
    """
    B, H, Q, D = query.shape
    if (Q != 1 or query.device.type != "cpu" or (dropout and module.training)
            or any(kwargs.get(k) is not None for k in _UNSUPPORTED)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    Hkv = key.shape[1]
    scale = scaling if scaling is not None else D**-0.5
    # Query heads h = kv * G + g share KV head kv (repeat_kv's order): stack a KV head's G queries as rows.
    q = query.reshape(B, Hkv, H // Hkv, D)
    # In float32, whatever the cache's dtype: bf16 batched matmuls on CPU go through a oneDNN primitive per
    # shape, and the cached length grows every step: measured twice as slow, with ~100 MiB of primitives.
    scores = torch.matmul(q.float(), key.float().transpose(-1, -2)).mul_(scale)  # [B, Hkv, G, S]
    if attention_mask is not None:  # [B, 1, 1, S]: broadcasts over the KV heads and their G queries
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores = scores.add_(attention_mask)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.float()).to(query.dtype)  # [B, Hkv, G, D]
    return out.reshape(B, 1, H, D), None


@functools.cache
def registered() -> bool:
    """Register the matmul path with transformers' attention and mask interfaces, once, on first use. These
    are transformers internals: if a release moves them, this speed-up is off (a warning) and sampling runs
    on the model's own attention; nothing else breaks."""
    global sdpa_attention_forward
    try:
        from transformers import AttentionInterface
        from transformers.integrations import sdpa_attention
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        sdpa_attention_forward = sdpa_attention.sdpa_attention_forward
        AttentionInterface.register(NAME, matmul_decode_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        return True
    except (ImportError, AttributeError, TypeError) as e:
        log.warning("rollout.decode_attention: transformers' attention interface is not where it was (%s); "
                    "decode steps use the model's own attention", e)
        return False


sdpa_attention_forward = None  # transformers' SDPA path, for the calls the matmul path hands on (set below)
registered()  # at import, guarded: a missing internal turns this speed-up off, never the import


@contextmanager
def installed(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Route `model`'s attention through `matmul_decode_attention` for the duration of the block, if it is on
    SDPA; its config's implementation is restored on exit (it is never saved: transformers drops it)."""
    config = getattr(model, "config", None)
    if (not enabled or config is None or getattr(config, "_attn_implementation", None) != "sdpa"
            or not registered()):
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
