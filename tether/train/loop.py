"""The RL training loop: one step reads top to bottom like the roadmap.

    1. collect       sample G completions (or episodes) per prompt, score them (DAPO: refill)   train/collect.py
    2. passes        log pi_old, log pi_ref and old values, no grad                              train/passes.py
    3. advantages    KL in the reward or not, the estimator, whitening; the measured KL          train/advantages.py
    4. update        K epochs x M minibatches of the composite loss, guarded optimiser steps     train/update.py
    5. adapt beta    from the measured KL per token (Ziegler et al. 2019)                        core/kl.py
    6. statistics    of the whole batch, and the run's health checks                             train/step_stats.py

Every algorithmic choice is a field of `TrainConfig.algorithm`; the math is in `tether.core`. The `Trainer`
wires the stages to the run's models (train/setup.py), sampler backend (rollout/factory.py) and data, and
saves and loads the run's state.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tether import models
from tether.config import TrainConfig, dump_yaml, validate_for_world
from tether.core.batch_invariant import batch_invariant
from tether.core.kl import AdaptiveKLController, FixedKLController
from tether.rollout.batch import Rollout
from tether.rollout.factory import make_async_generator, make_backend, make_episode_runner
from tether.train.advantages import compute_advantages
from tether.train.collect import WorkerScoring, collect, rows_that_fit, score_round
from tether.train.distributed import Dist
from tether.train.errors import TrainingError
from tether.train.host_memory import keep_freed_memory, release_freed_memory
from tether.train.passes import WorkerReferencePass, logprobs_before_update, no_grad_passes, sampler_is_exact
from tether.train.setup import build_models, make_optimisers, uses_reference
from tether.train.stats import StatAccumulator
from tether.train.step_stats import Health, rollout_stats
from tether.train.update import Optimisation, update

__all__ = ["Trainer", "StepResult", "TrainingError", "configure_process", "rank_seed", "seed_everything"]

log = logging.getLogger("tether")


@dataclass
class StepResult:
    step: int
    metrics: dict[str, float]
    rollout: Rollout = field(repr=False)


def configure_process(cfg: TrainConfig):
    """Process-wide settings of a run: torch's CPU threads and the allocator's reuse of freed memory. The
    command line applies them (and `fit(configure_process=True)`), never a `Trainer`. Returns the thread
    policy under threads=auto (see train/threads.py), else None."""
    from tether.train.threads import apply_threads

    policy = apply_threads(cfg.threads)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    return policy


def rank_seed(seed: int, rank: int, *extra: int) -> int:
    """The seed of rank `rank`: `seed` itself on rank 0 (one process runs exactly as it always has), a
    distinct stream on every other rank, so that ranks do not draw the same sampling noise."""
    if rank == 0 and not extra:
        return seed
    return int(np.random.SeedSequence([seed, rank, *extra]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns the models, optimisers and state of one run; `step()` is one iteration of the loop."""

    def __init__(self, cfg: TrainConfig, *, rows: list[dict], reward_fn: Callable | None = None,
                 run_dir: str | Path | None = None, dist: Dist | None = None):
        self.cfg = cfg
        self.dist = dist or Dist()
        validate_for_world(cfg, self.dist.world_size)  # every config error before the first model loads
        seed_everything(rank_seed(cfg.seed, self.dist.rank))
        self.device = models.resolve_device(cfg.device)
        self.run_dir = Path(run_dir) if run_dir else None
        self.uses_reference = uses_reference(cfg)
        self.models = build_models(cfg, self.device, self.dist)
        optimizers, schedulers = make_optimisers(cfg, self.models, self.dist)
        self.opt = Optimisation(optimizers, schedulers, self.models.masters, cfg.optim.max_grad_norm)
        a = cfg.algorithm
        self.kl_ctl = (AdaptiveKLController(a.beta, a.kl_target, a.kl_horizon) if a.kl_target is not None
                       else FixedKLController(a.beta))
        self.backend = make_backend(cfg, self.models.policy, self.models.tokenizer,
                                    autocast_dtype=self.models.autocast_dtype,
                                    fsdp=self.dist.enabled and cfg.distributed.strategy == "fsdp")
        self.reward = reward_fn
        self.episodes = make_episode_runner(cfg, self.tokenizer, context_window=self.models.context_window)
        from tether.data import PromptSampler

        # An episode's opening comes from its environment; a too long one is ended and flagged there.
        self.rows = rows if self.episodes else rows_that_fit(rows, cfg, self.tokenizer, self.models.context_window)
        self.sampler = PromptSampler(self.rows, batch_size=cfg.rollout.prompts_per_step, seed=cfg.seed,
                                     shuffle=cfg.data.shuffle)
        self.health = Health(cfg.optim.max_bad_steps, cfg.optim.max_weight_growth, cfg.optim.lr)
        # rollout.max_staleness > 0: a worker process samples ahead (rollout/async_worker.py), and runs the
        # reference pass and the reward on what it sampled; close() stops it.
        worker = cfg.rollout.max_staleness > 0 and cfg.rollout.backend == "hf"  # a process of our own
        self.async_generator = make_async_generator(
            cfg, self.models.policy, self.tokenizer, autocast_dtype=self.models.autocast_dtype,
            context_window=self.models.context_window,
            after_sampling=WorkerReferencePass.for_run(cfg, self.models) if worker else None,
            score=WorkerScoring.for_run(cfg, reward_fn) if worker else None,
            seed=rank_seed(cfg.seed + 1, self.dist.rank), shard=self.dist.shard if self.dist.enabled else None,
            backend=self.backend, score_here=functools.partial(score_round, reward=reward_fn, cfg=cfg,
                                                               device=torch.device("cpu")))
        self.step_count = 0
        self._first_step_memory_released = False
        if self.run_dir is not None and self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")

    # The run's parts, by their usual names.
    policy = property(lambda self: self.models.policy)
    critic = property(lambda self: self.models.critic)
    reference = property(lambda self: self.models.reference)
    tokenizer = property(lambda self: self.models.tokenizer)
    compiled_policy = property(lambda self: self.models.compiled_policy)
    shared_critic = property(lambda self: self.models.shared_critic)
    masters = property(lambda self: self.models.masters)
    optimizers = property(lambda self: self.opt.optimizers)
    schedulers = property(lambda self: self.opt.schedulers)
    healthy = property(lambda self: self.health.healthy)

    @property
    def beta(self) -> float:
        return self.kl_ctl.value

    def sampler_is_exact(self) -> bool:
        return sampler_is_exact(self.cfg, self.backend)

    def minibatch_order(self, B: int, epoch: int) -> torch.Tensor:
        """This rank's rows in minibatch order (`.tensor_split(M)`): the same global minibatches at any number
        of ranks, drawn from (seed, step, epoch) rather than the global RNG."""
        return self.dist.minibatch_order(B, self.cfg.algorithm.minibatches, (self.cfg.seed, self.step_count, epoch))

    # ------------------------------------------------------------------------------------------------------

    def step(self) -> StepResult:
        cfg, dist, run = self.cfg, self.dist, self.models
        t_step = time.perf_counter()
        timing = {"generate": 0.0, "score": 0.0, "logprobs": 0.0, "update": 0.0}
        stats: dict[str, float] = {}
        acc = StatAccumulator()

        # 1. collect: sample and score
        rollout, info = collect(cfg, self.sampler, self.backend, self.reward, dist, device=self.device,
                                pad_token_id=self.tokenizer.pad_token_id, healthy=self.health.healthy,
                                episodes=self.episodes, async_generator=self.async_generator)
        timing.update(info.seconds)
        B = len(rollout)
        first_epoch_order = self.minibatch_order(B, epoch=0)
        cause = None
        n_scored = dist.sum(rollout.valid_B.sum().float()).item()
        if self.health.nothing_scored(n_scored, B * dist.world_size, self.step_count + 1):
            # Every advantage would be 0: an update would follow the KL and entropy terms alone.
            stats.update({"update/epochs_done": 0, "update/optimizer_steps": 0, "update/skipped": 0,
                          "update/early_stopped": 0.0, "update/unscored": 1.0})
        else:
            # 2-4 batch-invariant with model.batch_invariant: the trainer's forwards then compute the very
            # log-probs the sampler recorded (core/batch_invariant.py)
            with batch_invariant(cfg.model.batch_invariant):
                # 2. no-grad passes: pi_old, pi_ref, old values
                t0 = time.perf_counter()
                exact = self.sampler_is_exact()
                no_grad_passes(rollout, first_epoch_order, acc, cfg=cfg, run=run, dist=dist, exact_sampler=exact)
                timing["logprobs"] = time.perf_counter() - t0

                # 3. advantages, and the KL to the reference they measured
                measured_kl = compute_advantages(rollout, cfg, dist, beta=self.beta, uses_reference=self.uses_reference,
                                                 old_logprobs_BT=logprobs_before_update(rollout, exact))
                if measured_kl is not None:
                    stats["kl/ref_per_token"] = measured_kl

                # 4. epochs x minibatches of the composite loss
                t0 = time.perf_counter()
                counts, cause = update(rollout, first_epoch_order, acc, cfg=cfg, run=run, dist=dist, opt=self.opt,
                                       beta=self.beta, order_for_epoch=lambda epoch: self.minibatch_order(B, epoch))
            stats.update(counts)
            if self.async_generator is not None:  # the worker samples from these from its next batch on
                self.async_generator.publish(run.policy)
            else:
                self.backend.sync_weights(run.policy)  # a no-op for HF generate; vLLM gets the new weights
            timing["update"] = time.perf_counter() - t0

            # 5. adapt beta from the KL per token measured on this batch (Ziegler et al. 2019)
            if measured_kl is not None:
                self.kl_ctl.update(measured_kl, B * dist.world_size)
        self.step_count += 1

        # 6. statistics of the whole batch, and the health checks
        stats.update(acc.result(dist))  # per-token figures of the whole batch, not rank 0's share
        stats.update(rollout_stats(rollout, dist))
        if cfg.algorithm.filter_groups:
            stats["rollout/filtered_groups"] = float(info.filtered_groups)
            stats["rollout/generation_rounds"] = float(info.generation_rounds)
        if info.rows_by_staleness:  # asynchronous rollouts: the most any batch of the step lags, and the histogram
            stats["rollout/staleness"] = float(max(info.rows_by_staleness))
            drawn = sum(info.rows_by_staleness.values())
            for k in range(cfg.rollout.max_staleness + 1):  # the histogram: share of samples k updates old
                stats[f"rollout/staleness_frac_{k}"] = info.rows_by_staleness.get(k, 0) / drawn
        stats["kl/beta"] = self.beta
        for k, v in timing.items():
            stats[f"time/{k}"] = v
        stats["time/step"] = time.perf_counter() - t_step
        stats["throughput/tokens_per_s"] = stats["completion/tokens"] / max(stats["time/step"], 1e-9)
        stats["optim/lr"] = self.schedulers["policy"].get_last_lr()[0]
        self.health.check_update(stats, self.step_count, cause)
        stats.update(self.health.check_weights(run.trained(), self.step_count, dist, run.sharded))
        if cfg.keep_freed_memory and not self._first_step_memory_released:
            # The first step's garbage (compilation above all) is one-off: hand it back, keep the rest.
            gc.collect()
            release_freed_memory()
            self._first_step_memory_released = True
        return StepResult(self.step_count, stats, rollout)

    # ------------------------------------------------------------------------------------------------------
    # checkpoints

    def state(self) -> dict:
        # Asynchronous rollouts: the rows of batches still in flight are drawn again on resume.
        sampler = (self.async_generator.resume_state(self.sampler) if self.async_generator is not None
                   else self.sampler.state_dict())
        return {"step": self.step_count, "sampler": sampler,
                "kl_controller": self.kl_ctl.state_dict(), **self.health.state_dict()}

    def save(self, keep_last: int) -> Path | None:
        """Write a checkpoint from rank 0 only; every rank must call this (and waits until it is written).

        One layout for every strategy, so a checkpoint resumes at any number of ranks: whole (unsharded)
        models and an unsharded optimiser state, and every rank's RNG state. With FSDP2 the full states are
        first gathered on rank 0 (train/fsdp_checkpoint.py). With LoRA the policy checkpoint is the adapter.
        """
        from tether.train.checkpoint import rng_state, save_checkpoint

        if self.run_dir is None:
            self.dist.barrier()
            return None
        rng_states = self.dist.gather_objects(rng_state())  # each rank resumes its own sampling stream
        trained, optimizers = self.models.trained(), self.optimizers
        if self.models.sharded:
            from tether.train.fsdp_checkpoint import gather_for_checkpoint

            trained, optimizers = gather_for_checkpoint(trained, optimizers, self.models.skeletons, self.dist)
        path = None
        if self.dist.is_main:
            with self._full_precision_models():  # master weights: the checkpoint holds the fp32 masters
                path = save_checkpoint(self.run_dir, self.step_count, models=trained, optimizers=optimizers,
                                       schedulers=self.schedulers, state=self.state(), keep_last=keep_last,
                                       tokenizer=self.tokenizer, rng_states=rng_states)
        self.dist.barrier()
        return path

    def close(self) -> None:
        """Stop what runs beside the trainer (the asynchronous generation worker); safe to call twice."""
        if self.async_generator is not None:
            self.async_generator.close()

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint written at any number of ranks. Every rank reads it: DDP replicas load
        the same weights; FSDP2 ranks read it into plain stand-ins and keep their own shards of it."""
        from tether.train.checkpoint import load_checkpoint, restore_rank_rng

        trained, optimizers = self.models.trained(), self.optimizers
        if self.models.sharded:
            from tether.train.fsdp_checkpoint import stand_ins_for_loading

            trained, optimizers = stand_ins_for_loading(self.models.skeletons)
        with self._full_precision_models(load=True):
            state = load_checkpoint(path, models=trained, optimizers=optimizers, schedulers=self.schedulers,
                                    restore_rng=False)
        if self.models.sharded:
            from tether.train.fsdp_checkpoint import scatter_loaded

            scatter_loaded(self.models.trained(), self.optimizers, trained, optimizers)
        self.step_count = int(state["step"])
        if not restore_rank_rng(path, self.dist.rank):
            # Written at fewer ranks: this rank starts a stream of its own, fixed by (seed, rank, step).
            seed_everything(rank_seed(self.cfg.seed, self.dist.rank, self.step_count))
            log.info("rank %d: no RNG state in %s (written at fewer ranks); reseeded from (seed, rank, step)",
                     self.dist.rank, path)
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.health.load_state_dict(state)
        self.backend.sync_weights(self.policy)

    def _full_precision_models(self, load: bool = False) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for mw in self.masters.values():
            stack.enter_context(mw.full_precision(load=load))
        return stack
