"""Masked statistics, outcome (critic-free) advantages, GAE, and KL-shaped token rewards.

Advantages and returns are regression/score targets, never differentiated through: every function here
detaches its inputs. Masks are 0/1 (bool or float); positions where the mask is 0 are ignored (even if they
hold nan/inf) and come out as 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tether.core.registry import check_choice

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "outcome_advantages",
    "gae",
    "kl_shaped_token_rewards",
    "overlong_penalty",
    "high_entropy_token_mask",
    "ADVANTAGES",
    "BASELINES",
    "STD_SCALES",
]


# ---------------------------------------------------------------------------------------------------------
# masked statistics


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum of x where mask != 0 (torch.where, not x * mask, so garbage at padding can't leak as nan)."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask); an empty mask gives 0 (not nan), which keeps empty micro-batches harmless."""
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries (all dims), sum (x - mean)^2 / (n - 1) if unbiased else / n.

    Fewer than two entries give 0 rather than nan.
    """
    mean = masked_mean(x, mask)
    sq_sum = masked_sum((x - mean).square(), mask)
    n = masked_sum(torch.ones_like(x), mask)
    return sq_sum / ((n - 1) if unbiased else n).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; with shift_mean=False the mean is added back.

    Entries outside the mask come out as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------------------
# outcome advantages: A_t = (R - b) / s on every completion token

BASELINES = ("none", "batch_mean", "group_mean", "leave_one_out")
STD_SCALES = ("none", "group", "batch")


def outcome_advantages(
    scores_B: Tensor,
    response_mask_BT: Tensor,
    *,
    baseline: str = "none",
    group_size: int = 1,
    std_scale: str = "none",
    valid_B: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """A[i, t] = (R_i - b_i) / (s_i + eps) on completion tokens, 0 elsewhere -> [B, T] float32.

    Rows are group-contiguous: row i belongs to group i // group_size (G completions of one prompt).
    baseline b_i:   "none" 0 | "batch_mean" mean over the batch | "group_mean" mean of row i's group (GRPO)
                    | "leave_one_out" mean of the *other* members of row i's group (RLOO, unbiased).
    std_scale s_i:  "none" (s = 1, no eps) | "group" std of row i's group (GRPO) | "batch" std of all scores.
    Stds are unbiased (n - 1), as torch.std and the GRPO reference code use; a 1-member set has std 0.
    valid_B (bool): rows without a score. They are left out of every mean and std and get advantage 0.
    A row whose group has no other valid member gets advantage 0 under "leave_one_out" (no comparison
    exists), which matches "group_mean" for a lone member.

    Batch/group means that include row i's own score shrink the expected gradient by (1 - 1/n);
    leave-one-out does not.
    """
    check_choice(baseline, BASELINES, "baseline")
    check_choice(std_scale, STD_SCALES, "std_scale")
    B = scores_B.shape[0]
    if group_size < 1 or B % group_size != 0:
        raise ValueError(f"batch size {B} is not a multiple of group_size {group_size}")
    if group_size < 2 and baseline in ("group_mean", "leave_one_out"):
        raise ValueError(f"group baseline needs group_size >= 2 (baseline={baseline!r}, group_size={group_size})")
    if group_size < 2 and std_scale == "group":
        raise ValueError(f"group std_scale needs group_size >= 2 (group_size={group_size})")

    valid_B = torch.ones(B, dtype=torch.bool, device=scores_B.device) if valid_B is None else valid_B.bool()
    v_B = valid_B.float()
    s_B = torch.where(valid_B, scores_B.detach().float(), torch.zeros((), device=scores_B.device))
    # Group views [G, group_size]; with group_size 1 these are just unused.
    s_Gg, v_Gg = s_B.view(-1, group_size), v_B.view(-1, group_size)
    n_G1 = v_Gg.sum(1, keepdim=True)
    sum_G1 = s_Gg.sum(1, keepdim=True)

    if baseline == "none":
        b_B = torch.zeros_like(s_B)
    elif baseline == "batch_mean":
        b_B = (s_B.sum() / v_B.sum().clamp(min=1)).expand(B)
    elif baseline == "group_mean":
        b_B = (sum_G1 / n_G1.clamp(min=1)).expand_as(s_Gg).reshape(B)
    else:  # leave_one_out: (group sum - own score) / (n - 1); a lone valid member uses its own score (A = 0)
        others = (n_G1 - 1).clamp(min=1)
        b_Gg = torch.where(n_G1 > 1, (sum_G1 - s_Gg) / others, s_Gg)
        b_B = b_Gg.reshape(B)
    adv_B = s_B - b_B

    if std_scale == "group":
        mean_G1 = sum_G1 / n_G1.clamp(min=1)
        var_G1 = (((s_Gg - mean_G1) * v_Gg).square().sum(1, keepdim=True)) / (n_G1 - 1).clamp(min=1)
        adv_B = adv_B / (var_G1.sqrt().expand_as(s_Gg).reshape(B) + eps)
    elif std_scale == "batch":
        adv_B = adv_B / (masked_var(s_B, valid_B).sqrt() + eps)

    adv_B = torch.where(valid_B, adv_B, torch.zeros_like(adv_B))
    return torch.where(response_mask_BT.bool(), adv_B[:, None], torch.zeros((), device=adv_B.device))


# ---------------------------------------------------------------------------------------------------------
# GAE and token rewards


def gae(
    token_rewards_BT: Tensor,
    values_BT: Tensor,
    response_mask_BT: Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over the completion tokens.

        delta_t = r_t + gamma V_{t+1} - V_t,      A_t = delta_t + gamma lam A_{t+1},      R_t = A_t + V_t

    with V = A = 0 after the last completion token. "t+1" is the next *completion* position: masked
    positions are skipped, so right padding, left padding and masked-out spans inside a completion all work.
    Returns (advantages_BT, returns_BT), float32, 0 outside the mask.
    """
    mask_BT = response_mask_BT.bool()
    r_BT = token_rewards_BT.detach().float()
    v_BT = torch.where(mask_BT, values_BT.detach().float(), torch.zeros((), device=values_BT.device))
    B, T = r_BT.shape
    next_value_B = r_BT.new_zeros(B)
    next_adv_B = r_BT.new_zeros(B)
    adv_BT = r_BT.new_zeros(B, T)
    for t in reversed(range(T)):  # reverse scan, vectorised over the batch
        m_B = mask_BT[:, t]
        delta_B = r_BT[:, t] + gamma * next_value_B - v_BT[:, t]
        a_B = delta_B + gamma * lam * next_adv_B
        # Padding carries the "next" values through unchanged, so it is invisible to the recursion.
        next_adv_B = torch.where(m_B, a_B, next_adv_B)
        next_value_B = torch.where(m_B, v_BT[:, t], next_value_B)
        adv_BT[:, t] = torch.where(m_B, a_B, 0.0)
    returns_BT = torch.where(mask_BT, adv_BT + v_BT, 0.0)
    return adv_BT, returns_BT


def kl_shaped_token_rewards(scores_B: Tensor, kl_BT: Tensor, response_mask_BT: Tensor, *, beta: float) -> Tensor:
    """r_t = -beta kl_t on completion tokens, + the sequence score on each row's last completion token.

    (R <- R - beta KL, folded into the reward per token as in Ziegler et al. 2019.)
    A row with no completion tokens gets no reward at all.
    """
    mask_BT = response_mask_BT.bool()
    T = mask_BT.shape[1]
    rewards_BT = torch.where(mask_BT, -beta * kl_BT.detach().float(), 0.0)
    pos_BT = torch.arange(T, device=mask_BT.device).expand_as(mask_BT)
    last_B = torch.where(mask_BT, pos_BT, -1).amax(dim=1)  # -1 for rows with no completion token
    score_B = torch.where(last_B >= 0, scores_B.detach().float(), 0.0)
    return rewards_BT.scatter_add(1, last_B.clamp(min=0)[:, None], score_B[:, None])


def overlong_penalty(lengths_B: Tensor, *, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score of each completion:

        R_len(|y|) = 0                                  if |y| <= L_max - L_cache
                   = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                   = -1                                 if |y| > L_max

    times `factor`, with L_max = max_len and L_cache = buffer. A completion cut at the budget (|y| = L_max)
    gets the full -factor. verl's DAPO reward manager computes the same, min(-(|y| - (L_max - L_cache)) /
    L_cache * factor, 0).
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    exceed_B = lengths_B.detach().float() - (max_len - buffer)
    return factor * (-exceed_B / buffer).clamp(min=-1.0, max=0.0)


def high_entropy_token_mask(entropy_BT: Tensor, response_mask_BT: Tensor, *, top_fraction: float) -> Tensor:
    """1.0 on the ceil(rho * n) highest-entropy tokens among the n masked ones (rho = top_fraction; every
    token tied with the last one kept too), 0.0 elsewhere: the "forking" tokens that carry the policy gradient
    in Wang et al. 2025 ("Beyond the 80/20 rule", rho = 0.2).

    Ranked over the whole batch given, with pi_old's entropies, so the selection does not depend on how the
    update splits the batch into micro-batches (the paper ranks within each update micro-batch).
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    mask_BT = response_mask_BT.bool()
    values = entropy_BT.detach()[mask_BT]
    if values.numel() == 0:
        return torch.zeros_like(entropy_BT, dtype=torch.float32)
    k = max(1, math.ceil(top_fraction * values.numel()))
    threshold = torch.topk(values, k).values[-1]
    return ((entropy_BT.detach() >= threshold) & mask_BT).float()


# ---------------------------------------------------------------------------------------------------------
# registry: every estimator takes the same keywords and returns (advantages_BT, returns_BT | None)


def _outcome(baseline: str):
    def estimator(*, scores_B, response_mask_BT, group_size=1, std_scale="none", valid_B=None, **_unused):
        adv = outcome_advantages(
            scores_B, response_mask_BT, baseline=baseline, group_size=group_size, std_scale=std_scale, valid_B=valid_B
        )
        return adv, None  # critic-free: no value targets

    estimator.__name__ = f"outcome_{baseline}"
    estimator.__doc__ = f"outcome_advantages(baseline={baseline!r}, std_scale=std_scale) -> (adv, None)"
    return estimator


def _gae_estimator(
    *, scores_B, response_mask_BT, valid_B=None, token_rewards_BT=None, values_BT=None, gamma=1.0, lam=1.0, **_unused
):
    """gae(). token_rewards_BT defaults to the score on the last completion token (no KL shaping); invalid rows
    get 0. group_size/std_scale are ignored: whiten GAE advantages with masked_whiten if wanted."""
    if values_BT is None:
        raise ValueError("advantage estimator 'gae' needs values_BT (a value head)")
    mask_BT = response_mask_BT.bool()
    if valid_B is not None:
        mask_BT = mask_BT & valid_B.bool()[:, None]
    if token_rewards_BT is None:
        scores_B = scores_B if valid_B is None else torch.where(valid_B.bool(), scores_B, 0.0)
        no_kl_BT = torch.zeros(mask_BT.shape, device=mask_BT.device)
        token_rewards_BT = kl_shaped_token_rewards(scores_B, no_kl_BT, mask_BT, beta=0.0)
    return gae(token_rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)


def _reinforce_pp_estimator(*, scores_B, response_mask_BT, valid_B=None, token_rewards_BT=None, gamma=1.0,
                            **_unused):
    """REINFORCE++ (Hu et al. 2025): no critic, no baseline; the advantage of token t is its return,

        A_t = sum_{s >= t} gamma^(s - t) r_s,   r_s = -beta kl_s, plus the sequence score at the last token,

    normalised over the whole batch afterwards (algorithm.whiten_advantages, as OpenRLHF's `reinforce`
    estimator does). This is GAE with V = 0 and lambda = 1, so it reuses `gae`."""
    mask_BT = response_mask_BT.bool()
    if valid_B is not None:
        mask_BT = mask_BT & valid_B.bool()[:, None]
    if token_rewards_BT is None:
        scores_B = scores_B if valid_B is None else torch.where(valid_B.bool(), scores_B, 0.0)
        token_rewards_BT = kl_shaped_token_rewards(scores_B, torch.zeros(mask_BT.shape, device=mask_BT.device),
                                                   mask_BT, beta=0.0)
    adv, _ = gae(token_rewards_BT, torch.zeros(mask_BT.shape, device=mask_BT.device), mask_BT, gamma=gamma, lam=1.0)
    return adv, None


# Estimators that take per-token rewards (KL folded into the reward token by token) rather than a score.
TOKEN_REWARD_ESTIMATORS = ("gae", "reinforce_pp")

ADVANTAGES = {
    "gae": _gae_estimator,
    "reinforce": _outcome("none"),
    "batch_mean": _outcome("batch_mean"),
    "grpo": _outcome("group_mean"),
    "rloo": _outcome("leave_one_out"),
    "reinforce_pp": _reinforce_pp_estimator,
}
