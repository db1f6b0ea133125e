"""Batch-invariant float32 forwards (core/batch_invariant.py): hand-worked sums, the SDPA contract, and the
invariance itself (a row's numbers whatever else is in its batch, its padding, or a KV cache)."""

import pytest
import torch
import torch.nn.functional as F

from tether.core.batch_invariant import BatchInvariant, attention, batch_invariant, linear


def test_linear_sums_exact_products_in_float64_and_rounds_once():
    """1 + 2^-30 - 1: float32 accumulation loses the 2^-30 in any order that adds it to 1 first; the exact
    products summed in float64 keep it, and 2^-30 is a float32. The bias adds in float64 too."""
    x = torch.tensor([[1.0, 1.0, 1.0]])
    w = torch.tensor([[1.0, 2.0**-30, -1.0], [3.0, 0.5, 0.25]])
    y = linear(x, w, torch.tensor([0.0, 2.0**-40]))
    assert y.dtype == torch.float32
    assert y[0, 0].item() == 2.0**-30
    assert y[0, 1].item() == 3.75  # 3.75 + 2^-40 rounds to 3.75 in float32


def test_linear_row_is_the_same_in_any_batch_and_backward_is_float32_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 576, generator=g)
    b = torch.randn(300, generator=g)
    x = torch.randn(5, 37, 576, generator=g)
    full = linear(x, w, b)
    for row in ((0, 0), (3, 17), (4, 36)):
        alone = linear(x[row][None], w, b)[0]
        assert torch.equal(alone, full[row])
    assert torch.equal(linear(x[2:3, :9], w, b), full[2:3, :9])
    # Within float32 of the plain layer (K = 576 products of unit-variance terms: sums of size ~sqrt(576) =
    # 24 carry float32 rounding ~ 576 * 2^-24 * 24 ~ 1e-3 at worst), and exactly the float64 sum rounded.
    want = (x.double() @ w.double().t() + b.double()).float()
    assert torch.equal(full, want)
    assert (full - F.linear(x, w, b)).abs().max() < 1e-3

    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    gy = torch.randn(full.shape, generator=g)
    (linear(xs, ws, bs) * gy).sum().backward()
    (F.linear(xr, wr, br) * gy).sum().backward()
    # The same float32 products summed in another order: relative to the sums' size, a few ulps of K terms.
    for got, want, K in ((xs.grad, xr.grad, 300), (ws.grad, wr.grad, 185), (bs.grad, br.grad, 185)):
        scale = want.abs().max().item()
        assert (got - want).abs().max() <= K * 2**-24 * scale


def naive_attention(q, k, v, keep):
    """softmax(q k^T / sqrt(E)) v in float64 with a bool mask [L, S] or [B, 1, L, S]."""
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


def test_attention_matches_sdpa_contract_causal_masks_gqa():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 5, 16, generator=g)
    k, v = torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    k6, v6 = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)  # query head h reads KV head h // 3
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    want = naive_attention(q, k6, v6, causal).float()
    tol = 4 * 2**-24  # float64 to float32: the result's rounding, a few ulps of values of size < 4
    assert (attention(q, k, v, is_causal=True) - want).abs().max() < tol
    assert (attention(q, k6, v6, attn_mask=causal) - want).abs().max() < tol
    additive = torch.zeros(5, 5).masked_fill(~causal, float("-inf"))
    assert (attention(q, k, v, attn_mask=additive, enable_gqa=True) - want).abs().max() < tol
    # And the plain kernel agrees to float32.
    sdpa = F.scaled_dot_product_attention(q, k6, v6, is_causal=True)
    assert (attention(q, k, v, is_causal=True) - sdpa).abs().max() < 1e-5


def test_attention_a_query_with_nothing_to_attend_gets_zeros_and_dropout_is_refused():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    keep = torch.tensor([[True, False, True], [False, False, False]])
    out = attention(q, k, v, attn_mask=keep)
    assert torch.equal(out[0, 0, 1], torch.zeros(4))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="dropout"):
        attention(q, k, v, dropout_p=0.1)


def test_attention_decode_step_and_padding_give_the_full_forward_bits():
    """The sampler's step (the last query against cached keys, behind left padding) and the trainer's causal
    forward give the same float32, bit for bit."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 3, 40, 64, generator=g) for _ in range(3))
    full = attention(q, k, v, is_causal=True)
    for t in (0, 7, 39):
        step = attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1])
        assert torch.equal(step, full[:, :, t:t + 1])
        pad = 13  # left padding: masked keys in front, which weigh exactly 0
        kp = torch.cat([torch.randn(1, 3, pad, 64, generator=g), k[:, :, :t + 1]], 2)
        vp = torch.cat([torch.randn(1, 3, pad, 64, generator=g), v[:, :, :t + 1]], 2)
        keep = torch.arange(pad + t + 1) >= pad
        assert torch.equal(attention(q[:, :, t:t + 1], kp, vp, attn_mask=keep), full[:, :, t:t + 1])


def test_mode_routes_float32_linear_and_sdpa_and_leaves_other_dtypes_alone():
    x = torch.tensor([[1.0, 1.0, 1.0]])
    w = torch.tensor([[1.0, 2.0**-30, -1.0]])
    layer = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    with batch_invariant():
        assert torch._C._is_torch_function_mode_enabled()
        assert layer(x).item() == 2.0**-30
        assert F.linear(x.double(), w.double()).dtype == torch.float64  # passes through
        q = torch.randn(1, 1, 3, 4)
        assert torch.equal(F.scaled_dot_product_attention(q, q, q, is_causal=True),
                           attention(q, q, q, is_causal=True))
    with batch_invariant(enabled=False):
        assert not torch._C._is_torch_function_mode_enabled()


def test_cached_float64_weights_follow_in_place_updates():
    layer = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with BatchInvariant(cache_weights=True) as mode, torch.no_grad():
        before = layer(x)
        assert len(mode._weights64) == 1 and torch.equal(layer(x), before)
        layer.weight.add_(1.0)  # an optimiser step between two calls
        after = layer(x)
    want = (x.double() @ layer.weight.double().t() + layer.bias.double()).float()
    assert torch.equal(after, want) and not torch.equal(after, before)


def test_training_through_the_mode_gets_gradients():
    torch.manual_seed(3)
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with batch_invariant():
        y = layer(x)
        F.scaled_dot_product_attention(y[None, None], y[None, None], y[None, None], is_causal=True).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None and torch.isfinite(x.grad).all()
