"""KL estimators by exact enumeration over the vocabulary, and the KL coefficient controllers."""

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from tether.core.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_k1, kl_k2, kl_k3
from tether.core.registry import get_from_registry


def distributions(seed=0, n=4, v=6):
    g = torch.Generator().manual_seed(seed)
    theta = (1.5 * torch.randn(n, v, generator=g, dtype=torch.float64)).requires_grad_()
    ref = 1.5 * torch.randn(n, v, generator=g, dtype=torch.float64)
    return theta, ref


def expectation_under_pi(k, theta, ref):
    """E_{a ~ pi}[k(a)] = sum_a pi(a) k(log pi(a), log pi_ref(a)), exactly, per row."""
    logp, logq = torch.log_softmax(theta, -1), torch.log_softmax(ref, -1)
    return (logp.exp() * k(logp, logq)).sum(-1)


def exact_kl(theta, ref):
    return kl_divergence(Categorical(logits=theta), Categorical(logits=ref))


@pytest.mark.parametrize("seed", range(3))
def test_k1_and_k3_are_unbiased_k2_is_not(seed):
    theta, ref = distributions(seed)
    kl = exact_kl(theta, ref)
    torch.testing.assert_close(expectation_under_pi(kl_k1, theta, ref), kl)
    torch.testing.assert_close(expectation_under_pi(kl_k3, theta, ref), kl)
    # k2 = 0.5 (log r)^2 is a second-order approximation: its expectation differs from KL.
    assert (expectation_under_pi(kl_k2, theta, ref) - kl).abs().max() > 1e-2


def test_expected_gradients_of_estimators_used_as_losses():
    # Samples are drawn from pi, so E_pi[grad k(a)] = sum_a sg(pi(a)) grad k(a): the loss-gradient view.
    theta, ref = distributions(seed=7)

    def expected_grad(k):
        logp, logq = torch.log_softmax(theta, -1), torch.log_softmax(ref, -1)
        (g,) = torch.autograd.grad((logp.exp().detach() * k(logp, logq)).sum(), theta)
        return g

    (grad_kl,) = torch.autograd.grad(exact_kl(theta, ref).sum(), theta)
    (grad_reverse_kl,) = torch.autograd.grad(
        kl_divergence(Categorical(logits=ref), Categorical(logits=theta)).sum(), theta
    )
    torch.testing.assert_close(expected_grad(kl_k1), torch.zeros_like(theta))  # k1: zero in expectation
    torch.testing.assert_close(expected_grad(kl_k2), grad_kl)  # k2: grad KL(pi || ref)
    torch.testing.assert_close(expected_grad(kl_k3), grad_reverse_kl)  # k3: grad KL(ref || pi)


def test_k3_non_negative_and_finite_at_extremes():
    logp = torch.zeros(7)
    ref = torch.tensor([-1000.0, -30.0, -1.0, 0.0, 1.0, 30.0, 1000.0])
    k3 = kl_k3(logp, ref)
    assert torch.isfinite(k3).all() and (k3 >= 0).all()
    assert k3[3] == 0
    # Inside the clamp it is the exact formula: log ratio_ref = +1 -> (e - 1) - 1.
    assert k3[4].item() == pytest.approx(math.e - 2, rel=1e-6)
    # Beyond +-20 it saturates at the clamp value.
    assert k3[0].item() == pytest.approx(math.expm1(-20) + 20, rel=1e-6)
    assert k3[6].item() == pytest.approx(math.expm1(20) - 20, rel=1e-6)
    x = torch.randn(1000) * 5
    assert (kl_k3(x, torch.randn(1000) * 5) >= 0).all()


def test_hand_values_and_registry():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # log r = 1
    assert kl_k1(logp, ref).item() == pytest.approx(1.0)
    assert kl_k2(logp, ref).item() == pytest.approx(0.5)
    assert kl_k3(logp, ref).item() == pytest.approx(math.exp(-1) - 1 + 1)  # (1/e - 1) - (-1)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert get_from_registry(KL_ESTIMATORS, "k3", "KL estimator") is kl_k3
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        get_from_registry(KL_ESTIMATORS, "k4", "KL estimator")


def test_fixed_controller_is_constant():
    c = FixedKLController(0.05)
    for kl in (0.0, 1.0, 100.0):
        c.update(kl, n_steps=64)
        assert c.value == 0.05
    d = FixedKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05


def test_adaptive_controller_direction_and_bound():
    target, horizon, n = 0.1, 1000, 50
    up = AdaptiveKLController(0.2, target=target, horizon=horizon)
    up.update(0.11, n_steps=n)  # 10% above target: error 0.1, inside the clip
    assert up.value == pytest.approx(0.2 * (1 + 0.1 * n / horizon))
    down = AdaptiveKLController(0.2, target=target, horizon=horizon)
    down.update(0.09, n_steps=n)
    assert down.value == pytest.approx(0.2 * (1 - 0.1 * n / horizon))
    # Far from target the step is bounded by the 0.2 clip, in both directions.
    far_up = AdaptiveKLController(0.2, target=target, horizon=horizon)
    far_up.update(50.0, n_steps=n)
    assert far_up.value == pytest.approx(0.2 * (1 + 0.2 * n / horizon))
    far_down = AdaptiveKLController(0.2, target=target, horizon=horizon)
    far_down.update(0.0, n_steps=n)
    assert far_down.value == pytest.approx(0.2 * (1 - 0.2 * n / horizon))
    # At target nothing moves.
    same = AdaptiveKLController(0.2, target=target, horizon=horizon)
    same.update(target, n_steps=n)
    assert same.value == pytest.approx(0.2)


def test_adaptive_controller_converges_and_round_trips():
    # A toy plant where KL is inversely proportional to beta: the controller drives KL to target.
    c = AdaptiveKLController(0.01, target=0.5, horizon=100)
    for _ in range(2000):
        c.update(0.05 / c.value, n_steps=10)
    assert 0.05 / c.value == pytest.approx(0.5, rel=1e-3)
    d = AdaptiveKLController(1.0, target=9.0, horizon=1)
    d.load_state_dict(c.state_dict())
    assert (d.value, d.target, d.horizon) == (c.value, c.target, c.horizon)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
