"""Exact log-probs under top-k / top-p sampling: the trainer evaluates the truncated, renormalised
distribution the sampler drew from, so the first ratio is 1 and KL estimates are unbiased (checked by exact
enumeration on a tiny two-step policy)."""

import itertools
import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from tether.core.kl import KL_ESTIMATORS
from tether.core.logprobs import logprobs_and_entropy, truncation_keep

B, T, V = 3, 4, 13


def hf_warped(z, top_k, top_p):
    """z after transformers' own warpers, in the sampler's order (top-k, then top-p)."""
    flat = z.reshape(-1, z.shape[-1])
    if top_k > 0:
        flat = TopKLogitsWarper(top_k)(None, flat)
    if top_p < 1.0:
        flat = TopPLogitsWarper(top_p)(None, flat)
    return flat.reshape(z.shape)


SETTINGS = [(0, 0.9), (0, 0.5), (4, 1.0), (4, 0.7), (1, 1.0), (0, 1e-6)]


@pytest.mark.parametrize("top_k, top_p", SETTINGS)
def test_kept_set_is_the_samplers(top_k, top_p):
    z = 2 * torch.randn(B, T, V, generator=torch.Generator().manual_seed(top_k))
    keep = truncation_keep(z, top_k=top_k, top_p=top_p)
    assert torch.equal(keep, torch.isfinite(hf_warped(z, top_k, top_p)))
    assert keep.any(-1).all()  # the most probable token always stays
    assert truncation_keep(z) is None


@pytest.mark.parametrize("top_k, top_p", SETTINGS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_truncated_logprobs_entropy_and_gradients_match_the_warped_softmax(top_k, top_p, temperature):
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(B, T, V, generator=g)
    z = logits / temperature
    # Tokens the sampler could have drawn (inside the kept set), and two that an update pushed out of it.
    warped = hf_warped(z, top_k, top_p)
    tokens = torch.multinomial(warped.softmax(-1).reshape(-1, V), 1, generator=g).reshape(B, T)
    outside = (~torch.isfinite(warped[0, 0])).nonzero()
    if len(outside):
        tokens[0, 0] = outside[0, 0]
    w_lp, w_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    x = logits.clone().requires_grad_()
    lp, ent = logprobs_and_entropy(x, tokens, temperature=temperature, top_k=top_k, top_p=top_p, chunk_size=5)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()

    y = logits.clone().requires_grad_()
    keep = torch.isfinite(hf_warped(y.detach() / temperature, top_k, top_p))
    keep.scatter_(-1, tokens[..., None], True)  # the sampled token is kept (module docstring)
    logp = torch.log_softmax((y / temperature).masked_fill(~keep, float("-inf")), -1)
    ref_lp = logp.gather(-1, tokens[..., None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp.masked_fill(~keep, 0.0)).sum(-1)
    ((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum()).backward()

    # float32, the same operations in another order: a few ulps of log-probs of magnitude <= ~10.
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(x.grad).all() and (x.grad[~keep] == 0).all()


def test_truncated_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    tokens = logits.argmax(-1)  # always kept, away from the set's edge
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: logprobs_and_entropy(z, tokens, top_p=0.8, top_k=5, chunk_size=2), (x,))


# A tiny two-step policy over V = 5 tokens: step-1 logits, and step-2 logits that depend on the first token.
def tiny_policy(seed):
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(5, generator=g, dtype=torch.float64), 1.5 * torch.randn(5, 5, generator=g,
                                                                                     dtype=torch.float64)


def test_top_p_kl_estimate_is_unbiased_by_enumeration():
    """Sequences of two tokens sampled with top-p 0.9 from pi (the sampler) against a reference pi_ref. The
    sequence KL of the policy that sampled, KL(pi_K || pi_ref) = E_{o ~ pi_K}[sum_t log pi_K - log pi_ref], is
    what the k1 estimator on tether's truncated log-probs must average to; the full-softmax log-probs (what a
    trainer that ignores the truncation computes) are off by E[sum_t log S_t], S_t the kept mass."""
    top_p = 0.9
    first, second = tiny_policy(0)
    ref_first, ref_second = tiny_policy(1)

    def trunc_logp(z, tok):  # tether's log-prob of tok under the truncated distribution (batch of one)
        return logprobs_and_entropy(z.view(1, 1, -1), torch.tensor([[tok]]), top_p=top_p,
                                    with_entropy=False)[0].item()

    exact_kl = mean_k1 = mean_k1_full = mean_log_s = 0.0
    for a, b in itertools.product(range(5), repeat=2):
        zs = (first, second[a])
        q = [torch.log_softmax(ref_first, -1)[a].item(), torch.log_softmax(ref_second[a], -1)[b].item()]
        sampler = [torch.log_softmax(hf_warped(z, 0, top_p), -1)[t].item() for z, t in zip(zs, (a, b))]
        prob = math.exp(sum(sampler))  # the sampler's probability of the sequence (0 outside the kept sets)
        if prob == 0.0:
            continue
        trainer = [trunc_logp(z, t) for z, t in zip(zs, (a, b))]
        full = [torch.log_softmax(z, -1)[t].item() for z, t in zip(zs, (a, b))]
        assert trainer == pytest.approx(sampler, abs=1e-12)  # the ratio at theta_old is exactly 1
        exact_kl += prob * (sum(sampler) - sum(q))
        k1 = KL_ESTIMATORS["k1"]
        mean_k1 += prob * k1(torch.tensor(trainer, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)).sum()
        mean_k1_full += prob * k1(torch.tensor(full, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)).sum()
        mean_log_s += prob * sum(f - s for f, s in zip(full, sampler))
    print(f"exact KL {exact_kl:.6f}, tether's k1 mean {float(mean_k1):.6f}, full-softmax k1 mean "
          f"{float(mean_k1_full):.6f} (E[sum log S] = {mean_log_s:.6f})")
    assert mean_k1 == pytest.approx(exact_kl, abs=1e-10)
    # Before the fix: biased by the expected log kept mass (negative), which this policy makes sizeable.
    assert mean_log_s < -0.05
    assert mean_k1_full == pytest.approx(exact_kl + mean_log_s, abs=1e-10)
