"""Per-token KL(pi || pi_ref) estimators and the KL coefficient controllers.

For a token a ~ pi with log r = log pi(a) - log pi_ref(a) (Schulman, "Approximating KL Divergence", 2020):

    k1 = log r                                   E_pi[k1] = KL            unbiased, can be negative
    k2 = 0.5 (log r)^2                           E_pi[k2] != KL           biased (second-order approximation)
    k3 = (1/r - 1) - log(1/r)                    E_pi[k3] = KL            unbiased and >= 0 (x - 1 >= log x)

These statements are about the *value* (use in the reward, or for logging). Used as a *loss* term whose
gradient flows through log pi(a) only (the samples are not differentiated), the expected gradients are:
    grad k1 -> E_pi[grad log pi] = 0                (no tethering at all in expectation)
    grad k2 -> grad KL(pi || pi_ref)                (the right gradient, despite the biased value)
    grad k3 -> grad KL(pi_ref || pi)                (the reverse KL's gradient)
tests/core/test_kl.py checks all of these by enumeration. For an exact, full-vocabulary KL and its
gradient use `tether.core.logprobs.full_kl_from_logits`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kl_k1", "kl_k2", "kl_k3", "KL_ESTIMATORS", "FixedKLController", "AdaptiveKLController"]

# Bound on |log pi_ref/pi| inside k3. exp(log_ratio) overflows float32 past ~88 (and bf16's range is the
# same), turning the estimate and its gradient into inf/nan; at |log r| = 20 a token is already 5e8 times
# more likely under one policy, so nothing meaningful is lost by saturating there.
K3_LOG_RATIO_CLAMP = 20.0


def kl_k1(logprobs_BT: Tensor, ref_logprobs_BT: Tensor) -> Tensor:
    """k1 = log pi - log pi_ref (unbiased for KL(pi||pi_ref) under samples from pi; can be negative)."""
    return logprobs_BT - ref_logprobs_BT


def kl_k2(logprobs_BT: Tensor, ref_logprobs_BT: Tensor) -> Tensor:
    """k2 = 0.5 (log pi - log pi_ref)^2 (biased value; its gradient is unbiased for grad KL(pi||pi_ref))."""
    return 0.5 * (logprobs_BT - ref_logprobs_BT).square()


def kl_k3(logprobs_BT: Tensor, ref_logprobs_BT: Tensor) -> Tensor:
    """k3 = (pi_ref/pi - 1) - log(pi_ref/pi) (unbiased for KL(pi||pi_ref), always >= 0)."""
    log_ratio_ref = (ref_logprobs_BT - logprobs_BT).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return torch.expm1(log_ratio_ref) - log_ratio_ref  # expm1: exact near ratio 1, where k3 ~ 0.5 (log r)^2


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


class FixedKLController:
    """Constant KL coefficient beta."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (same interface as AdaptiveKLController)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences"):

        error = clip(current_kl / target - 1, -0.2, 0.2)
        beta  <- beta * (1 + error * n_steps / horizon)

    so beta moves by at most a factor (1 +- 0.2 n_steps / horizon) per update, up when KL > target.
    `current_kl` is a Python float (call `.item()` yourself, once per update, outside the hot path).
    """

    def __init__(self, init_beta: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))
