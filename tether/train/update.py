"""Stage 4 of a step, the update: K epochs x M minibatches of the composite loss (Schulman et al. 2017), each
minibatch in micro-batches whose losses add up to the minibatch's, then one guarded optimiser step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tether.config import TrainConfig
from tether.core.kl import KL_ESTIMATORS
from tether.core.losses import POLICY_LOSSES, aggregate, composite_loss, truncated_is_weight, value_loss
from tether.rollout.batch import Rollout
from tether.train.distributed import Dist
from tether.train.forward import critic_values, gather_rows, policy_logprobs_and_values
from tether.train.passes import log_behaviour_gap, log_mismatch, micro_batches
from tether.train.setup import RunModels, uses_reference
from tether.train.stats import StatAccumulator

PER_TOKEN_POLICY_STATS = ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "dual_clip_frac")


@dataclass
class Optimisation:
    """The optimisers and schedules of the trained models, and fp32 master weights where they are used."""

    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict
    masters: dict
    max_grad_norm: float | None

    def step(self, acc: StatAccumulator) -> str | None:
        """Clip, check finiteness, step; None when it stepped, else why not. A non-finite gradient leaves the
        weights and the optimiser state as they were."""
        cause = None
        for name, opt in self.optimizers.items():
            params = [p for g in opt.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
            if hasattr(norm, "full_tensor"):  # FSDP2: the norm over sharded gradients is a DTensor
                norm = norm.full_tensor()
            acc.mean(f"optim/grad_norm_{name}", norm)
            if not torch.isfinite(norm):
                cause = f"non-finite gradient norm of the {name} ({norm.item()})"
        if cause is None:
            for name, opt in self.optimizers.items():
                opt.step()
                self.schedulers[name].step()
                if name in self.masters:
                    self.masters[name].masters_to_model()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        return cause


def update(rollout: Rollout, first_epoch_order: torch.Tensor, acc: StatAccumulator, *, cfg: TrainConfig,
           run: RunModels, dist: Dist, opt: Optimisation, beta: float,
           order_for_epoch: Callable[[int], torch.Tensor]) -> tuple[dict, str | None]:
    """Run the epochs; returns the update's counts (epochs done, optimiser steps, skipped, early stop) and
    the cause of the last skipped optimiser step (None when none was skipped)."""
    a, r = cfg.algorithm, cfg.rollout
    B, T = rollout.response_mask_BT.shape
    loss_fn = POLICY_LOSSES[a.policy_loss]
    world = dist.world_size
    epochs_done, updates, skipped, stopped_early, bad_cause = 0, 0, 0, False, None
    kl_full_in_loss = a.kl_mode == "loss" and a.kl_estimator == "full" and uses_reference(cfg)
    # On-policy distillation with the exact KL: grad KL(pi || pi_teacher) per position, in the loss (as a
    # reward it would have no gradient at its own position: it does not depend on the sampled token).
    distill_in_loss = run.teacher is not None and a.distill_estimator == "full"
    first_minibatch = True
    for epoch in range(a.epochs):
        order = first_epoch_order if epoch == 0 else order_for_epoch(epoch)
        for mb_rows in order.tensor_split(a.minibatches):
            # Denominators of the whole minibatch over all ranks: micro-batches and ranks then add up to exactly
            # the full-minibatch loss (DDP averages gradients, hence the factor `world`).
            counts = dist.sum(torch.stack([torch.tensor(float(len(mb_rows))),
                                           rollout.loss_mask_BT[mb_rows].sum().cpu()]))
            n_seq, n_tok = counts[0].item(), counts[1].item()
            mb_loss_stats: dict[str, torch.Tensor] = {}
            approx_kl_sum = torch.zeros(())
            for mb in micro_batches(rollout, mb_rows, cfg, dist):
                lp, ent, shared_values, full_kl, _ = policy_logprobs_and_values(
                    run.policy_module, run.critic_module if run.shared_critic else None, mb,
                    temperature=r.temperature, with_entropy=True, autocast_dtype=run.autocast_dtype,
                    share_prompts=run.share_prompts, top_k=r.top_k, top_p=r.top_p,  # entropy: always logged
                    reference=run.reference if kl_full_in_loss else run.teacher if distill_in_loss else None)
                # The exact KL that came back is to the reference or to the teacher (never both: config).
                distill_kl = full_kl if distill_in_loss else None
                mask = mb.response_mask
                old = gather_rows(rollout.old_logprobs_BT, mb) if rollout.old_logprobs_BT is not None else lp.detach()
                adv = gather_rows(rollout.advantages_BT, mb)
                if a.tis_cap is not None and rollout.sampler_logprobs_BT is not None:
                    # Truncated IS for the sampler/trainer (behaviour/proximal) gap: min(pi_old / pi_sampler, cap).
                    adv = adv * truncated_is_weight(old, gather_rows(rollout.sampler_logprobs_BT, mb), a.tis_cap)
                pl_BT, pstats = loss_fn(lp, old, adv, mask, eps_low=a.eps_low, eps_high=a.eps_high,
                                        dual_clip=a.dual_clip, tau_pos=a.tau_pos, tau_neg=a.tau_neg)
                kl_BT = None
                if kl_full_in_loss:  # the exact per-position KL, whose gradient is grad KL(pi || pi_ref)
                    kl_BT = full_kl
                elif a.kl_mode == "loss" and uses_reference(cfg):
                    kl_BT = KL_ESTIMATORS[a.kl_estimator](lp, gather_rows(rollout.ref_logprobs_BT, mb))
                loss, lstats = composite_loss(
                    policy_loss_BT=pl_BT, response_mask_BT=mask, aggregation=a.aggregation, entropy_BT=ent,
                    entropy_coef=a.entropy_coef, kl_BT=kl_BT, kl_coef=beta if kl_BT is not None else 0.0,
                    num_sequences=n_seq, num_tokens=n_tok, max_len=r.max_new_tokens)
                if distill_kl is not None:  # distillation's exact reverse KL to the teacher, a loss term
                    distill = aggregate(distill_kl, mask, a.aggregation, num_sequences=n_seq, num_tokens=n_tok,
                                        max_len=r.max_new_tokens)
                    loss = loss + a.distill_coef * distill
                    lstats["loss/distill"] = distill.detach()
                    lstats["loss/total"] = lstats["loss/total"] + a.distill_coef * distill.detach()
                    if first_minibatch:
                        ntok_mb = mask.sum()
                        acc.mean("distill/teacher_kl_per_token", (distill_kl.detach() * mask).sum()
                                 / ntok_mb.clamp(min=1), ntok_mb)
                if run.shared_critic:  # one backward: the value loss also flows into the shared trunk
                    vloss = value_term(shared_values, rollout, mb, n_seq, n_tok, lstats, acc, cfg)
                    loss = loss + a.value_coef * vloss
                (loss * world).backward()
                if run.critic is not None and not run.shared_critic:
                    # The value term shares no parameters with the policy terms: its own backward, after the
                    # policy's activations are freed, lowers peak memory.
                    values = critic_values(run.critic_module, mb, autocast_dtype=run.autocast_dtype)
                    vloss = value_term(values, rollout, mb, n_seq, n_tok, lstats, acc, cfg)
                    (a.value_coef * vloss * world).backward()
                ntok = mask.sum()
                for k, v in lstats.items():  # each micro-batch holds its share of the minibatch sum
                    mb_loss_stats[k] = mb_loss_stats.get(k, 0.0) + v.detach()
                if "approx_kl" in pstats:
                    approx_kl_sum = approx_kl_sum + pstats["approx_kl"].detach() * ntok
                for k in PER_TOKEN_POLICY_STATS:
                    if k in pstats:
                        acc.mean(f"policy/{k}", pstats[k], ntok)
                if "ratio_min" in pstats:
                    acc.minimum("policy/ratio_min", pstats["ratio_min"])
                    acc.maximum("policy/ratio_max", pstats["ratio_max"])
                if ent is not None:
                    acc.mean("policy/entropy", (ent * mask).sum() / ntok.clamp(min=1), ntok)
                if first_minibatch and rollout.old_logprobs_BT is None:
                    # No old pass: the first minibatch's forward is pi_old (the policy that sampled, or with
                    # asynchronous rollouts the proximal policy, the sampler's being older).
                    behaviour = gather_rows(rollout.sampler_logprobs_BT, mb)
                    log_mismatch(acc, lp.detach(), behaviour, mask)
                    if r.max_staleness > 0:
                        log_behaviour_gap(acc, lp.detach(), behaviour, mask)
                        if rollout.ref_logprobs_BT is not None:  # no sampler log-probs stood for pi_old
                            kl = KL_ESTIMATORS["k1"](lp.detach(), gather_rows(rollout.ref_logprobs_BT, mb))
                            acc.mean("kl/ref_per_token", (kl * mask).sum() / ntok.clamp(min=1), ntok)
                if first_minibatch and "ratio_max" in pstats:
                    acc.maximum("policy/first_minibatch_ratio_dev",
                                (torch.exp(lp.detach() - old) - 1).abs().mul(mask).max())
            first_minibatch = False
            keys = list(mb_loss_stats)
            summed = dist.sum(torch.stack([mb_loss_stats[k] for k in keys] + [approx_kl_sum]))
            for k, v in zip(keys, summed[:-1]):
                acc.mean(k, v)
            cause = opt.step(acc)
            if cause is None:
                updates += 1
            else:
                skipped, bad_cause = skipped + 1, cause
            # Early stop when pi_theta has moved too far from pi_old (same decision on every rank).
            if a.target_approx_kl is not None and summed[-1].item() / max(n_tok, 1) > a.target_approx_kl:
                stopped_early = True
                break
        epochs_done += 1
        if stopped_early:
            break
    return ({"update/epochs_done": epochs_done, "update/optimizer_steps": updates, "update/skipped": skipped,
             "update/early_stopped": float(stopped_early)}, bad_cause)


def value_term(values: torch.Tensor, rollout: Rollout, mb, n_seq: float, n_tok: float, lstats: dict,
               acc: StatAccumulator, cfg: TrainConfig) -> torch.Tensor:
    """The value term of the composite loss for one micro-batch (its share of the minibatch)."""
    a, mask = cfg.algorithm, mb.response_mask
    vl_BT, vstats = value_loss(values, gather_rows(rollout.old_values_BT, mb), gather_rows(rollout.returns_BT, mb),
                               mask, clip_range=a.value_clip)
    vloss = aggregate(vl_BT, mask, a.aggregation, num_sequences=n_seq, num_tokens=n_tok,
                      max_len=cfg.rollout.max_new_tokens)
    lstats["loss/value"] = vloss.detach()
    lstats["loss/total"] = lstats["loss/total"] + a.value_coef * vloss.detach()
    acc.mean("value/clip_frac", vstats["value_clip_frac"], mask.sum())
    return vloss
