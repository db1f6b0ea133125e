"""Stage 3 of a step, advantages: KL to the reference in the reward (or not), then the configured estimator
(`core.advantages.ADVANTAGES`) over this rank's rows, with batch-wide baselines and whitening."""

from __future__ import annotations

import torch

from tether.config import TrainConfig
from tether.core.advantages import (
    ADVANTAGES,
    TOKEN_REWARD_ESTIMATORS,
    high_entropy_token_mask,
    kl_shaped_token_rewards,
    masked_whiten,
)
from tether.core.kl import KL_ESTIMATORS
from tether.rollout.batch import Rollout
from tether.train.distributed import Dist


def global_masked_mean(x: torch.Tensor, mask: torch.Tensor, dist: Dist) -> float:
    s = dist.sum(torch.stack([(x * mask).sum(), mask.sum()]))
    return (s[0] / s[1].clamp(min=1)).item()


def global_whiten(x: torch.Tensor, mask: torch.Tensor, dist: Dist) -> torch.Tensor:
    """(x - mean) / std over the masked entries of every rank (unbiased variance), as masked_whiten."""
    if not dist.enabled:
        return masked_whiten(x, mask)
    s = dist.sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    mean = s[0] / s[2]
    var = (s[1] / s[2] - mean**2) * s[2] / (s[2] - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def compute_advantages(rollout: Rollout, cfg: TrainConfig, dist: Dist, *, beta: float, uses_reference: bool,
                       old_logprobs_BT: torch.Tensor | None) -> float | None:
    """Fill rollout.advantages_BT (and returns_BT for GAE). Returns the measured KL to the reference per
    token, k1 = log pi_old - log pi_ref averaged over the batch's completion tokens (None without a reference
    or pi_old log-probs): what the adaptive KL controller consumes.

    KL in the reward (Ziegler et al. 2019): with GAE the per-token reward is -beta * kl_t plus the score at the
    last token; for outcome estimators the sequence score is the score minus beta * sum_t kl_t. In an episode
    the per-token estimators get each environment reward on the last token of its turn instead (the score is
    their sum plus the reward functions'); outcome estimators see the episode's whole score.

    With algorithm.entropy_top_fraction, the advantages of all but the top fraction of tokens by pi_old's
    entropy are set to 0 (after any whitening): those tokens carry no policy gradient, and still count in the
    loss's denominators and in the KL and entropy terms.
    """
    a = cfg.algorithm
    mask = rollout.loss_mask_BT
    valid = rollout.valid_B
    scores = torch.where(valid, rollout.scores_B, torch.zeros_like(rollout.scores_B))
    token_rewards = None
    measured_kl = None
    if uses_reference and old_logprobs_BT is not None:
        kl_k1 = KL_ESTIMATORS["k1"](old_logprobs_BT, rollout.ref_logprobs_BT) * mask
        measured_kl = global_masked_mean(kl_k1, mask, dist)
    if a.kl_mode == "reward" and uses_reference:
        kl_BT = (rollout.full_kl_BT if a.kl_estimator == "full" else
                 KL_ESTIMATORS[a.kl_estimator](old_logprobs_BT, rollout.ref_logprobs_BT)) * mask
        if a.advantage in TOKEN_REWARD_ESTIMATORS:
            token_rewards = kl_shaped_token_rewards(scores, kl_BT, mask, beta=beta)
        else:
            scores = scores - beta * kl_BT.sum(-1)
    if rollout.turn_rewards_BT is not None and a.advantage in TOKEN_REWARD_ESTIMATORS:
        # Episodes: each turn's reward on the token ending that turn, the rest of the score at the last token.
        turns_BT = torch.where(valid.unsqueeze(-1), rollout.turn_rewards_BT.to(mask.device), 0.0)
        kl_part = kl_BT if token_rewards is not None else torch.zeros_like(mask)
        token_rewards = kl_shaped_token_rewards(scores - turns_BT.sum(-1), kl_part, mask,
                                                beta=beta if token_rewards is not None else 0.0) + turns_BT
    if rollout.teacher_kl_BT is not None:
        # On-policy distillation: -coef * (log pi_old - log pi_teacher) per token, on top of any score.
        distill_BT = rollout.teacher_kl_BT * mask
        if a.advantage in TOKEN_REWARD_ESTIMATORS:
            if token_rewards is None:
                token_rewards = kl_shaped_token_rewards(scores, torch.zeros_like(mask), mask, beta=0.0)
            token_rewards = token_rewards - a.distill_coef * distill_BT
        else:
            scores = scores - a.distill_coef * distill_BT.sum(-1)
    scores_global = dist.gather_cat(scores)
    valid_global = dist.gather_cat(valid)
    fn = ADVANTAGES[a.advantage]
    if a.advantage in TOKEN_REWARD_ESTIMATORS:  # per-token: this rank's rows alone
        adv, returns = fn(scores_B=scores, response_mask_BT=mask, token_rewards_BT=token_rewards,
                          values_BT=rollout.old_values_BT, gamma=a.gamma, lam=a.lam)
    else:
        # Outcome baselines need batch-wide statistics: compute on the gathered scores, keep our rows.
        T = mask.shape[1]
        ones = torch.ones(scores_global.shape[0], T, device=mask.device)
        adv_all, _ = fn(scores_B=scores_global, response_mask_BT=ones, group_size=rollout.group_size,
                        std_scale=a.std_scale, valid_B=valid_global)
        lo = dist.rank * len(rollout)
        adv, returns = adv_all[lo:lo + len(rollout)] * mask, None
    if a.whiten_advantages:
        adv = global_whiten(adv, mask * valid.unsqueeze(-1), dist)
    rollout.advantages_BT = adv * mask * valid.unsqueeze(-1)
    if a.entropy_top_fraction is not None:
        rollout.advantages_BT = rollout.advantages_BT * high_entropy_token_mask(
            rollout.old_entropy_BT, mask, top_fraction=a.entropy_top_fraction)
    rollout.returns_BT = returns
    return measured_kl
