"""Per-token policy/value losses, their aggregation to a scalar, and the composite PPO/GRPO loss.

Every loss returns (loss_BT, stats): loss_BT is 0 outside the mask, stats are detached 0-dim tensors.
The loss is *minimised*, so the policy losses are minus the surrogate objectives (Schulman et al. 2017).
POLICY_LOSSES entries share one signature: (logprobs_BT, old_logprobs_BT, advantages_BT, response_mask_BT,
*, eps_low, eps_high, dual_clip, tau_pos, tau_neg).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.core.advantages import masked_mean, masked_sum, masked_var
from tether.core.registry import check_choice

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "policy_loss_reinforce",
    "policy_loss_clipped",
    "policy_loss_clipped_sequence",
    "policy_loss_cispo",
    "policy_loss_sapo",
    "POLICY_LOSSES",
    "truncated_is_weight",
    "value_loss",
    "composite_loss",
    "explained_variance",
]

# |log r| bound for the importance ratio, so exp() cannot overflow to inf (and inf * 0 advantages to nan).
# Beyond e^20 every case of the clip already has (near) zero gradient except A < 0 without dual clip.
LOG_RATIO_CLAMP = 20.0


def _zero_outside(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    return torch.where(mask_BT.bool(), x_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device))


# ---------------------------------------------------------------------------------------------------------
# aggregation

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def aggregate(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: str,
    *,
    num_sequences: int | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar. With L_i = the row's completion tokens:

        seq_mean_token_mean      (1/N) sum_i (1/|L_i|) sum_{t in L_i} l_it     1/|o_i| (Shao et al. 2024, GRPO)
        token_mean               (1/K) sum_i sum_{t in L_i} l_it               K = total completion tokens
        seq_mean_token_sum       (1/N) sum_i sum_{t in L_i} l_it
        seq_mean_token_sum_norm  (1/N) sum_i sum_{t in L_i} l_it / max_len     constant max_len (Dr. GRPO)

    By default N = rows with at least one completion token and K = their token count. Pass the *global*
    num_sequences (N) / num_tokens (K) when this batch is one micro-batch (or one data-parallel shard):
    then the micro-batch results sum to exactly the full-batch value. The per-row 1/|L_i| always uses the
    row's own length, since each row lives entirely in one micro-batch.
    """
    check_choice(mode, AGGREGATIONS, "aggregation")
    mask_BT = mask_BT.bool()
    if mode == "token_mean":
        return masked_sum(loss_BT, mask_BT) / _denominator(num_tokens, mask_BT.sum())
    len_B = mask_BT.sum(dim=1)
    seq_B = masked_sum(loss_BT, mask_BT, dim=1)
    if mode == "seq_mean_token_mean":
        seq_B = seq_B / len_B.clamp(min=1)
    elif mode == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError("aggregation 'seq_mean_token_sum_norm' needs max_len (the generation length limit)")
        seq_B = seq_B / max_len
    return seq_B.sum() / _denominator(num_sequences, (len_B > 0).sum())


def _denominator(override: int | Tensor | None, default: Tensor) -> int | Tensor:
    # Empty batches divide by 1 (giving 0), never by 0.
    return default.clamp(min=1) if override is None else override


# ---------------------------------------------------------------------------------------------------------
# policy losses


def policy_loss_reinforce(
    logprobs_BT: Tensor, advantages_BT: Tensor, response_mask_BT: Tensor, **_: object
) -> tuple[Tensor, dict[str, Tensor]]:
    """l_t = -log pi(o_t) A_t: minus the REINFORCE surrogate, whose gradient is the policy gradient."""
    loss_BT = -logprobs_BT * advantages_BT.detach()
    return _zero_outside(loss_BT, response_mask_BT), {}


def _masked_log_ratio(logprobs_BT: Tensor, old_logprobs_BT: Tensor, response_mask_BT: Tensor) -> Tensor:
    """log pi - log pi_old, clamped, with padded positions set to 0 before anything exponentiates them: they
    may hold NaN or -inf, and a mask applied after exp() still multiplies NaN by 0 in backward."""
    zero = torch.zeros((), dtype=logprobs_BT.dtype, device=logprobs_BT.device)
    log_ratio = torch.where(response_mask_BT.bool(), logprobs_BT - old_logprobs_BT.detach(), zero)
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _ratio_stats(ratio_BT: Tensor, response_mask_BT: Tensor, log_ratio_BT: Tensor) -> dict[str, Tensor]:
    """Mean, min and max of the ratio over the mask, and k3 for the samples' own distribution:
    E_old[(r - 1) - log r] = KL(pi_old || pi), always >= 0."""
    mask = response_mask_BT.bool()
    r = ratio_BT.detach()
    mean = masked_mean(r, mask)
    filled = torch.where(mask, r, mean)  # padding holds the mean, which can't be a new min or max
    lr = log_ratio_BT.detach()
    return {"ratio_mean": mean, "ratio_min": filled.min(), "ratio_max": filled.max(),
            "approx_kl": masked_mean(torch.expm1(lr) - lr, mask)}


def _clipped_surrogate(
    log_ratio_BT: Tensor,
    token_log_ratio_BT: Tensor,
    advantages_BT: Tensor,
    response_mask_BT: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t), optionally dual-clipped."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    A = advantages_BT.detach()
    ratio = torch.exp(log_ratio_BT)
    unclipped = -A * ratio
    clipped = -A * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)  # max of the negatives = -min(rA, clip(r)A): the pessimistic bound
    if dual_clip is not None:
        # Ye et al. 2020: for A < 0 a huge ratio makes -rA unbounded; cap the loss at c |A| = -c A.
        loss = torch.where(A < 0, torch.minimum(loss, -dual_clip * A), loss)
    loss = _zero_outside(loss, response_mask_BT)

    mask = response_mask_BT.bool()
    r = ratio.detach()

    def frac(cond: Tensor) -> Tensor:
        return masked_mean(cond.float(), mask)

    stats = {
        "clip_frac_low": frac((A < 0) & (r < 1.0 - eps_low)),
        "clip_frac_high": frac((A > 0) & (r > 1.0 + eps_high)),
        "dual_clip_frac": frac((A < 0) & (r > dual_clip)) if dual_clip is not None else r.new_zeros(()),
        **_ratio_stats(ratio, response_mask_BT, token_log_ratio_BT),
    }
    return loss, stats


def policy_loss_clipped(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    response_mask_BT: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    **_: object,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with per-token ratios r_t = pi(o_t) / pi_old(o_t):

        l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
        dual clip (A_t < 0):  l_t = min(l_t, -dual_clip A_t)

    Where the clip is active (A > 0, r > 1 + eps_high or A < 0, r < 1 - eps_low) the gradient is 0.
    eps_high > eps_low is DAPO's "clip-higher".
    """
    log_ratio = _masked_log_ratio(logprobs_BT, old_logprobs_BT, response_mask_BT)
    return _clipped_surrogate(log_ratio, log_ratio, advantages_BT, response_mask_BT, eps_low, eps_high, dual_clip)


def policy_loss_clipped_sequence(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    response_mask_BT: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    **_: object,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence-level ratio (GSPO, Zheng et al. 2025), clipped like policy_loss_clipped:

        s_i = exp( (1/|o_i|) sum_t (log pi(o_it) - log pi_old(o_it)) )     geometric mean of token ratios
        s_it = sg(s_i) * pi(o_it) / sg(pi(o_it))                           (GSPO-token)

    s_it equals s_i in value (so the clip decision is per sequence) while its gradient is
    s_i grad log pi(o_it), i.e. each token's loss gets its own token's gradient. With advantages constant
    over a row and the seq_mean_token_mean aggregation this is exactly GSPO's grad of -min(s_i A, clip(s_i) A).
    The GSPO paper uses much smaller eps than PPO (eps_low=3e-4, eps_high=4e-4).
    """
    # Padded positions may hold any value (NaN, -inf): they are replaced before any arithmetic, so that no
    # NaN reaches exp() or its gradient (a mask applied after exp() still multiplies NaN by 0 in backward).
    mask = response_mask_BT.bool()
    logp_BT = torch.where(mask, logprobs_BT, torch.zeros((), dtype=logprobs_BT.dtype, device=logprobs_BT.device))
    old_BT = torch.where(mask, old_logprobs_BT.detach(), torch.zeros_like(logp_BT))
    token_log_ratio = logp_BT - old_BT
    seq_log_ratio_B = masked_mean(token_log_ratio, response_mask_BT, dim=1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_ratio = seq_log_ratio_B.detach()[:, None] + (logp_BT - logp_BT.detach())
    return _clipped_surrogate(
        log_ratio, token_log_ratio, advantages_BT, response_mask_BT, eps_low, eps_high, dual_clip
    )


def policy_loss_cispo(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    response_mask_BT: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    **_: object,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax 2025, MiniMax-M1): clip the importance weight, not the update, and detach it:

        l_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A_t log pi(o_t)

    Every token keeps a gradient, sg(clip(r_t)) A_t grad log pi(o_t), where the PPO clip zeroes the gradient
    of clipped tokens (rare, high-information tokens above all). At pi = pi_old it is the REINFORCE gradient.
    verl's `cispo` loss computes the same per-token term; MiniMax-M1 used no lower bound (eps_low near 1).
    """
    log_ratio = _masked_log_ratio(logprobs_BT, old_logprobs_BT, response_mask_BT)
    ratio = torch.exp(log_ratio)
    weight = ratio.detach().clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = _zero_outside(-weight * advantages_BT.detach() * logprobs_BT, response_mask_BT)
    A, r, mask = advantages_BT.detach(), ratio.detach(), response_mask_BT.bool()
    stats = {"clip_frac_low": masked_mean(((r < 1.0 - eps_low) & (A != 0)).float(), mask),
             "clip_frac_high": masked_mean(((r > 1.0 + eps_high) & (A != 0)).float(), mask),
             **_ratio_stats(ratio, response_mask_BT, log_ratio)}
    return loss, stats


def policy_loss_sapo(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    response_mask_BT: Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    **_: object,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO (Soft Adaptive Policy Optimization, arXiv:2511.20347, 2025): a smooth gate instead of a hard clip,

        l_t = -f(r_t) A_t,   f(r) = (4 / tau) sigmoid(tau (r - 1)),   tau = tau_pos if A_t > 0 else tau_neg

    df/dr = 4 s (1 - s) with s = sigmoid(tau (r - 1)): 1 at r = 1 (the policy gradient at pi_old, as PPO), and
    decaying smoothly as r leaves 1, faster for negative advantages (tau_neg > tau_pos). As verl's `sapo`.
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"SAPO needs tau_pos, tau_neg > 0, got {tau_pos}, {tau_neg}")
    log_ratio = _masked_log_ratio(logprobs_BT, old_logprobs_BT, response_mask_BT)
    ratio = torch.exp(log_ratio)
    A = advantages_BT.detach()
    # tau in the ratio's dtype: a float32 tau (from float32 advantages) makes f'(1) = 1 only to 1e-7.
    tau = torch.where(A > 0, torch.tensor(tau_pos, dtype=ratio.dtype, device=ratio.device),
                      torch.tensor(tau_neg, dtype=ratio.dtype, device=ratio.device))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss = _zero_outside(-gate * A, response_mask_BT)
    return loss, _ratio_stats(ratio, response_mask_BT, log_ratio)


def _reinforce_entry(
    logprobs_BT: Tensor, old_logprobs_BT: Tensor | None, advantages_BT: Tensor, response_mask_BT: Tensor, **_: object
) -> tuple[Tensor, dict[str, Tensor]]:
    """policy_loss_reinforce under the registry's shared signature (old_logprobs_BT is ignored)."""
    return policy_loss_reinforce(logprobs_BT, advantages_BT, response_mask_BT)


# Every entry takes (logprobs_BT, old_logprobs_BT, advantages_BT, response_mask_BT, *, eps_low, eps_high,
# dual_clip, tau_pos, tau_neg), positionally or by keyword; an entry ignores what it does not use.
POLICY_LOSSES = {
    "reinforce": _reinforce_entry,
    "clipped": policy_loss_clipped,
    "clipped_sequence": policy_loss_clipped_sequence,
    "cispo": policy_loss_cispo,
    "sapo": policy_loss_sapo,
}


def truncated_is_weight(proximal_logprobs_BT: Tensor, behaviour_logprobs_BT: Tensor, cap: float) -> Tensor:
    """w_t = min(pi_prox(a_t) / pi_behav(a_t), cap), no gradient: the per-token weight on the advantage when
    the tokens were sampled by a behaviour policy other than the proximal one the ratio is taken against
    (decoupled PPO, Hilton et al. 2022: a stale sampler, or a sampler whose numerics differ from the
    trainer's; truncated as in Espeholt et al. 2018). Where the two policies are the same, w = exp(0) = 1
    exactly, and the loss and its gradient are the on-policy ones."""
    log_w = (proximal_logprobs_BT - behaviour_logprobs_BT).clamp(max=LOG_RATIO_CLAMP)
    return torch.exp(log_w).clamp(max=cap).detach()


# ---------------------------------------------------------------------------------------------------------
# value loss, composite loss, diagnostics


def value_loss(
    values_BT: Tensor,
    old_values_BT: Tensor | None,
    returns_BT: Tensor,
    response_mask_BT: Tensor,
    *,
    clip_range: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """l_t = 0.5 (V_t - R_t)^2, or with clip_range c (PPO2's value clipping):

        l_t = 0.5 max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)^2)

    stats["value_clip_frac"]: fraction of tokens where the clipped term is the larger one (zero gradient).

    Only a token whose |V_t - V_old,t| exceeds c takes the clipped term: elsewhere the two terms are equal in
    exact arithmetic, but V_old + (V - V_old) rounds away from V in float32 (5% of unit-scale values), and
    comparing the two squares would count that rounding as clipping.
    """
    R = returns_BT.detach()
    sq_err = (values_BT - R).square()
    mask = response_mask_BT.bool()
    clip_frac = sq_err.new_zeros(())
    if clip_range is not None:
        if old_values_BT is None:
            raise ValueError("value clipping needs old_values_BT")
        V_old = old_values_BT.detach()
        delta = values_BT - V_old
        sq_err_clipped = (V_old + delta.clamp(-clip_range, clip_range) - R).square()
        takes_clipped = (delta.abs() > clip_range) & (sq_err_clipped > sq_err)  # comparisons carry no grad
        clip_frac = masked_mean(takes_clipped.float(), mask)
        sq_err = torch.where(takes_clipped, sq_err_clipped, sq_err)
    return _zero_outside(0.5 * sq_err, mask), {"value_clip_frac": clip_frac}


def composite_loss(
    *,
    policy_loss_BT: Tensor,
    response_mask_BT: Tensor,
    aggregation: str,
    value_loss_BT: Tensor | None = None,
    value_coef: float = 0.0,
    entropy_BT: Tensor | None = None,
    entropy_coef: float = 0.0,
    kl_BT: Tensor | None = None,
    kl_coef: float = 0.0,
    num_sequences: int | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = agg(policy) + c_v agg(value) - c_ent agg(entropy) + beta agg(kl)   (Schulman et al. 2017, eq. 9).

    One aggregation for every term. A term is switched off by passing None or a zero coefficient; a term
    that is given is still reported in stats (loss/policy, loss/value, loss/entropy, loss/kl, loss/total),
    as its aggregated value before the coefficient.
    """

    def agg(x_BT: Tensor) -> Tensor:
        return aggregate(
            x_BT, response_mask_BT, aggregation, num_sequences=num_sequences, num_tokens=num_tokens, max_len=max_len
        )

    total = agg(policy_loss_BT)
    stats = {"loss/policy": total.detach()}
    for name, term_BT, coef in (
        ("value", value_loss_BT, value_coef),
        ("entropy", entropy_BT, -entropy_coef),  # entropy is a bonus: subtracting it rewards exploration
        ("kl", kl_BT, kl_coef),
    ):
        if term_BT is None:
            continue
        if coef == 0:
            stats[f"loss/{name}"] = agg(term_BT.detach())
            continue
        term = agg(term_BT)
        stats[f"loss/{name}"] = term.detach()
        total = total + coef * term
    stats["loss/total"] = total.detach()
    return total, stats


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over the masked entries (1 = perfect critic, 0 = predicts the mean);
    nan when the returns have no variance."""
    values, returns = values.detach().float(), returns.detach().float()
    var_R = masked_var(returns, mask)
    ev = 1.0 - masked_var(returns - values, mask) / var_R
    return torch.where(var_R > 0, ev, torch.full_like(ev, float("nan")))
