"""Clipped surrogate cases, aggregation modes (hand-computed), value loss, composite loss."""

import math

import pytest
import torch

from tether.core.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    composite_loss,
    explained_variance,
    policy_loss_clipped,
    policy_loss_clipped_sequence,
    policy_loss_reinforce,
    truncated_is_weight,
    value_loss,
)
from tether.core.registry import get_from_registry

E = math.e


def clipped_case(log_ratios, advantages, **kw):
    """Per-token loss and d loss / d logp for given log-ratios (old logprobs 0)."""
    logp = torch.tensor(log_ratios, dtype=torch.float64, requires_grad=True)
    A = torch.tensor(advantages, dtype=torch.float64)
    loss, stats = policy_loss_clipped(logp[None], torch.zeros(1, len(log_ratios), dtype=torch.float64), A[None],
                                      torch.ones(1, len(log_ratios)), **kw)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    return loss[0].detach(), grad, stats


def test_six_cases_of_the_clip():
    # Columns: A > 0 with r inside / above / below the band, then A < 0 with the same ratios. eps = 0.2.
    r = [0.1, 1.0, -1.0] * 2  # log r: r = e^0.1 (inside [0.8, 1.2]), e (above), 1/e (below)
    A = [2.0] * 3 + [-2.0] * 3
    loss, grad, stats = clipped_case(r, A)
    # loss = -min(rA, clip(r)A); d loss / d log r = r * d loss / dr
    expected_loss = [
        -2 * E**0.1,  # A>0 inside: -rA
        -2 * 1.2,  # A>0 above: ratio e clipped to 1.2, no more credit
        -2 / E,  # A>0 below: min picks rA (unclipped): still pushed up
        2 * E**0.1,  # A<0 inside: -rA
        2 * E,  # A<0 above: min picks rA (unclipped): still pushed down
        2 * 0.8,  # A<0 below: ratio 1/e clipped to 0.8, no more push down
    ]
    expected_grad = [-2 * E**0.1, 0.0, -2 / E, 2 * E**0.1, 2 * E, 0.0]
    torch.testing.assert_close(loss, torch.tensor(expected_loss, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64))
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 6)
    assert stats["dual_clip_frac"].item() == 0.0
    assert stats["ratio_min"].item() == pytest.approx(1 / E)
    assert stats["ratio_max"].item() == pytest.approx(E)
    ratios = torch.tensor(r, dtype=torch.float64).exp()
    assert stats["ratio_mean"].item() == pytest.approx(ratios.mean().item())
    assert stats["approx_kl"].item() == pytest.approx(((ratios - 1) - ratios.log()).mean().item())
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_dual_clip():
    # A = -2, c = 3: the loss -rA = 2r is capped at c|A| = 6 once r > 3.
    loss, grad, stats = clipped_case([1.0, 1.5, -1.0, 1.5], [-2.0, -2.0, -2.0, 2.0], dual_clip=3.0)
    expected_loss = [2 * E, 6.0, 1.6, -2.4]  # r = e < 3 untouched; r = e^1.5 > 3 capped; A > 0 unaffected
    torch.testing.assert_close(loss, torch.tensor(expected_loss, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([2 * E, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_case([0.0], [1.0], dual_clip=0.5)


def test_asymmetric_eps():
    # eps_low = 0.1, eps_high = 0.3: band [0.9, 1.3].
    log_r = [math.log(1.25), math.log(1.35), math.log(0.95), math.log(0.85)]
    loss, grad, stats = clipped_case(log_r, [1.0, 1.0, -1.0, -1.0], eps_low=0.1, eps_high=0.3)
    torch.testing.assert_close(loss, torch.tensor([-1.25, -1.3, 0.95, 0.9], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([-1.25, 0.0, 0.95, 0.0], dtype=torch.float64))
    assert stats["clip_frac_high"].item() == pytest.approx(0.25)
    assert stats["clip_frac_low"].item() == pytest.approx(0.25)


def test_clipped_equals_reinforce_gradient_at_old_policy():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    A = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    grads = {}
    for name in ("reinforce", "clipped", "clipped_sequence"):
        loss_BT, _ = POLICY_LOSSES[name](
            logprobs_BT=logp, old_logprobs_BT=logp.detach(), advantages_BT=A, response_mask_BT=mask, dual_clip=2.0
        )
        (grads[name],) = torch.autograd.grad(aggregate(loss_BT, mask, "seq_mean_token_mean"), logp)
    torch.testing.assert_close(grads["clipped"], grads["reinforce"], rtol=0, atol=1e-15)
    torch.testing.assert_close(grads["clipped_sequence"], grads["reinforce"], rtol=0, atol=1e-15)


def test_sequence_ratio_is_gspo():
    # Hand example: row 0 has log ratios [0.1, 0.3] -> s = e^0.2 = 1.22 > 1.2 with A > 0: clipped for every
    # token. Row 1 has log ratios [0.05, -0.05, 0] -> s = 1: inside, each token gets its own gradient -A.
    logp = torch.tensor([[0.1, 0.3, 0.0], [0.05, -0.05, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    A = torch.tensor([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0]], dtype=torch.float64)
    loss, stats = policy_loss_clipped_sequence(logp, torch.zeros_like(logp), A, mask)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.2, -1.2, 0.0], [2.0, 2.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], dtype=torch.float64))
    assert stats["clip_frac_high"].item() == pytest.approx(2 / 5)

    # Random data: the gradient equals that of GSPO's sequence objective mean_i -min(s_i A_i, clip(s_i) A_i).
    g = torch.Generator().manual_seed(3)
    logp = (0.3 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    old = torch.zeros(6, 5, dtype=torch.float64)
    mask = torch.ones(6, 5)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    A_B = torch.randn(6, generator=g, dtype=torch.float64)
    loss_BT, _ = policy_loss_clipped_sequence(logp, old, A_B[:, None].expand(6, 5), mask, eps_low=0.05,
                                              eps_high=0.1)
    (grad,) = torch.autograd.grad(aggregate(loss_BT, mask, "seq_mean_token_mean"), logp)
    s = torch.exp(((logp - old) * mask).sum(1) / mask.sum(1))
    assert ((s < 0.95) | (s > 1.1)).any() and ((s > 0.95) & (s < 1.1)).any()  # both regimes exercised
    gspo = -torch.minimum(s * A_B, s.clamp(0.95, 1.1) * A_B).mean()
    (grad_ref,) = torch.autograd.grad(gspo, logp)
    torch.testing.assert_close(grad, grad_ref)


def test_reinforce_loss_and_registry():
    logp = torch.tensor([[-1.0, -2.0, 5.0]])
    loss, stats = policy_loss_reinforce(logp, torch.tensor([[2.0, 3.0, 4.0]]), torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(loss, torch.tensor([[2.0, 6.0, 0.0]]))
    assert stats == {}
    # The registry entry takes the shared (logprobs, old_logprobs, advantages, mask) signature.
    for args, kw in (((logp, logp + 1, torch.tensor([[2.0, 3.0, 4.0]]), torch.tensor([[1, 1, 0]])), {"eps_low": 0.1}),
                     ((), dict(logprobs_BT=logp, old_logprobs_BT=None, advantages_BT=torch.tensor([[2.0, 3.0, 4.0]]),
                               response_mask_BT=torch.tensor([[1, 1, 0]])))):
        entry_loss, _ = POLICY_LOSSES["reinforce"](*args, **kw)
        torch.testing.assert_close(entry_loss, loss)
    with pytest.raises(ValueError, match="'clipped', 'clipped_sequence', 'reinforce'"):
        get_from_registry(POLICY_LOSSES, "ppo", "policy loss")


# A padded batch: row 0 has 3 tokens, row 1 has 2. Padding holds garbage that must not count.
LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
AGG_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize(
    "mode, kw, expected",
    [
        ("seq_mean_token_mean", {}, (6 / 3 + 9 / 2) / 2),  # row means 2 and 4.5 -> 3.25
        ("token_mean", {}, (6 + 9) / 5),  # 3.0
        ("seq_mean_token_sum", {}, (6 + 9) / 2),  # 7.5
        ("seq_mean_token_sum_norm", {"max_len": 4}, (6 / 4 + 9 / 4) / 2),  # 1.875
    ],
)
def test_aggregation_hand_examples(mode, kw, expected):
    assert aggregate(LOSS, AGG_MASK, mode, **kw).item() == pytest.approx(expected)


def test_aggregation_errors():
    with pytest.raises(ValueError, match="max_len"):
        aggregate(LOSS, AGG_MASK, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="'seq_mean_token_mean', 'seq_mean_token_sum'"):
        aggregate(LOSS, AGG_MASK, "mean")


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 7, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor([7, 2, 5, 1, 6, 3])[:, None]).float()
    full = aggregate(loss, mask, mode, max_len=7)
    glob = dict(num_sequences=6, num_tokens=int(mask.sum()), max_len=7)
    parts = aggregate(loss[:2], mask[:2], mode, **glob) + aggregate(loss[2:], mask[2:], mode, **glob)
    torch.testing.assert_close(parts, full)
    # Tensors work as denominators too (e.g. all-reduced counts), without a host sync.
    glob_t = dict(num_sequences=torch.tensor(6), num_tokens=mask.sum(), max_len=7)
    parts_t = aggregate(loss[:4], mask[:4], mode, **glob_t) + aggregate(loss[4:], mask[4:], mode, **glob_t)
    torch.testing.assert_close(parts_t, full)


def test_value_loss():
    V = torch.tensor([[1.0, 3.0, 1.0, 7.0]], requires_grad=True)
    V_old = torch.tensor([[0.0, 2.75, 2.0, 0.0]])
    R = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(V, V_old, R, mask)
    torch.testing.assert_close(loss, torch.tensor([[0.5, 4.5, 0.0, 0.0]]))
    assert stats["value_clip_frac"].item() == 0.0
    loss, stats = value_loss(V, V_old, R, mask, clip_range=0.5)
    # token 0: max(1, (0 + 0.5 - 0)^2) = 1; token 1: max(9, (2.75 + 0.25)^2) = 9 (a tie: not counted);
    # token 2: V = R but the clipped value 2 - 0.5 = 1.5 is 0.5 off: max(0, 0.25) = 0.25, zero gradient.
    torch.testing.assert_close(loss, torch.tensor([[0.5, 4.5, 0.125, 0.0]]))
    assert stats["value_clip_frac"].item() == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(loss.sum(), V)
    torch.testing.assert_close(grad, torch.tensor([[1.0, 3.0, 0.0, 0.0]]))



def test_value_clip_counts_only_clipped_tokens_not_rounding():
    """Within the clip range the clipped term equals the plain one in exact arithmetic, but V_old + (V - V_old)
    rounds away from V for some float32 values; those tokens are neither counted as clipped nor given the
    rounded term. V, V_old and R below are such a case (the clipped square is larger by one rounding)."""
    V = torch.tensor([[-0.09493295103311539, -0.012849307619035244, 0.07997483760118484]], requires_grad=True)
    V_old = torch.tensor([[0.12692609429359436, -0.2788006663322449, -0.2105245590209961]])
    R = torch.tensor([[-0.8487080335617065, -0.023541858419775963, 0.09669749438762665]])
    mask = torch.ones(1, 3)
    assert ((V_old + (V - V_old) - R).square() > (V - R).square()).all()  # the rounding the test is about
    loss, stats = value_loss(V, V_old, R, mask, clip_range=0.3)
    assert stats["value_clip_frac"].item() == 0.0
    assert torch.equal(loss, 0.5 * (V - R).square())
    loss, stats = value_loss(V, V_old, R, mask, clip_range=0.25)  # token 2: |V - V_old| = 0.29, its clipped term larger
    assert stats["value_clip_frac"].item() == pytest.approx(1 / 3)

def test_composite_loss():
    g = torch.Generator().manual_seed(0)
    terms = {k: torch.randn(3, 4, generator=g) for k in ("policy", "value", "entropy", "kl")}
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    mode = "token_mean"
    agg = {k: aggregate(v, mask, mode) for k, v in terms.items()}
    total, stats = composite_loss(
        policy_loss_BT=terms["policy"], response_mask_BT=mask, aggregation=mode,
        value_loss_BT=terms["value"], value_coef=0.5,
        entropy_BT=terms["entropy"], entropy_coef=0.01,
        kl_BT=terms["kl"], kl_coef=0.1,
    )  # fmt: skip
    expected = agg["policy"] + 0.5 * agg["value"] - 0.01 * agg["entropy"] + 0.1 * agg["kl"]
    torch.testing.assert_close(total, expected)
    for k in ("policy", "value", "entropy", "kl"):
        torch.testing.assert_close(stats[f"loss/{k}"], agg[k])
    torch.testing.assert_close(stats["loss/total"], expected)

    # Coefficient 0 switches a term off but still reports it; None leaves it out entirely.
    total, stats = composite_loss(
        policy_loss_BT=terms["policy"], response_mask_BT=mask, aggregation=mode,
        value_loss_BT=terms["value"], value_coef=0.0, entropy_BT=None, entropy_coef=0.01,
    )  # fmt: skip
    torch.testing.assert_close(total, agg["policy"])
    torch.testing.assert_close(stats["loss/value"], agg["value"])
    assert "loss/entropy" not in stats and "loss/kl" not in stats


def test_composite_loss_gradients_only_through_active_terms():
    p = torch.randn(2, 3, requires_grad=True)
    v = torch.randn(2, 3, requires_grad=True)
    total, _ = composite_loss(policy_loss_BT=p, response_mask_BT=torch.ones(2, 3), aggregation="seq_mean_token_mean",
                              value_loss_BT=v, value_coef=0.0)
    total.backward()
    assert p.grad is not None and v.grad is None


def test_explained_variance():
    R = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    assert explained_variance(R, R, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(R), R, mask).item() == pytest.approx(0.0)
    # V = R + [1, -1, 1, -1, 1, -1]: Var[R - V] = 1.2 (unbiased, n = 6), Var[R] = 3.5
    noise = torch.tensor([[1.0, -1.0, 1.0, 0.0], [-1.0, 1.0, -1.0, 0.0]])
    assert explained_variance(R + noise, R, mask).item() == pytest.approx(1 - 1.2 / 3.5)
    assert math.isnan(explained_variance(R, torch.ones_like(R), mask).item())


@pytest.mark.parametrize("name", ["clipped", "clipped_sequence"])
def test_padded_positions_holding_nan_or_inf_give_the_same_loss_and_gradient(name):
    """What padded positions hold never reaches the loss or its gradient: NaN, -inf and +inf padding give
    exactly the values and gradients of zero padding (the log-probs are masked before exp())."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    logp = torch.randn(2, 5, dtype=torch.float64) * 0.1 - 1
    old = logp + torch.randn(2, 5, dtype=torch.float64) * 0.1
    A = torch.tensor([[0.5] * 5, [-1.0] * 5], dtype=torch.float64)
    results = []
    for fill in (0.0, math.nan, -math.inf, math.inf):
        x = torch.where(mask.bool(), logp, torch.tensor(fill, dtype=torch.float64)).requires_grad_(True)
        o = torch.where(mask.bool(), old, torch.tensor(fill, dtype=torch.float64))
        loss_BT, _ = POLICY_LOSSES[name](x, o, A, mask, eps_low=0.2, eps_high=0.2)
        (grad,) = torch.autograd.grad(loss_BT.sum(), x)
        results.append((loss_BT.detach(), grad))
    assert results[0][1][0, :3].abs().sum() > 0  # the case has a gradient to compare
    for loss_BT, grad in results[1:]:
        assert torch.isfinite(grad).all() and torch.isfinite(loss_BT).all()
        torch.testing.assert_close(loss_BT, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=0)


def test_cispo_keeps_a_gradient_where_the_ppo_clip_has_none():
    """l = -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi. Hand-worked with old log-probs 0 (r = e^logp):
    at r = e^0.5 = 1.65 > 1.2 with A = 1 the weight is 1.2 and d l / d logp = -1.2 (PPO's clip: 0); at
    r = e^-0.1 = 0.905 with A = -2 the weight is r itself, d l / d logp = 2 r."""
    logp = torch.tensor([[0.5, -0.1, 0.0]], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    loss, stats = POLICY_LOSSES["cispo"](logp, torch.zeros_like(logp), A, mask, eps_low=0.2, eps_high=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    r = math.exp(-0.1)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.2 * 0.5, -2.0 * r * 0.1, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[-1.2, 2.0 * r, -3.0]], dtype=torch.float64))
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 3) and stats["clip_frac_low"].item() == 0.0
    ppo_loss, _ = policy_loss_clipped(logp, torch.zeros_like(logp), A, mask)
    (ppo_grad,) = torch.autograd.grad(ppo_loss.sum(), logp)
    assert ppo_grad[0, 0] == 0.0 and grad[0, 0] != 0.0


def test_sapo_gate_values_and_gradients():
    """f(r) = (4/tau) sigmoid(tau (r - 1)); l = -f(r) A; d l / d logp = -A 4 s (1 - s) r with s the sigmoid.
    At r = 1: f = 2 / tau and the gradient is -A (the policy gradient); tau_neg applies where A < 0."""
    logp = torch.tensor([[0.0, 0.0, 0.7, -0.7]], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([[2.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, _ = POLICY_LOSSES["sapo"](logp, torch.zeros_like(logp), A, torch.ones(1, 4), tau_pos=1.0, tau_neg=2.0)
    (grad,) = torch.autograd.grad(loss.sum(), logp)

    def expect(lp, a, tau):
        r = math.exp(lp)
        s = 1 / (1 + math.exp(-tau * (r - 1)))
        return -a * 4 / tau * s, -a * 4 * s * (1 - s) * r

    want = [expect(0.0, 2.0, 1.0), expect(0.0, -1.0, 2.0), expect(0.7, 1.0, 1.0), expect(-0.7, -1.0, 2.0)]
    torch.testing.assert_close(loss.detach()[0], torch.tensor([w[0] for w in want], dtype=torch.float64))
    torch.testing.assert_close(grad[0], torch.tensor([w[1] for w in want], dtype=torch.float64))
    assert loss[0, 0].item() == pytest.approx(-2.0 * 2.0) and grad[0, 0].item() == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="tau_pos, tau_neg > 0"):
        POLICY_LOSSES["sapo"](logp, logp, A, torch.ones(1, 4), tau_pos=0.0)


@pytest.mark.parametrize("name", ["cispo", "sapo"])
def test_new_losses_give_the_policy_gradient_at_the_old_policy(name):
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    A = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    grads = []
    for loss_name in (name, "reinforce"):
        loss_BT, _ = POLICY_LOSSES[loss_name](logp, logp.detach(), A, mask)
        (g_,) = torch.autograd.grad(aggregate(loss_BT, mask, "token_mean"), logp)
        grads.append(g_)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-15)


def test_truncated_is_weight_hand_worked_and_exactly_one_on_policy():
    # pi_prox / pi_behav = 0.5 / 0.25 = 2 (capped at 1.5), 0.25 / 0.5 = 0.5, 0.3 / 0.3 = 1.
    prox = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.3)]], dtype=torch.float64)
    behav = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.3)]], dtype=torch.float64)
    torch.testing.assert_close(truncated_is_weight(prox, behav, 1.5), torch.tensor([[1.5, 0.5, 1.0]],
                                                                                   dtype=torch.float64))
    lp = torch.randn(4, 7) - 2
    assert torch.equal(truncated_is_weight(lp, lp.clone(), 2.0), torch.ones(4, 7))  # exactly, not nearly
    assert not truncated_is_weight(lp.requires_grad_(), lp.detach(), 2.0).requires_grad


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_decoupled_loss_is_the_on_policy_loss_when_behaviour_is_proximal(name):
    """Decoupled PPO with the behaviour policy equal to the proximal one (the sampler ran the very weights the
    trainer updates from): the weighted loss and its gradient are the on-policy ones, bit for bit."""
    torch.manual_seed(0)
    B, T = 3, 5
    logits = torch.randn(B, T, requires_grad=True)
    lp = torch.nn.functional.logsigmoid(logits)  # any differentiable log-probs
    old = lp.detach()  # proximal = the pre-update weights' own forward
    adv, mask = torch.randn(B, T), (torch.rand(B, T) > 0.2).float()
    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=None, tau_pos=1.0, tau_neg=1.05)
    on_policy, _ = POLICY_LOSSES[name](lp, old, adv, mask, **kw)
    decoupled, _ = POLICY_LOSSES[name](lp, old, adv * truncated_is_weight(old, old.clone(), 2.0), mask, **kw)
    (g_on,) = torch.autograd.grad(on_policy.sum(), logits, retain_graph=True)
    (g_dec,) = torch.autograd.grad(decoupled.sum(), logits)
    assert torch.equal(decoupled, on_policy) and torch.equal(g_dec, g_on) and g_on.abs().sum() > 0
