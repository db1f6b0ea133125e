"""Chunked log-probs / entropy / exact KL against the naive float32 computation and torch.distributions."""

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from tether.core.logprobs import entropy_from_logits, full_kl_from_logits, logprobs_and_entropy, token_logprobs

B, T, V = 3, 5, 11
# 15 rows in all, 10 under the ragged mask: chunk sizes that divide neither, both, one, and exceed N.
CHUNKS = [1, 4, 5, 15, 4096]


def ragged_mask() -> torch.Tensor:
    return torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float32)


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    ref = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    tokens = torch.randint(V, (B, T), generator=g)
    return logits, ref, tokens


def naive_logprobs_entropy(logits, tokens, temperature, mask):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, tokens[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    if mask is not None:
        lp, ent = lp * mask, ent * mask
    return lp, ent


def naive_kl(logits, ref, temperature, mask):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    logq = torch.log_softmax(ref.float() / temperature, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl if mask is None else kl * mask


def tol(dtype):
    # Gradient tolerances. float32: same math, different operation order (the exact check is the float64
    # gradcheck below). bf16: float32 gradients rounded to bf16 once by both, so at most ~1 bf16 ulp apart.
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy_match_naive(dtype, use_mask, chunk_size, temperature):
    logits, _, tokens = inputs(dtype)
    mask = ragged_mask() if use_mask else None
    w_lp, w_ent = torch.randn(B, T), torch.randn(B, T)  # arbitrary upstream gradients

    x = logits.clone().requires_grad_()
    lp, ent = logprobs_and_entropy(x, tokens, temperature=temperature, mask_BT=mask, chunk_size=chunk_size)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()

    y = logits.clone().requires_grad_()
    lp_ref, ent_ref = naive_logprobs_entropy(y, tokens, temperature, mask)
    ((lp_ref * w_lp).sum() + (ent_ref * w_ent).sum()).backward()

    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-5)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), y.grad.float(), **tol(dtype))

    # The single-output wrappers agree with the joint pass, and their own gradients are right too.
    for fn, naive_out, w in (
        (lambda z: token_logprobs(z, tokens, temperature=temperature, mask_BT=mask, chunk_size=chunk_size), 0, w_lp),
        (lambda z: entropy_from_logits(z, temperature=temperature, mask_BT=mask, chunk_size=chunk_size), 1, w_ent),
    ):
        x1, y1 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        out = fn(x1)
        (out * w).sum().backward()
        (naive_logprobs_entropy(y1, tokens, temperature, mask)[naive_out] * w).sum().backward()
        torch.testing.assert_close(out, (lp, ent)[naive_out])
        torch.testing.assert_close(x1.grad.float(), y1.grad.float(), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_kl_matches_naive(dtype, use_mask, chunk_size, temperature):
    logits, ref, _ = inputs(dtype)
    mask = ragged_mask() if use_mask else None
    w = torch.randn(B, T, generator=torch.Generator().manual_seed(2))
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    kl = full_kl_from_logits(x, ref, temperature=temperature, mask_BT=mask, chunk_size=chunk_size)
    (kl * w).sum().backward()
    kl_ref = naive_kl(y, ref, temperature, mask)
    (kl_ref * w).sum().backward()
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-5)
    # d KL / d z_v = w p_v (log p_v - log q_v - KL) / T: a difference of terms as large as |log p - log q|, each
    # rounded in float32 in another order by the two computations, so they may differ by a few float32 ulps of
    # that size (measured up to 1.7e-5 with |log p - log q| near 30 at T = 0.7), not of the gradient's.
    if dtype == torch.float32:
        logp, logq = (torch.log_softmax(z.double() / temperature, -1) for z in (logits, ref))
        scale = (logp - logq).abs().max().item() * w.abs().max().item() / temperature
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=8 * torch.finfo(torch.float32).eps * scale)
    else:
        torch.testing.assert_close(x.grad.float(), y.grad.float(), **tol(dtype))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_kl_and_entropy_match_torch_distributions(temperature):
    logits, ref, _ = inputs(torch.float64, seed=1)
    p, q = Categorical(logits=logits / temperature), Categorical(logits=ref / temperature)
    torch.testing.assert_close(full_kl_from_logits(logits, ref, temperature=temperature), kl_divergence(p, q))
    torch.testing.assert_close(entropy_from_logits(logits, temperature=temperature), p.entropy())
    tokens = torch.randint(V, (B, T))
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=temperature), p.log_prob(tokens))


def test_gradcheck_float64():
    logits, ref, tokens = inputs(torch.float64, seed=2)
    mask = ragged_mask()
    x = logits.requires_grad_()
    for temperature in (1.0, 0.7):
        for m in (None, mask):
            kw = dict(temperature=temperature, mask_BT=m, chunk_size=4)
            assert torch.autograd.gradcheck(lambda z: logprobs_and_entropy(z, tokens, **kw), (x,))
            assert torch.autograd.gradcheck(lambda z: token_logprobs(z, tokens, **kw), (x,))
            assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, **kw), (x,))
            assert torch.autograd.gradcheck(lambda z: full_kl_from_logits(z, ref, **kw), (x,))


def test_masked_rows_are_not_computed():
    # nan logits on padding would poison any computation that touched them: outputs and grads stay clean.
    logits, ref, tokens = inputs(torch.float32, seed=3)
    mask = ragged_mask()
    logits[mask == 0] = float("nan")
    ref[mask == 0] = float("nan")
    x = logits.requires_grad_()
    lp, ent = logprobs_and_entropy(x, tokens, mask_BT=mask.bool(), chunk_size=3)
    kl = full_kl_from_logits(x, ref, mask_BT=mask, chunk_size=3)
    for out in (lp, ent, kl):
        assert torch.isfinite(out).all()
        assert (out[mask == 0] == 0).all()
    (lp.sum() + ent.sum() + kl.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[mask == 0] == 0).all()


def test_reference_gets_no_gradient():
    logits, ref, _ = inputs(torch.float32, seed=4)
    x, r = logits.requires_grad_(), ref.requires_grad_()
    full_kl_from_logits(x, r).sum().backward()
    assert x.grad is not None and r.grad is None


def test_non_contiguous_logits_and_minus_inf():
    # The usual call site slices model output (logits[:, :-1]); vocab entries at -inf must not produce nan.
    full, _, tokens = inputs(torch.float32, seed=5)
    full = torch.cat([full, torch.randn(B, 1, V)], dim=1)
    full[..., 0] = float("-inf")
    tokens = tokens.clamp(min=1)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    x, y = logits.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    lp, ent = logprobs_and_entropy(x, tokens, chunk_size=4)
    kl = full_kl_from_logits(x, torch.flip(logits, dims=[-1]).roll(1, dims=-1), chunk_size=4)
    (lp.sum() + ent.sum() + kl.sum()).backward()
    assert torch.isfinite(torch.stack([lp, ent, kl])).all() and torch.isfinite(x.grad).all()
    lp_ref, ent_ref = (Categorical(logits=y).log_prob(tokens), Categorical(logits=y).entropy())
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(ent, ent_ref)
    (lp_ref.sum() + ent_ref.sum()).backward()
    x2 = logits.detach().clone().requires_grad_()
    lp2, ent2 = logprobs_and_entropy(x2, tokens, chunk_size=4)
    (lp2.sum() + ent2.sum()).backward()
    torch.testing.assert_close(x2.grad, y.grad)


def test_bad_shapes_raise():
    logits, _, tokens = inputs(torch.float32)
    with pytest.raises(ValueError, match="B, T, V"):
        token_logprobs(logits[0], tokens[0])
    with pytest.raises(ValueError, match="does not match"):
        token_logprobs(logits, tokens[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, tokens, temperature=0.0)


def test_default_chunk_fits_a_16_mib_float32_buffer():
    """Chunks small enough to be reused from the heap (under glibc's mmap threshold), at most 1024 rows."""
    from tether.core.logprobs import CHUNK_BYTES, default_chunk_size

    assert CHUNK_BYTES == 16 << 20
    assert default_chunk_size(49152) == 85 and default_chunk_size(151936) == 27  # SmolLM2's, Qwen's vocabularies
    assert default_chunk_size(104) == 1024 and default_chunk_size(10**8) == 1
    for v in (11, 4097, 32000, 49152, 151936):
        assert default_chunk_size(v) * v * 4 <= CHUNK_BYTES or default_chunk_size(v) == 1
    logits, _, tokens = inputs(torch.float32)
    lp_default, ent_default = logprobs_and_entropy(logits, tokens)
    lp_rows, ent_rows = logprobs_and_entropy(logits, tokens, chunk_size=1)
    assert torch.equal(lp_default, lp_rows) and torch.equal(ent_default, ent_rows)  # rows are independent
