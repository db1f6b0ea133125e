"""REINFORCE through the core functions against the exact policy gradient of a tiny enumerable policy.

The policy is autoregressive over vocab {0, 1, 2} for 3 steps: the logits at step t are theta[t, previous
token] (BOS = 3 before the first token), so all 27 completions can be enumerated and
J(theta) = sum_o pi(o) R(o) and its gradient are exact.
"""

import itertools

import pytest
import torch

from tether.core.advantages import outcome_advantages
from tether.core.logprobs import token_logprobs
from tether.core.losses import POLICY_LOSSES, aggregate, policy_loss_reinforce

V, L, BOS = 3, 3, 3
SEQS = torch.tensor(list(itertools.product(range(V), repeat=L)))  # [27, 3]
MASK = torch.ones(1, L)


def policy_logits(theta, tokens):
    """Logits [N, L, V] for tokens [N, L]; theta is [L, V + 1, V] or per-row [N, L, V + 1, V]."""
    prev = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], dim=1)
    t = torch.arange(L)
    if theta.dim() == 3:
        return theta[t[None, :], prev]
    return theta[torch.arange(len(tokens))[:, None], t[None, :], prev]


def setup(seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(L, V + 1, V, generator=g, dtype=torch.float64).requires_grad_()
    rewards = torch.randn(len(SEQS), generator=g, dtype=torch.float64) + offset
    return theta, rewards, g


def exact_objective_and_gradient(theta, rewards):
    # Plain torch (not the code under test): log pi(o) = sum_t log_softmax(logits_t)[o_t].
    logp = torch.log_softmax(policy_logits(theta, SEQS), -1).gather(-1, SEQS[..., None]).squeeze(-1).sum(1)
    pi = logp.exp()
    J = (pi * rewards).sum()
    (grad,) = torch.autograd.grad(J, theta)
    return pi.detach(), J.detach(), grad


def test_enumeration_is_a_distribution_and_score_function_identity_holds():
    theta, rewards, _ = setup(0)
    pi, _, grad = exact_objective_and_gradient(theta, rewards)
    torch.testing.assert_close(pi.sum(), torch.tensor(1.0, dtype=torch.float64))
    # sum_o pi(o) R(o) grad log pi(o), with log pi from the core's token_logprobs, is the exact gradient.
    logp = token_logprobs(policy_logits(theta, SEQS), SEQS).sum(1)
    (score_grad,) = torch.autograd.grad((pi * rewards * logp).sum(), theta)
    torch.testing.assert_close(score_grad, grad)


def mc_gradients(theta, rewards, g, baseline, *, K, N, G):
    """K independent REINFORCE estimates, each from a batch of N samples (groups of G), via the core functions.

    Each batch gets its own copy of theta so that one backward pass yields all K per-batch gradients.
    """
    pi, _, _ = exact_objective_and_gradient(theta, rewards)
    idx = torch.multinomial(pi, K * N, replacement=True, generator=g)
    tokens = SEQS[idx]
    theta_K = theta.detach().expand(K, *theta.shape).clone().requires_grad_()
    theta_rows = theta_K.repeat_interleave(N, dim=0)
    logp_BT = token_logprobs(policy_logits(theta_rows, tokens), tokens)
    mask_BT = MASK.expand(K * N, L)
    scores = rewards[idx]
    group_size = G if baseline in ("group_mean", "leave_one_out") else 1
    adv_BT = torch.cat(
        [
            outcome_advantages(scores[k * N:(k + 1) * N], mask_BT[:N], baseline=baseline, group_size=group_size)
            for k in range(K)
        ]
    )
    loss_BT, _ = policy_loss_reinforce(logp_BT, adv_BT, mask_BT)
    # seq_mean_token_sum with num_sequences=N: sum over batches of (1/N) sum_i sum_t -log pi A,
    # whose gradient is minus the REINFORCE estimate (1/N) sum_i A_i grad log pi(o_i).
    loss = aggregate(loss_BT, mask_BT, "seq_mean_token_sum", num_sequences=N)
    (grad_K,) = torch.autograd.grad(loss, theta_K)
    return -grad_K.reshape(K, -1)


K, N, G = 3000, 8, 4
# E[estimate] for each baseline. A mean that includes the sample's own reward is correlated with it:
# E[(R_i - mean_j R_j) grad log pi_i] = (1 - 1/n) grad J. Leave-one-out has no such term.
SHRINK = {"none": 1.0, "batch_mean": 1 - 1 / N, "group_mean": 1 - 1 / G, "leave_one_out": 1.0}


@pytest.mark.parametrize("baseline", list(SHRINK))
def test_reinforce_converges_to_exact_gradient(baseline):
    theta, rewards, g = setup(1)
    _, _, grad = exact_objective_and_gradient(theta, rewards)
    est = mc_gradients(theta, rewards, g, baseline, K=K, N=N, G=G)
    mean, se = est.mean(0), est.std(0) / K**0.5
    expected = SHRINK[baseline] * grad.reshape(-1)
    used = se > 0  # parameters no sequence touches (e.g. theta[1, BOS]) have exactly zero estimates
    assert used.sum() == 21 and (mean[~used] == 0).all() and (expected[~used] == 0).all()
    z = ((mean - expected).abs() / se)[used]
    assert z.max() < 5.0, f"max z-score {z.max():.2f}"
    if SHRINK[baseline] < 0.8:  # the shrinkage is real, not within noise: the unshrunk gradient is rejected
        assert (((mean - grad.reshape(-1)).abs() / se)[used]).max() > 5.0


def test_baselines_reduce_variance_not_mean():
    # A large constant offset in the reward is pure noise for REINFORCE without a baseline.
    theta, rewards, g = setup(2, offset=10.0)
    total_var = {}
    for baseline in SHRINK:
        est = mc_gradients(theta, rewards, g, baseline, K=1000, N=N, G=G)
        total_var[baseline] = est.var(0).sum().item()
    for baseline in ("batch_mean", "group_mean", "leave_one_out"):
        assert total_var[baseline] < 0.1 * total_var["none"], total_var


def test_clipped_surrogate_gradient_at_old_policy_is_policy_gradient():
    theta, rewards, g = setup(3)
    idx = torch.multinomial(exact_objective_and_gradient(theta, rewards)[0], 64, replacement=True, generator=g)
    tokens = SEQS[idx]
    mask = MASK.expand(64, L)
    logp = token_logprobs(policy_logits(theta, tokens), tokens)
    adv = outcome_advantages(rewards[idx], mask, baseline="group_mean", group_size=8, std_scale="group")
    grads = {}
    for name in POLICY_LOSSES:
        loss_BT, stats = POLICY_LOSSES[name](
            logprobs_BT=logp, old_logprobs_BT=logp.detach(), advantages_BT=adv, response_mask_BT=mask
        )
        (grads[name],) = torch.autograd.grad(aggregate(loss_BT, mask, "seq_mean_token_mean"), theta, retain_graph=True)
        if name != "reinforce":
            assert stats["ratio_min"].item() == stats["ratio_max"].item() == 1.0
            if "clip_frac_low" in stats:  # SAPO has a gate, no clip
                assert stats["clip_frac_low"].item() == stats["clip_frac_high"].item() == 0.0
    assert grads["reinforce"].abs().max() > 1e-3
    for name in POLICY_LOSSES:  # clipped, clipped_sequence, cispo, sapo: the policy gradient at pi_old
        torch.testing.assert_close(grads[name], grads["reinforce"], rtol=1e-12, atol=1e-14)
