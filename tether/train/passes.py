"""Stage 2 of a step, the no-grad passes: log pi_old (and a shared critic's old values) over the training
micro-batches, log pi_ref, and a separate critic's old values; and the micro-batching they share with the
update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tether.config import TrainConfig
from tether.core.batch_invariant import batch_invariant
from tether.models import ReferencePolicy
from tether.rollout.batch import Rollout
from tether.train.distributed import Dist, split_to_count
from tether.train.forward import (
    critic_values,
    gather_rows,
    make_micro_batch,
    policy_logprobs,
    policy_logprobs_and_values,
    scatter_rows,
    split_micro_batches,
)
from tether.train.setup import RunModels, uses_reference
from tether.train.stats import StatAccumulator


def micro_batches(rollout: Rollout, rows: torch.Tensor, cfg: TrainConfig, dist: Dist) -> list:
    """`rows` of the rollout in micro-batches of optim.micro_batch_size rows or optim.token_budget tokens."""
    o = cfg.optim
    mbs = split_micro_batches(rollout, rows, micro_batch_size=o.micro_batch_size, token_budget=o.token_budget)
    if dist.enabled and o.token_budget is not None:
        # DDP and FSDP communicate in every forward/backward: every rank runs as many micro-batches.
        n = int(dist.max(torch.tensor(len(mbs))).item())
        if n > len(mbs):
            mbs = [make_micro_batch(rollout, idx) for idx in split_to_count([mb.index for mb in mbs], n)]
    return mbs


def sampler_is_exact(cfg: TrainConfig, backend) -> bool:
    """The sampler drew from softmax(logits / T) of the trained policy's own forward (not a copy in another
    precision), so its log-probs are pi_old's. Under top-k / top-p the trainer evaluates the same truncated
    distribution, but a token at the edge of the kept set may fall on either side of it between the
    sampler's cached decode and the trainer's forward (logits equal up to float order): pi_old gets its
    own pass there, so that the first minibatch's ratio is exactly 1."""
    r = cfg.rollout
    return (r.top_k == 0 and r.top_p >= 1.0 and r.backend == "hf" and r.max_staleness == 0
            and not getattr(backend, "samples_from_copy", False))


def needs_old_pass(cfg: TrainConfig, run: RunModels, exact_sampler: bool) -> bool:
    """pi_old needs its own pass unless the first minibatch's forward can stand for it: more than one update
    per step, a shared critic (whose old values come with it), KL in the reward from an inexact sampler or
    over the full vocabulary (pi_old's logits meet the reference's there), distillation's sampled reward
    from an inexact sampler, high-entropy token selection (it ranks pi_old's entropies before the update),
    or asynchronous rollouts with an adaptive beta (its controller reads the KL of pi_old, measured before
    the update).

    Asynchronous rollouts alone need no pass: decoupled PPO's proximal policy is the trainer's pre-update
    weights, which the first minibatch's forward is, and the truncated importance weight pi_old / pi_behaviour
    is taken from it (update.py). That pass was a third of the trainer's work in a GRPO step on 2 cores."""
    a = cfg.algorithm
    sampled_distill = run.teacher is not None and a.distill_estimator == "k1"
    stale_with_adaptive_beta = cfg.rollout.max_staleness > 0 and a.kl_target is not None
    return (run.shared_critic or stale_with_adaptive_beta or a.epochs * a.minibatches > 1
            or a.entropy_top_fraction is not None or full_kl_in_reward(cfg)
            or (sampled_distill and not exact_sampler)
            or (a.kl_mode == "reward" and uses_reference(cfg) and not exact_sampler))


def full_kl_in_reward(cfg: TrainConfig) -> bool:
    a = cfg.algorithm
    return a.kl_estimator == "full" and a.kl_mode == "reward" and uses_reference(cfg)


def log_mismatch(acc: StatAccumulator, trainer_lp: torch.Tensor, sampler_lp: torch.Tensor | None,
                 mask: torch.Tensor) -> None:
    """|log pi_sampler - log pi_trainer| per token: must be float noise when both are the same policy."""
    if sampler_lp is None:
        return
    gap = (trainer_lp - sampler_lp).abs() * mask
    acc.maximum("rollout/logprob_mismatch_max", gap.max())
    acc.mean("rollout/logprob_mismatch_mean", gap.sum() / mask.sum().clamp(min=1), mask.sum())


def log_behaviour_gap(acc: StatAccumulator, proximal_lp: torch.Tensor, behaviour_lp: torch.Tensor,
                      mask: torch.Tensor) -> None:
    """Asynchronous rollouts: KL(behaviour || proximal) per token, estimated as the mean of log pi_behaviour -
    log pi_old on the behaviour's samples (k1), and the importance weights pi_old / pi_behaviour that
    algorithm.tis_cap truncates."""
    n = mask.sum()
    w = torch.exp(proximal_lp - behaviour_lp)
    acc.mean("rollout/behaviour_kl", ((behaviour_lp - proximal_lp) * mask).sum() / n.clamp(min=1), n)
    acc.mean("rollout/is_weight_mean", (w * mask).sum() / n.clamp(min=1), n)
    acc.maximum("rollout/is_weight_max", (w * mask).max())


@torch.no_grad()
def no_grad_passes(rollout: Rollout, first_epoch_order: torch.Tensor, acc: StatAccumulator, *, cfg: TrainConfig,
                   run: RunModels, dist: Dist, exact_sampler: bool) -> None:
    """Fill rollout.old_logprobs_BT (and a shared critic's old_values_BT), ref_logprobs_BT and a separate
    critic's old_values_BT, as the config needs them."""
    a, r = cfg.algorithm, cfg.rollout
    B, T = rollout.response_mask_BT.shape
    device = rollout.response_mask_BT.device
    minibatches = first_epoch_order.tensor_split(a.minibatches)
    # Micro-batches aligned with the first epoch's, so the first minibatch's ratio is exactly 1.
    micro = [mb for rows in minibatches for mb in micro_batches(rollout, rows, cfg, dist)]
    no_grad_size = cfg.optim.no_grad_micro_batch_size
    frozen_micro = micro if no_grad_size is None else [
        make_micro_batch(rollout, rows) for rows in first_epoch_order.split(no_grad_size)]
    if needs_old_pass(cfg, run, exact_sampler):
        rollout.old_logprobs_BT = torch.zeros(B, T, device=device)
        want_entropy = a.entropy_top_fraction is not None
        if want_entropy:
            rollout.old_entropy_BT = torch.zeros(B, T, device=device)
        want_full_kl = full_kl_in_reward(cfg)
        if want_full_kl:  # the reward's exact KL(pi_old || pi_ref) per position, from the same forward
            rollout.full_kl_BT = torch.zeros(B, T, device=device)
        if run.shared_critic:
            rollout.old_values_BT = torch.zeros(B, T, device=device)
        policy = run.policy if run.compiled_policy is None else run.compiled_policy
        for mb in micro:
            lp, ent, values, full_kl, _ = policy_logprobs_and_values(
                policy, run.critic if run.shared_critic else None, mb, temperature=r.temperature,
                with_entropy=want_entropy, autocast_dtype=run.autocast_dtype, share_prompts=run.share_prompts,
                top_k=r.top_k, top_p=r.top_p, reference=run.reference if want_full_kl else None)
            scatter_rows(rollout.old_logprobs_BT, mb, lp)
            if ent is not None:
                scatter_rows(rollout.old_entropy_BT, mb, ent)
            if full_kl is not None:
                scatter_rows(rollout.full_kl_BT, mb, full_kl)
            if values is not None:
                scatter_rows(rollout.old_values_BT, mb, values)
            behaviour = (gather_rows(rollout.sampler_logprobs_BT, mb) if rollout.sampler_logprobs_BT is not None
                         else None)
            log_mismatch(acc, lp, behaviour, mb.response_mask)
            if r.max_staleness > 0 and behaviour is not None:
                log_behaviour_gap(acc, lp, behaviour, mb.response_mask)
    if uses_reference(cfg) and rollout.ref_logprobs_BT is None:  # else the generation worker computed them
        reference_logprobs(rollout, frozen_micro, run.reference, temperature=r.temperature,
                           autocast_dtype=run.autocast_dtype, share_prompts=run.share_prompts)
    if run.teacher is not None and a.distill_estimator == "k1":
        # The reverse KL's sampled estimate, log pi_old - log pi_teacher, at every model token.
        teacher_lp = torch.zeros(B, T, device=device)
        with run.teacher.active() as teacher:
            for mb in frozen_micro:
                lp, _ = policy_logprobs(teacher, mb, temperature=r.temperature, with_entropy=False,
                                        autocast_dtype=run.autocast_dtype, share_prompts=run.share_prompts)
                scatter_rows(teacher_lp, mb, lp)
        old_lp = logprobs_before_update(rollout, exact_sampler)
        rollout.teacher_kl_BT = (old_lp - teacher_lp) * rollout.loss_mask_BT
    if run.critic is not None and not run.shared_critic:
        rollout.old_values_BT = torch.zeros(B, T, device=device)
        for mb in frozen_micro:
            scatter_rows(rollout.old_values_BT, mb, critic_values(run.critic, mb, autocast_dtype=run.autocast_dtype))


@torch.no_grad()
def reference_logprobs(rollout: Rollout, micro: list, reference: ReferencePolicy, *, temperature: float,
                       autocast_dtype: torch.dtype | None, share_prompts: bool) -> None:
    """Fill rollout.ref_logprobs_BT: log pi_ref of every completion token, over the micro-batches `micro`."""
    B, T = rollout.response_mask_BT.shape
    rollout.ref_logprobs_BT = torch.zeros(B, T, device=rollout.response_mask_BT.device)
    with reference.active() as ref_model:
        for mb in micro:
            lp, _ = policy_logprobs(ref_model, mb, temperature=temperature, with_entropy=False,
                                    autocast_dtype=autocast_dtype, share_prompts=share_prompts)
            scatter_rows(rollout.ref_logprobs_BT, mb, lp)


@dataclass
class WorkerReferencePass:
    """The reference pass run by the asynchronous generation worker (rollout.max_staleness > 0) on each batch
    right after sampling it, instead of by the trainer.

    Why: the reference is frozen, so its log-probs do not depend on the policy version, and on 2 cores the
    worker (sampling, dispatch-bound) waits while the trainer (the update, matmul-bound) works; moving this
    pass evens the two. A separate reference is the trainer's own frozen copy, its tensors moved to shared
    memory (no second copy); a LoRA reference is the worker's policy copy with its adapters off (their weights
    change under it, unused). Picklable: it travels to the spawned worker."""

    model: nn.Module | None  # None: the LoRA policy's adapter-disabled base
    temperature: float
    autocast_dtype: torch.dtype | None
    share_prompts: bool
    micro_batch_size: int
    token_budget: int | None
    batch_invariant: bool  # model.batch_invariant: as the trainer's own pass would run

    @classmethod
    def for_run(cls, cfg: TrainConfig, run: RunModels) -> "WorkerReferencePass | None":
        if not uses_reference(cfg):
            return None
        model = run.reference.model
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                t.share_memory_()
        o = cfg.optim
        return cls(model, cfg.rollout.temperature, run.autocast_dtype, run.share_prompts,
                   o.no_grad_micro_batch_size or o.micro_batch_size,
                   None if o.no_grad_micro_batch_size else o.token_budget, cfg.model.batch_invariant)

    def __call__(self, worker_policy: nn.Module, rollout: Rollout) -> None:
        reference = (ReferencePolicy(model=self.model) if self.model is not None
                     else ReferencePolicy(adapter_host=worker_policy))
        micro = split_micro_batches(rollout, torch.arange(len(rollout)), micro_batch_size=self.micro_batch_size,
                                    token_budget=self.token_budget)
        with batch_invariant(self.batch_invariant):
            reference_logprobs(rollout, micro, reference, temperature=self.temperature,
                               autocast_dtype=self.autocast_dtype, share_prompts=self.share_prompts)


def logprobs_before_update(rollout: Rollout, exact_sampler: bool) -> torch.Tensor | None:
    """log pi_old for KL-in-reward and the KL statistic: the old pass, else the exact sampler log-probs."""
    if rollout.old_logprobs_BT is not None:
        return rollout.old_logprobs_BT
    if exact_sampler:
        return rollout.sampler_logprobs_BT
    return None
