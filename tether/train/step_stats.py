"""Stage 6 of a step, statistics of the batch (every rank's rows, not rank 0's share), and the run's health
checks: non-finite steps, unscored steps, and updates that blow the weights up."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from tether.core.advantages import masked_mean
from tether.core.losses import explained_variance
from tether.rollout.batch import Rollout
from tether.rollout.episodes import episode_stats, episode_sums
from tether.train.distributed import Dist
from tether.train.errors import TrainingError

log = logging.getLogger("tether")


def rollout_stats(rollout: Rollout, dist: Dist) -> dict[str, float]:
    """reward/*, completion/* (model tokens), advantages/*, value/explained_variance, the scorer's
    per-function figures, and for episodes episode/* (rollout/episodes.py explains each)."""
    mask = rollout.response_mask_BT
    valid = rollout.valid_B
    lengths = mask.sum(-1)
    scores = rollout.scores_B[valid]
    n_valid = dist.sum(valid.sum().float())
    s = dist.sum(torch.stack([scores.sum(), (scores**2).sum(), lengths.sum(), rollout.truncated_B.float().sum(),
                              torch.tensor(float(len(rollout)))]))
    mean = s[0] / n_valid.clamp(min=1)
    var = (s[1] / n_valid.clamp(min=1) - mean**2).clamp(min=0)
    inf = torch.tensor(math.inf)
    lo = dist.min(scores.min() if len(scores) else inf).item()  # a rank with no score defers to the others
    hi = dist.max(scores.max() if len(scores) else -inf).item()
    # No sample scored: the reward figures are missing (not 0), so no curve shows a reward never measured.
    rewards = {} if n_valid.item() == 0 else {"reward/mean": mean.item(), "reward/std": var.sqrt().item(),
                                              "reward/min": lo, "reward/max": hi}
    out = {
        **rewards,
        "reward/valid_frac": (n_valid / s[4]).item(),
        "completion/length_mean": (s[2] / s[4]).item(),
        "completion/length_max": dist.max(lengths.max()).item(),
        "completion/truncated_frac": (s[3] / s[4]).item(),
        "completion/tokens": s[2].item(),
    }
    if rollout.advantages_BT is not None:
        out.update(advantage_stats(rollout.advantages_BT, mask * valid.unsqueeze(-1), dist))
    if rollout.returns_BT is not None and rollout.old_values_BT is not None:
        out["value/explained_variance"] = global_explained_variance(rollout.old_values_BT, rollout.returns_BT,
                                                                    mask, dist)
    if rollout.teacher_kl_BT is not None:  # what distillation drives down
        tk = dist.sum(torch.stack([(rollout.teacher_kl_BT * mask).sum(), mask.sum()]))
        out["distill/teacher_kl_per_token"] = (tk[0] / tk[1].clamp(min=1)).item()
    if rollout.episode_BK is not None:
        out.update(episode_stats(dist.sum(episode_sums(rollout.episode_BK, mask))))
    # The scorer's figures describe this rank's rows (every rank holds as many): average them over ranks.
    rs = dict(rollout.reward_stats)
    if rs and dist.enabled:
        keys = sorted(rs)
        avg = dist.sum(torch.tensor([float(rs[k]) for k in keys], dtype=torch.float64)) / dist.world_size
        rs = dict(zip(keys, avg.tolist()))
    return {**rs, **out}


def advantage_stats(adv: torch.Tensor, mask: torch.Tensor, dist: Dist) -> dict[str, float]:
    """Mean and (population) std of the advantages over the batch's scored completion tokens, all ranks."""
    if not dist.enabled:
        if mask.sum() == 0:
            return {"advantages/mean": 0.0, "advantages/std": 0.0}
        mean = masked_mean(adv, mask)
        return {"advantages/mean": mean.item(), "advantages/std": masked_mean((adv - mean) ** 2, mask).sqrt().item()}
    s = dist.sum(torch.stack([(adv * mask).sum(), (adv * adv * mask).sum(), mask.sum()]).double())
    n = s[2].clamp(min=1)
    mean = s[0] / n
    return {"advantages/mean": mean.item(), "advantages/std": (s[1] / n - mean**2).clamp(min=0).sqrt().item()}


def global_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, dist: Dist) -> float:
    """1 - Var[R - V] / Var[R] over the masked tokens of every rank (unbiased variances)."""
    if not dist.enabled:
        return explained_variance(values, returns, mask).item()
    v, R = values.detach().double(), returns.detach().double()
    d = R - v
    s = dist.sum(torch.stack([(R * mask).sum(), (R * R * mask).sum(), (d * mask).sum(), (d * d * mask).sum(),
                              mask.double().sum()]))
    n = s[4]
    var_R = (s[1] - s[0] ** 2 / n) / (n - 1).clamp(min=1)
    var_d = (s[3] - s[2] ** 2 / n) / (n - 1).clamp(min=1)
    return (1.0 - var_d / var_R).item() if var_R > 0 else math.nan


class Health:
    """Counts the steps that went wrong and stops the run before it corrupts anything.

    - non-finite: a step without any finite update (weights and optimiser untouched); `max_bad` in a row stop.
    - unscored: a step whose reward scored no sample, so no update ran; `max_bad` in a row stop.
    - unstable: one step changed a model's weight norm by more than `max_growth`: an update that is finite but
      absurd (an lr orders of magnitude too high) ruins the weights without tripping the check above. From
      then on the run is unhealthy: its checkpoints say so, and pruning keeps the newest healthy one.
    """

    def __init__(self, max_bad: int, max_growth: float, lr: float) -> None:
        self.max_bad, self.max_growth, self.lr = max_bad, max_growth, lr
        self.bad_steps = 0
        self.unscored_steps = 0
        self.healthy = True
        self.weight_norms: dict[str, float] = {}
        self.last_cause = "non-finite loss"

    def nothing_scored(self, n_scored: float, n_samples: int, step: int) -> bool:
        """True (and a warning) when no sample of the step was scored."""
        if n_scored > 0:
            self.unscored_steps = 0
            return False
        self.unscored_steps += 1
        log.warning("step %d: the reward scored none of the %d samples (every score None); no update this "
                    "step (%d in a row)", step, n_samples, self.unscored_steps)
        if self.unscored_steps >= self.max_bad:
            raise TrainingError(f"the reward scored no sample in {self.unscored_steps} consecutive steps: check "
                                "that the reward functions return numbers for these completions (None means "
                                "'no opinion') and that the dataset has the columns they read")
        return True

    def check_update(self, stats: dict, step: int, cause: str | None) -> None:
        if cause is not None:
            self.last_cause = cause
        if stats["update/optimizer_steps"] > 0:
            self.bad_steps = 0
            return
        if stats.get("update/unscored"):
            return
        self.bad_steps += 1
        log.warning("step %d skipped: %s; weights and optimiser state left untouched (%d in a row)",
                    step, self.last_cause, self.bad_steps)
        if self.bad_steps >= self.max_bad:
            raise TrainingError(f"{self.bad_steps} consecutive steps had no finite update ({self.last_cause}); "
                                "stopping before anything is corrupted. Lower optim.lr, check the reward scale, "
                                "or use model.dtype=float32.")

    def check_weights(self, models: dict[str, nn.Module], step: int, dist: Dist, sharded: bool) -> dict[str, float]:
        """||theta|| of each trained model (`optim/weight_norm_<name>`), and the unstable-update check."""
        out = {}
        for name, module in models.items():
            norm, prev = weight_norm(module, dist if sharded else None), self.weight_norms.get(name)
            out[f"optim/weight_norm_{name}"] = norm
            if prev and (not math.isfinite(norm) or not prev / self.max_growth <= norm <= prev * self.max_growth):
                if self.healthy:
                    log.warning("step %d: the %s's weight norm went from %.4g to %.4g in one step: the update is "
                                "unstable (optim.lr=%g); checkpoints from here on are marked unhealthy and the "
                                "last healthy one is kept", step, name, prev, norm, self.lr)
                self.healthy = False
            self.weight_norms[name] = norm
        return out

    def state_dict(self) -> dict:
        return {"bad_steps": self.bad_steps, "healthy": self.healthy, "weight_norms": self.weight_norms}

    def load_state_dict(self, state: dict) -> None:
        self.bad_steps = int(state.get("bad_steps", 0))
        self.healthy = bool(state.get("healthy", True))
        self.weight_norms = {k: float(v) for k, v in state.get("weight_norms", {}).items()}


def weight_norm(module: nn.Module, dist: Dist | None = None) -> float:
    """L2 norm of all of a module's parameters; with `dist`, of FSDP shards summed over ranks."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in module.parameters()]
    sq = torch.stack([n.float() for n in torch._foreach_norm(local)]).square().sum() if local else torch.zeros(())
    if dist is not None:
        sq = dist.sum(sq)
    return sq.sqrt().item()
