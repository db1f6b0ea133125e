"""Outcome advantages (hand-worked numbers), GAE against a plain Python loop, masked statistics."""

import math

import pytest
import torch

from tether.core.advantages import (
    ADVANTAGES,
    gae,
    kl_shaped_token_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    outcome_advantages,
)
from tether.core.registry import get_from_registry

SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0])  # two groups of two: [1, 2] and [3, 6]
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.float32)


def per_row(adv_BT):
    """The advantage of each row (asserting it is constant on the row's tokens and 0 on padding)."""
    assert (adv_BT[MASK == 0] == 0).all()
    first = adv_BT[:, 0]
    assert torch.equal(adv_BT, torch.where(MASK.bool(), first[:, None], 0.0))
    return first


@pytest.mark.parametrize(
    "baseline, std_scale, expected",
    [
        ("none", "none", [1.0, 2.0, 3.0, 6.0]),
        ("batch_mean", "none", [-2.0, -1.0, 0.0, 3.0]),  # mean 3
        ("group_mean", "none", [-0.5, 0.5, -1.5, 1.5]),  # means 1.5, 4.5
        ("leave_one_out", "none", [-1.0, 1.0, -3.0, 3.0]),  # the other member: 2, 1, 6, 3
        # unbiased group stds: std([1, 2]) = sqrt(0.5), std([3, 6]) = sqrt(4.5)
        ("group_mean", "group", [-0.5 / 0.5**0.5, 0.5 / 0.5**0.5, -1.5 / 4.5**0.5, 1.5 / 4.5**0.5]),
        # unbiased batch std: sum of squared deviations 4 + 1 + 0 + 9 = 14, / 3
        ("batch_mean", "batch", [x / (14 / 3) ** 0.5 for x in (-2.0, -1.0, 0.0, 3.0)]),
        ("none", "batch", [x / (14 / 3) ** 0.5 for x in (1.0, 2.0, 3.0, 6.0)]),
        ("leave_one_out", "group", [-1 / 0.5**0.5, 1 / 0.5**0.5, -3 / 4.5**0.5, 3 / 4.5**0.5]),
    ],
)
def test_outcome_advantages_hand_examples(baseline, std_scale, expected):
    adv = outcome_advantages(SCORES, MASK, baseline=baseline, group_size=2, std_scale=std_scale)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(per_row(adv), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_valid_B_rows_are_zero_and_excluded_from_statistics():
    scores = torch.tensor([1.0, float("nan"), 3.0, 6.0])  # row 1 has no score
    valid = torch.tensor([True, False, True, True])
    kw = dict(group_size=2, valid_B=valid)
    # batch mean over [1, 3, 6] = 10/3
    adv = per_row(outcome_advantages(scores, MASK, baseline="batch_mean", **kw))
    torch.testing.assert_close(adv, torch.tensor([1 - 10 / 3, 0.0, 3 - 10 / 3, 6 - 10 / 3]))
    # group 0 has one valid member: its mean is its own score -> 0
    adv = per_row(outcome_advantages(scores, MASK, baseline="group_mean", **kw))
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -1.5, 1.5]))
    # leave-one-out: no other valid member -> 0 (documented choice)
    adv = per_row(outcome_advantages(scores, MASK, baseline="leave_one_out", **kw))
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -3.0, 3.0]))
    # batch std over the valid scores only: deviations from 10/3 -> (49 + 1 + 64) / 9 / 2
    std = math.sqrt((49 + 1 + 64) / 9 / 2)
    adv = per_row(outcome_advantages(scores, MASK, baseline="batch_mean", std_scale="batch", **kw))
    torch.testing.assert_close(adv, torch.tensor([(1 - 10 / 3) / std, 0.0, (3 - 10 / 3) / std, (6 - 10 / 3) / std]))
    # group std: the lone member's std is 0, its advantage is 0 anyway (and finite)
    adv = per_row(outcome_advantages(scores, MASK, baseline="group_mean", std_scale="group", **kw))
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -1.5 / 4.5**0.5, 1.5 / 4.5**0.5]))


def test_identical_group_scores_give_zero_not_nan():
    adv = outcome_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), MASK, baseline="group_mean", group_size=2,
                             std_scale="group")
    assert torch.equal(adv, torch.zeros_like(adv))


def test_outcome_advantages_errors():
    for baseline in ("group_mean", "leave_one_out"):
        with pytest.raises(ValueError, match="group baseline needs group_size >= 2"):
            outcome_advantages(SCORES, MASK, baseline=baseline, group_size=1)
    with pytest.raises(ValueError, match="group_size >= 2"):
        outcome_advantages(SCORES, MASK, std_scale="group", group_size=1)
    with pytest.raises(ValueError, match="not a multiple of group_size 3"):
        outcome_advantages(SCORES, MASK, baseline="group_mean", group_size=3)
    with pytest.raises(ValueError, match="'batch_mean', 'group_mean', 'leave_one_out', 'none'"):
        outcome_advantages(SCORES, MASK, baseline="mean")
    with pytest.raises(ValueError, match="std_scale"):
        outcome_advantages(SCORES, MASK, std_scale="global")


def test_advantages_registry():
    kw = dict(scores_B=SCORES, response_mask_BT=MASK, group_size=2, std_scale="group", gamma=0.9, lam=0.8)
    for name, baseline in (("reinforce", "none"), ("batch_mean", "batch_mean"), ("grpo", "group_mean"),
                           ("rloo", "leave_one_out")):
        adv, returns = ADVANTAGES[name](**kw)
        assert returns is None
        expected = outcome_advantages(SCORES, MASK, baseline=baseline, group_size=2, std_scale="group")
        torch.testing.assert_close(adv, expected)
    values = torch.randn(4, 3)
    adv, returns = ADVANTAGES["gae"](**kw, values_BT=values)
    expected = gae(kl_shaped_token_rewards(SCORES, torch.zeros(4, 3), MASK, beta=0.0), values, MASK, gamma=0.9, lam=0.8)
    torch.testing.assert_close((adv, returns), expected)
    with pytest.raises(ValueError, match="values_BT"):
        ADVANTAGES["gae"](**kw)
    with pytest.raises(ValueError) as err:
        get_from_registry(ADVANTAGES, "ppo2", "advantage estimator")
    for name in ("gae", "reinforce", "batch_mean", "grpo", "rloo"):
        assert repr(name) in str(err.value)


def gae_reference(rewards, values, mask, gamma, lam):
    """Textbook GAE, one row at a time, over the list of completion positions."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        pos = [t for t in range(rewards.shape[1]) if mask[b, t]]
        a_next, v_next = 0.0, 0.0
        for t in reversed(pos):
            delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            a_next = delta + gamma * lam * a_next
            v_next = values[b, t].item()
            adv[b, t] = a_next
            ret[b, t] = a_next + values[b, t].item()
    return adv, ret


def right_padded_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("layout", ["right_padded", "gaps"])
def test_gae_matches_python_loop(gamma, lam, layout):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    if layout == "right_padded":
        mask = right_padded_mask([9, 1, 4, 0, 7, 2], T)
    else:  # masked spans inside/before completions (e.g. tool output, left padding)
        mask = (torch.rand(B, T, generator=g) > 0.4).float()
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    rewards[mask == 0] = float("nan")  # padding content must not matter
    values[mask == 0] = float("nan")
    adv, ret = gae(rewards, values, mask.bool(), gamma=gamma, lam=lam)
    adv_ref, ret_ref = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)


def test_gae_lambda_gamma_one_is_returns_to_go_minus_values():
    g = torch.Generator().manual_seed(1)
    mask = right_padded_mask([5, 3, 1], 5)
    rewards, values = torch.randn(3, 5, generator=g) * mask, torch.randn(3, 5, generator=g)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    returns_to_go = rewards.flip(1).cumsum(1).flip(1) * mask  # sum_{t' >= t} r_t'
    torch.testing.assert_close(ret, returns_to_go)
    torch.testing.assert_close(adv, (returns_to_go - values) * mask)


def test_gae_detaches_values():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.randn(2, 3), values, torch.ones(2, 3), gamma=1.0, lam=0.9)
    assert not adv.requires_grad and not ret.requires_grad


def test_kl_shaped_token_rewards():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    r = kl_shaped_token_rewards(torch.tensor([1.0, -2.0, 5.0]), kl, mask, beta=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.25 - 2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)


def test_masked_statistics():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(x, m).item() == 12.0
    assert masked_mean(x, m).item() == 3.0
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([1.5, 4.5]))
    assert masked_var(x, m).item() == pytest.approx((4 + 1 + 0 + 9) / 3)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(14 / 4)
    w = masked_whiten(x, m)
    assert masked_mean(w, m).abs().item() < 1e-6
    assert masked_var(w, m).item() == pytest.approx(1.0, rel=1e-6)
    assert (w[m == 0] == 0).all()
    w2 = masked_whiten(x, m, shift_mean=False)
    assert masked_mean(w2, m).item() == pytest.approx(3.0)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # empty mask: 0, not nan


def test_reinforce_pp_advantages_are_token_returns():
    """REINFORCE++ (Hu et al. 2025): A_t = sum_{s >= t} gamma^(s-t) r_s of the KL-shaped token rewards, no
    baseline. Hand-worked: rewards -0.1 -0.2 and score 1 at the last of 3 tokens, gamma 1: 0.7, 0.8, 1.0."""
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 9.0]])
    rewards = kl_shaped_token_rewards(torch.tensor([1.0, 0.0]), kl, mask, beta=0.1)
    adv, returns = ADVANTAGES["reinforce_pp"](scores_B=torch.tensor([1.0, 0.0]), response_mask_BT=mask,
                                              token_rewards_BT=rewards, gamma=1.0)
    assert returns is None
    torch.testing.assert_close(adv, torch.tensor([[0.7, 0.8, 1.0], [-0.1, -0.05, 0.0]]))
    half, _ = ADVANTAGES["reinforce_pp"](scores_B=torch.tensor([1.0, 0.0]), response_mask_BT=mask,
                                         token_rewards_BT=rewards, gamma=0.5)
    torch.testing.assert_close(half[0], torch.tensor([-0.1 - 0.1 + 0.25, -0.2 + 0.5, 1.0]))
    plain, _ = ADVANTAGES["reinforce_pp"](scores_B=torch.tensor([1.0, 0.0]), response_mask_BT=mask)
    torch.testing.assert_close(plain, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))


def test_overlong_penalty_hand_worked():
    from tether.core.advantages import overlong_penalty

    # L_max = 10, L_cache = 4: no penalty up to 6 tokens, then -1/4 per token, -1 at the budget and beyond.
    lengths = torch.tensor([0, 5, 6, 7, 8, 10, 12])
    got = overlong_penalty(lengths, max_len=10, buffer=4)
    assert torch.equal(got, torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    assert torch.equal(overlong_penalty(lengths, max_len=10, buffer=4, factor=0.5), got / 2)
    assert torch.equal(overlong_penalty(torch.tensor([9, 10]), max_len=10, buffer=10),
                       torch.tensor([-0.9, -1.0]))
    for bad in (0, 11):
        with pytest.raises(ValueError, match="overlong buffer"):
            overlong_penalty(lengths, max_len=10, buffer=bad)


def test_high_entropy_token_mask_keeps_the_top_fraction_of_masked_tokens():
    from tether.core.advantages import high_entropy_token_mask

    ent = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.8, 0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # 7 tokens; the 7.0 is padding and never counts
    # ceil(0.2 * 7) = 2 tokens: 0.9 and 0.8
    assert torch.equal(high_entropy_token_mask(ent, mask, top_fraction=0.2),
                       torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    # ceil(0.5 * 7) = 4: 0.9, 0.8, 0.5, 0.3
    assert high_entropy_token_mask(ent, mask, top_fraction=0.5).tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]
    assert torch.equal(high_entropy_token_mask(ent, mask, top_fraction=1.0), mask.float())
    # Ties with the last kept value are kept too.
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert high_entropy_token_mask(tied, torch.ones(1, 4), top_fraction=0.25).tolist() == [[1, 1, 1, 0]]
    assert high_entropy_token_mask(ent, torch.zeros(2, 4), top_fraction=0.2).sum() == 0
    with pytest.raises(ValueError, match="top_fraction"):
        high_entropy_token_mask(ent, mask, top_fraction=0.0)
