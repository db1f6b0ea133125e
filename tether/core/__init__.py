"""tether.core: the pure-math heart of tether. Tensors in, tensors out; torch only.

Shapes are in the names (B batch rows, T completion positions, V vocabulary); masks are explicit
(`response_mask_BT`: 1 on completion tokens, bool or float). Stats are detached 0-dim tensors, never
Python numbers, so nothing here forces a host sync (the one exception, on purpose: a mask passed to the
logprobs functions, whose valid rows are gathered so that padding is never computed).
"""

from tether.core.advantages import (
    ADVANTAGES,
    BASELINES,
    STD_SCALES,
    gae,
    kl_shaped_token_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    outcome_advantages,
)
from tether.core.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_k1, kl_k2, kl_k3
from tether.core.logprobs import entropy_from_logits, full_kl_from_logits, logprobs_and_entropy, token_logprobs
from tether.core.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    composite_loss,
    explained_variance,
    policy_loss_clipped,
    policy_loss_clipped_sequence,
    policy_loss_reinforce,
    value_loss,
)
from tether.core.registry import get_from_registry

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "BASELINES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "STD_SCALES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "composite_loss",
    "entropy_from_logits",
    "explained_variance",
    "full_kl_from_logits",
    "gae",
    "get_from_registry",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_shaped_token_rewards",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "outcome_advantages",
    "policy_loss_clipped",
    "policy_loss_clipped_sequence",
    "policy_loss_reinforce",
    "token_logprobs",
    "value_loss",
]
