"""The RL training loop: one step reads top to bottom like the roadmap of the PPO seed.

    collect (generate G completions per prompt) -> score -> pi_old / pi_ref log-probs and values (no grad)
    -> KL in the reward or in the loss -> advantages -> K epochs x M minibatches of the composite loss
    -> early stop on approx KL(old, new) -> adapt beta from the measured KL per token -> statistics.

Every algorithmic choice is a field of `TrainConfig.algorithm`; the pieces are `tether.core` functions.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import get_scheduler

from tether import models as M
from tether.config import TrainConfig, dump_yaml
from tether.core.advantages import ADVANTAGES, kl_shaped_token_rewards, masked_mean, masked_whiten
from tether.core.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from tether.core.losses import POLICY_LOSSES, aggregate, composite_loss, explained_variance, value_loss
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
from tether.train.host_memory import keep_freed_memory, release_freed_memory
from tether.train.precision import MasterWeights
from tether.train.stats import StatAccumulator

log = logging.getLogger("tether")


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. several non-finite steps in a row)."""


@dataclass
class StepResult:
    step: int
    metrics: dict[str, float]
    rollout: Rollout = field(repr=False)


def configure_process(cfg: TrainConfig):
    """Process-wide settings of a run: torch's CPU threads and the allocator's reuse of freed memory. Returns
    the thread policy to adjust between steps under threads=auto (see train/threads.py), else None."""
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
        # Process-wide settings (threads, malloc) are the caller's: the CLI applies them (configure_process).
        seed_everything(rank_seed(cfg.seed, self.dist.rank))
        self.device = M.resolve_device(cfg.device)
        self.run_dir = Path(run_dir) if run_dir else None
        a, m = cfg.algorithm, cfg.model

        # --- models -------------------------------------------------------------------------------------
        self.tokenizer = M.load_tokenizer(m.path, trust_remote_code=m.trust_remote_code)
        # With master weights the model is read in float32 (the masters, and the reference copy, come from the
        # checkpoint's own values) and cast to model.dtype below.
        load_dtype = "float32" if m.master_weights else m.dtype
        self.policy = M.load_causal_lm(m.path, dtype=load_dtype, trust_remote_code=m.trust_remote_code,
                                       device=self.device, disable_dropout=m.disable_dropout)
        self.context_window = M.context_window(self.policy)
        self.autocast_dtype = M.DTYPES[m.autocast] if m.autocast else None
        self.uses_reference = a.kl_mode != "none" and (a.beta > 0 or a.kl_target is not None)
        if m.lora.r > 0:
            self.policy = M.apply_lora(self.policy, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                                       target_modules=m.lora.target_modules)
        if m.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            self.policy.config.use_cache = False
        self.reference = None
        if self.uses_reference:
            if m.lora.r > 0 and m.ref_path is None:
                self.reference = M.ReferencePolicy(adapter_host=self.policy)
            elif m.ref_path is None:
                self.reference = M.ReferencePolicy(model=M.copy_frozen(self.policy, m.frozen_dtype_name()))
            else:
                ref = M.load_causal_lm(m.ref_path, dtype=m.frozen_dtype_name(),
                                       trust_remote_code=m.trust_remote_code, device=self.device)
                self.reference = M.ReferencePolicy(model=M.freeze(ref))
        self.critic = None
        self.shared_critic = a.use_critic and a.critic == "shared"
        if self.shared_critic:
            self.critic = M.SharedValueHead(M.hidden_size(self.policy)).to(self.device, M.DTYPES[load_dtype])
        elif a.use_critic:
            self.critic = M.ValueModel.from_pretrained(m.critic_path or m.path, dtype=load_dtype,
                                                       trust_remote_code=m.trust_remote_code,
                                                       disable_dropout=m.disable_dropout).to(self.device)
            if m.gradient_checkpointing:
                self.critic.gradient_checkpointing_enable()
        self.policy.train()
        # HF turns the KV cache off in a checkpointed model's training forwards; prompt sharing needs it.
        self.share_prompts = (cfg.optim.share_prompts and not m.gradient_checkpointing
                              and cfg.rollout.group_size > 1)
        self.masters: dict[str, MasterWeights] = {}
        if m.master_weights:
            if self.dist.enabled:
                from tether.config import ConfigError

                raise ConfigError("model.master_weights=true runs on one process for now: use model.autocast="
                                  "bfloat16 with several ranks")
            self.masters = {name: MasterWeights(module, M.DTYPES[m.dtype])
                            for name, module in self._checkpointed_models().items()}
        self._wrap_distributed()
        # The training and pi_old forwards go through the compiled module (one graph with grad, one without);
        # generation, the reference and the checkpoints use the plain one, which holds the same parameters.
        self.compiled_policy = None
        if m.compile:
            if self.dist.enabled:
                from tether.config import ConfigError

                raise ConfigError("model.compile=true runs on one process for now")
            self.compiled_policy = torch.compile(self.policy, dynamic=True)
            self.policy_module = self.compiled_policy

        # --- optimisation -------------------------------------------------------------------------------
        o = cfg.optim
        self.updates_per_step = a.epochs * a.minibatches
        total_updates = cfg.steps * self.updates_per_step
        self.optimizers = {"policy": self._adamw("policy", self.policy, o.lr)}
        if self.critic is not None:
            self.optimizers["critic"] = self._adamw("critic", self.critic, o.critic_lr)
        sched_name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[o.schedule]
        self.schedulers = {k: get_scheduler(sched_name, opt, num_warmup_steps=o.warmup_steps,
                                            num_training_steps=total_updates)
                           for k, opt in self.optimizers.items()}
        self.kl_ctl = (AdaptiveKLController(a.beta, a.kl_target, a.kl_horizon) if a.kl_target is not None
                       else FixedKLController(a.beta))

        # --- rollouts, rewards, data --------------------------------------------------------------------
        self.backend = self._make_backend()
        self.reward = reward_fn
        from tether.data import PromptSampler

        rows = self._rows_that_fit(rows)
        self.rows = rows
        self.sampler = PromptSampler(rows, batch_size=cfg.rollout.prompts_per_step, seed=cfg.seed,
                                     shuffle=cfg.data.shuffle)
        self.step_count = 0
        self._first_step_memory_released = False
        self.bad_steps = 0
        self.unscored_steps = 0
        self.healthy = True  # no update so far has blown the weights up (see _check_weight_norms)
        self.weight_norms: dict[str, float] = {}
        if self.run_dir is not None and self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")

    # ------------------------------------------------------------------------------------------------------
    # set-up helpers

    def _adamw(self, name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        params = (self.masters[name].params if name in self.masters
                  else [p for p in model.parameters() if p.requires_grad])
        o = self.cfg.optim
        # The fused kernel updates all parameters in one pass (4x faster optimiser step on CPU, measured).
        return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay,
                                 fused=not (self.dist.enabled and self.cfg.distributed.strategy == "fsdp"))

    def _wrap_distributed(self) -> None:
        """DDP (replicated) or FSDP2 (sharded) wrappers when launched with several ranks.

        ddp:  policy and critic are replicated; training forwards go through the DDP wrappers, whose backward
              averages gradients over ranks (the loss is scaled by world_size for that). No-grad passes and
              generation call the plain modules and communicate nothing.
        fsdp: every transformer block, then the whole model, of the policy and the critic is a `fully_shard`
              unit: parameters, gradients and optimiser state are split over ranks, and each training forward
              gathers one block at a time. `generate` gathers the whole policy once per call (not once per
              token), reshards after it, and runs with HF's `synced_gpus` (a rank that has finished keeps
              stepping until all have). The reference stays a plain frozen copy on every rank
              (`model.frozen_dtype=bfloat16` halves it), or, with LoRA, the policy with its adapters off:
              no collective in its passes, at the cost of one unsharded frozen copy per rank. Checkpoints
              hold full states (see `save`), so they load at any number of ranks.
        Either way every rank must run the same number of forward/backward passes: the batch checks below and
        the loop's equal shares of rows see to that.
        """
        self.policy_module = self.policy  # what forward passes call (the wrapper, if any)
        self.critic_module = self.critic
        if not self.dist.enabled:
            return
        self._check_distributed_batch()
        if self.cfg.distributed.strategy == "fsdp":
            from tether.train.distributed import meta_skeleton, shard_model

            # Plain, memory-free copies of the structures, for checkpoints of the full (unsharded) states.
            self._skeletons = {name: meta_skeleton(m) for name, m in self._checkpointed_models().items()}
            for mod in [self.policy] + ([self.critic] if self.critic is not None else []):
                shard_model(mod, self.dist.world_size, self.device.type)
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        self.policy_module = DDP(self.policy, device_ids=ids)
        if self.critic is not None:
            self.critic_module = DDP(self.critic, device_ids=ids)

    def _check_distributed_batch(self) -> None:
        """Each rank gets whole prompts, and the same number of rows of every minibatch."""
        from tether.config import ConfigError

        r, a, w = self.cfg.rollout, self.cfg.algorithm, self.dist.world_size
        if self.shared_critic and self.cfg.distributed.strategy == "fsdp":
            raise ConfigError("algorithm.critic=shared is not supported with distributed.strategy=fsdp yet: use "
                              "ddp, or algorithm.critic=separate")
        if r.prompts_per_step % w:
            raise ConfigError(f"rollout.prompts_per_step={r.prompts_per_step} cannot be split evenly over "
                              f"{w} ranks: make it a multiple of {w}.")
        rows = r.prompts_per_step // w * r.group_size
        if rows % a.minibatches:
            raise ConfigError(f"with {w} ranks each rank holds {rows} sequences per step "
                              f"(prompts_per_step / ranks x group_size), which algorithm.minibatches="
                              f"{a.minibatches} does not divide: every rank must hold an equal share of "
                              "every minibatch.")
        if a.filter_groups:
            raise ConfigError("algorithm.filter_groups (dynamic sampling) keeps a different number of groups "
                              "on each rank and is not supported with several ranks yet; run it on one rank.")

    def _make_backend(self):
        r, m = self.cfg.rollout, self.cfg.model
        if r.backend == "vllm":
            from tether.rollout.vllm import VLLMBackend

            return VLLMBackend(self.policy, self.tokenizer, m.path, r)
        from tether.rollout.hf import HFGenerateBackend

        return HFGenerateBackend(self.policy, self.tokenizer, max_new_tokens=r.max_new_tokens,
                                 temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                 stop_strings=r.stop_strings, micro_batch_size=r.micro_batch_size,
                                 chat_template=m.chat_template, autocast_dtype=self.autocast_dtype,
                                 weights_dtype=self._sampler_weights_dtype(),
                                 compile_backend="inductor" if r.compile else None,
                                 decode_attention=r.decode_attention, packed_linears=r.packed_linears,
                                 # Under FSDP the prefill would gather the shards on its own, and only on
                                 # ranks whose prompts repeat: generate's gather must stay the only one.
                                 share_prompts=self.cfg.optim.share_prompts and not (
                                     self.dist.enabled and self.cfg.distributed.strategy == "fsdp"))

    def _sampler_weights_dtype(self) -> torch.dtype | None:
        """The dtype of the HF sampler's own copy of the policy; None: sample from the policy itself."""
        r, m = self.cfg.rollout, self.cfg.model
        fsdp = self.dist.enabled and self.cfg.distributed.strategy == "fsdp"
        if r.weights_dtype == "auto":
            return torch.bfloat16 if m.autocast == "bfloat16" and not fsdp else None
        if r.weights_dtype == "policy":
            return None
        if fsdp:
            from tether.config import ConfigError

            raise ConfigError(f"rollout.weights_dtype={r.weights_dtype} keeps a whole copy of the policy, which "
                              "FSDP shards: use rollout.weights_dtype=policy with distributed.strategy=fsdp")
        return M.DTYPES[r.weights_dtype]

    @property
    def beta(self) -> float:
        return self.kl_ctl.value

    # ------------------------------------------------------------------------------------------------------
    # 1. collect: generate and score

    def collect(self) -> Rollout:
        """Draw prompts, sample G completions each, score them; DAPO-style refill of filtered groups."""
        a, r = self.cfg.algorithm, self.cfg.rollout
        wanted = r.prompts_per_step // self.dist.world_size
        kept: list[Rollout] = []
        n_groups = 0
        for round_ in range(1 + (a.max_filter_rounds if a.filter_groups else 0)):
            rows = self.dist.shard(self.sampler.next_batch(), 1)
            t0 = time.perf_counter()
            try:
                rollout = self.backend.generate(rows, [row["prompt"] for row in rows], group_size=r.group_size)
            except RuntimeError as e:
                if "probability tensor contains" not in str(e):
                    raise
                raise TrainingError(
                    "sampling got non-finite next-token probabilities: the policy's weights no longer give "
                    "finite logits" + ("" if self.healthy else " since an unstable update (see the warning "
                                       "above); resume from the last healthy checkpoint with a lower optim.lr")
                ) from e
            self.timing["generate"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            self.score(rollout)
            self.timing["score"] += time.perf_counter() - t0
            if a.filter_groups:
                rollout, dropped = self._filter_uniform_groups(rollout)
                self.filtered_groups += dropped
            kept.append(rollout)
            n_groups += len(rollout) // r.group_size
            if not a.filter_groups or n_groups >= wanted:
                break
        rollout = Rollout.concat([k for k in kept if len(k)] or kept[:1], self.tokenizer.pad_token_id)
        if a.filter_groups and len(rollout) > wanted * r.group_size:
            rollout = rollout.select(list(range(wanted * r.group_size)))
        if len(rollout) == 0:
            raise TrainingError("every group had identical rewards after all refill rounds "
                                "(algorithm.filter_groups): nothing to learn from; check the reward")
        return rollout

    def _rows_that_fit(self, rows: list[dict]) -> list[dict]:
        """The rows whose prompt, as the sampler will feed it (chat template included), leaves room for
        rollout.max_new_tokens in the context window (or is within rollout.max_prompt_tokens). The others are
        skipped with one warning, or are a DataError under data.on_bad_row=error, before anything runs."""
        from tether.data import DataError
        from tether.rollout.hf import prompt_token_count

        r = self.cfg.rollout
        if self.context_window is None and not r.max_prompt_tokens:
            return rows
        limit = r.max_prompt_tokens or (self.context_window - r.max_new_tokens)
        why = (f"rollout.max_prompt_tokens={limit}" if r.max_prompt_tokens else
               f"the context window of {self.context_window} tokens less rollout.max_new_tokens={r.max_new_tokens}")
        kept, too_long = [], []
        for i, row in enumerate(rows):
            n = prompt_token_count(self.tokenizer, row["prompt"], chat_template=self.cfg.model.chat_template)
            if n <= limit:
                kept.append(row)
                continue
            problem = f"row {i}: prompt of {n} tokens does not fit {why} (limit {limit}): {row['prompt'][:60]!r}"
            if self.cfg.data.on_bad_row == "error":
                raise DataError(f"{problem}; shorten it, raise the limit, or set data.on_bad_row=skip")
            too_long.append(problem)
        if not kept:
            raise DataError(f"all {len(rows)} prompts are too long: {too_long[0]}")
        if too_long:
            log.warning("skipped %d of %d prompts that do not fit (data.on_bad_row=skip); first: %s",
                        len(too_long), len(rows), too_long[0])
        return kept

    def score(self, rollout: Rollout) -> None:
        columns: dict[str, list] = {}
        keys = {k for row in rollout.rows for k in row if k != "prompt"}
        for k in sorted(keys):
            columns[k] = [row.get(k) for row in rollout.rows]
        columns["truncated"] = rollout.truncated_B.tolist()
        columns["completion_lengths"] = rollout.completion_lengths_B.tolist()
        result = self.reward(rollout.prompts, rollout.completions, columns)
        rollout.scores_B = result.scores.float().to(self.device)
        rollout.valid_B = result.valid.bool().to(self.device)
        rollout.reward_stats = dict(result.stats)

    def _filter_uniform_groups(self, rollout: Rollout) -> tuple[Rollout, int]:
        G = rollout.group_size
        scores = rollout.scores_B.view(-1, G)
        valid = rollout.valid_B.view(-1, G)
        spread = torch.where(valid, scores, torch.nan)
        has_signal = (torch.nan_to_num(spread, nan=float("inf")).amin(-1)
                      < torch.nan_to_num(spread, nan=float("-inf")).amax(-1))
        keep = has_signal.nonzero().flatten()
        rows = (keep.unsqueeze(-1) * G + torch.arange(G)).flatten()
        return rollout.select(rows), int((~has_signal).sum())

    # ------------------------------------------------------------------------------------------------------
    # 2. no-grad passes: pi_old and pi_ref log-probs, old values

    def _minibatch_order(self, B: int, epoch: int) -> torch.Tensor:
        """This rank's rows in minibatch order (`.tensor_split(M)`): the same global minibatches at any number
        of ranks, drawn from (seed, step, epoch) rather than the global RNG."""
        return self.dist.minibatch_order(B, self.cfg.algorithm.minibatches, (self.cfg.seed, self.step_count, epoch))

    def _micro_batches(self, rollout: Rollout, rows: torch.Tensor):
        o = self.cfg.optim
        mbs = split_micro_batches(rollout, rows, micro_batch_size=o.micro_batch_size,
                                  token_budget=o.token_budget)
        if self.dist.enabled and o.token_budget is not None:
            # DDP and FSDP communicate in every forward/backward: every rank runs as many micro-batches.
            n = int(self.dist.max(torch.tensor(len(mbs))).item())
            if n > len(mbs):
                mbs = [make_micro_batch(rollout, idx) for idx in split_to_count([mb.index for mb in mbs], n)]
        return mbs

    def _sampler_is_exact(self) -> bool:
        """The sampler drew from softmax(logits / T) of the trained policy's own forward (no top-k / top-p
        truncation, not a copy in another precision)."""
        r = self.cfg.rollout
        return (r.top_k == 0 and r.top_p >= 1.0 and r.backend == "hf"
                and not getattr(self.backend, "samples_from_copy", False))

    @torch.no_grad()
    def reference_passes(self, rollout: Rollout, first_epoch_order: torch.Tensor, acc: StatAccumulator) -> None:
        a, r = self.cfg.algorithm, self.cfg.rollout
        B, T = rollout.response_mask_BT.shape
        # A shared critic needs a forward of the policy for the old values anyway: pi_old comes with it.
        need_old = self.shared_critic or self.updates_per_step > 1 or (
            a.kl_mode == "reward" and self.uses_reference and not self._sampler_is_exact())
        minibatches = first_epoch_order.tensor_split(a.minibatches)
        # Micro-batches aligned with the first epoch's, so the first minibatch's ratio is exactly 1.
        micro = [mb for rows in minibatches for mb in self._micro_batches(rollout, rows)]
        no_grad_size = self.cfg.optim.no_grad_micro_batch_size
        frozen_micro = micro if no_grad_size is None else [
            make_micro_batch(rollout, rows) for rows in first_epoch_order.split(no_grad_size)]
        if need_old:
            rollout.old_logprobs_BT = torch.zeros(B, T, device=self.device)
            if self.shared_critic:
                rollout.old_values_BT = torch.zeros(B, T, device=self.device)
            for mb in micro:
                lp, _, values = policy_logprobs_and_values(
                    self.policy if self.compiled_policy is None else self.compiled_policy, self.critic if self.shared_critic else None, mb,
                    temperature=r.temperature, with_entropy=False, autocast_dtype=self.autocast_dtype,
                    share_prompts=self.share_prompts)
                scatter_rows(rollout.old_logprobs_BT, mb, lp)
                if values is not None:
                    scatter_rows(rollout.old_values_BT, mb, values)
                self._log_mismatch(acc, lp, gather_rows(rollout.sampler_logprobs_BT, mb)
                                   if rollout.sampler_logprobs_BT is not None else None, mb.response_mask)
        if self.uses_reference:
            rollout.ref_logprobs_BT = torch.zeros(B, T, device=self.device)
            with self.reference.active() as ref_model:
                for mb in frozen_micro:
                    lp, _ = policy_logprobs(ref_model, mb, temperature=r.temperature, with_entropy=False,
                                            autocast_dtype=self.autocast_dtype, share_prompts=self.share_prompts)
                    scatter_rows(rollout.ref_logprobs_BT, mb, lp)
        if self.critic is not None and not self.shared_critic:
            rollout.old_values_BT = torch.zeros(B, T, device=self.device)
            for mb in frozen_micro:
                scatter_rows(rollout.old_values_BT, mb, critic_values(self.critic, mb,
                                                                      autocast_dtype=self.autocast_dtype))

    @staticmethod
    def _log_mismatch(acc: StatAccumulator, trainer_lp: torch.Tensor, sampler_lp: torch.Tensor | None,
                      mask: torch.Tensor) -> None:
        """|log pi_sampler - log pi_trainer| per token: must be float noise when both are the same policy."""
        if sampler_lp is None:
            return
        gap = (trainer_lp - sampler_lp).abs() * mask
        acc.maximum("rollout/logprob_mismatch_max", gap.max())
        acc.mean("rollout/logprob_mismatch_mean", gap.sum() / mask.sum().clamp(min=1), mask.sum())

    def policy_logprobs_before_update(self, rollout: Rollout) -> torch.Tensor | None:
        """log pi_old for KL-in-reward and the KL statistic: the old pass, else the exact sampler log-probs."""
        if rollout.old_logprobs_BT is not None:
            return rollout.old_logprobs_BT
        if self._sampler_is_exact():
            return rollout.sampler_logprobs_BT
        return None

    # ------------------------------------------------------------------------------------------------------
    # 3. advantages

    def compute_advantages(self, rollout: Rollout, stats: dict) -> None:
        a = self.cfg.algorithm
        mask = rollout.response_mask_BT
        valid = rollout.valid_B
        scores = torch.where(valid, rollout.scores_B, torch.zeros_like(rollout.scores_B))
        token_rewards = None
        old_lp = self.policy_logprobs_before_update(rollout)
        if self.uses_reference and old_lp is not None:
            # Sampled KL per token of the policy that generated the batch, for logging and adaptive beta.
            kl_k1 = KL_ESTIMATORS["k1"](old_lp, rollout.ref_logprobs_BT) * mask
            stats["kl/ref_per_token"] = self._global_masked_mean(kl_k1, mask)
        if a.kl_mode == "reward" and self.uses_reference:
            kl_BT = KL_ESTIMATORS[a.kl_estimator](old_lp, rollout.ref_logprobs_BT) * mask
            if a.advantage == "gae":
                token_rewards = kl_shaped_token_rewards(scores, kl_BT, mask, beta=self.beta)
            else:  # outcome estimators see the sequence score minus the summed KL penalty
                scores = scores - self.beta * kl_BT.sum(-1)
        scores_global = self.dist.gather_cat(scores)
        valid_global = self.dist.gather_cat(valid)
        fn = ADVANTAGES[a.advantage]
        if a.advantage == "gae":
            adv, returns = fn(scores_B=scores, response_mask_BT=mask, token_rewards_BT=token_rewards,
                              values_BT=rollout.old_values_BT, gamma=a.gamma, lam=a.lam)
        else:
            # Outcome baselines need batch-wide statistics: compute on the gathered scores, keep our rows.
            T = mask.shape[1]
            ones = torch.ones(scores_global.shape[0], T, device=mask.device)
            adv_all, _ = fn(scores_B=scores_global, response_mask_BT=ones, group_size=rollout.group_size,
                            std_scale=a.std_scale, valid_B=valid_global)
            lo = self.dist.rank * len(rollout)
            adv, returns = adv_all[lo:lo + len(rollout)] * mask, None
        if a.whiten_advantages:
            adv = self._global_whiten(adv, mask * valid.unsqueeze(-1))
        rollout.advantages_BT = adv * mask * valid.unsqueeze(-1)
        rollout.returns_BT = returns

    def _global_masked_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        s = self.dist.sum(torch.stack([(x * mask).sum(), mask.sum()]))
        return (s[0] / s[1].clamp(min=1)).item()

    def _global_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.dist.enabled:
            return masked_whiten(x, mask)
        s = self.dist.sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
        mean = s[0] / s[2]
        var = (s[1] / s[2] - mean**2) * s[2] / (s[2] - 1).clamp(min=1)
        return (x - mean) * torch.rsqrt(var + 1e-8)

    # ------------------------------------------------------------------------------------------------------
    # 4. the update: K epochs x M minibatches of the composite loss

    def update(self, rollout: Rollout, first_epoch_order: torch.Tensor, acc: StatAccumulator) -> dict:
        a, r = self.cfg.algorithm, self.cfg.rollout
        B, T = rollout.response_mask_BT.shape
        loss_fn = POLICY_LOSSES[a.policy_loss]
        need_entropy = True  # entropy per token is always logged; it is computed in the same chunked pass
        world = self.dist.world_size
        epochs_done, updates, skipped, stopped_early = 0, 0, 0, False
        first_minibatch = True
        for epoch in range(a.epochs):
            order = first_epoch_order if epoch == 0 else self._minibatch_order(B, epoch)
            for mb_rows in order.tensor_split(a.minibatches):
                # Denominators of the whole minibatch over all ranks: micro-batches and ranks then add up
                # to exactly the full-minibatch loss (DDP averages gradients, hence the factor `world`).
                counts = self.dist.sum(torch.stack([torch.tensor(float(len(mb_rows))),
                                                    rollout.response_mask_BT[mb_rows].sum().cpu()]))
                n_seq, n_tok = counts[0].item(), counts[1].item()
                mb_loss_stats: dict[str, torch.Tensor] = {}
                approx_kl_sum = torch.zeros(())
                for mb in self._micro_batches(rollout, mb_rows):
                    lp, ent, shared_values = policy_logprobs_and_values(
                        self.policy_module, self.critic_module if self.shared_critic else None, mb,
                        temperature=r.temperature, with_entropy=need_entropy, autocast_dtype=self.autocast_dtype,
                        share_prompts=self.share_prompts)
                    mask = mb.response_mask
                    old = (gather_rows(rollout.old_logprobs_BT, mb) if rollout.old_logprobs_BT is not None
                           else lp.detach())
                    adv = gather_rows(rollout.advantages_BT, mb)
                    if a.tis_cap is not None and rollout.sampler_logprobs_BT is not None:
                        # Truncated IS for sampler/trainer mismatch: w = min(pi_old / pi_sampler, cap).
                        w = torch.exp(old - gather_rows(rollout.sampler_logprobs_BT, mb)).clamp(max=a.tis_cap)
                        adv = adv * w.detach()
                    pl_BT, pstats = loss_fn(lp, old, adv, mask, eps_low=a.eps_low, eps_high=a.eps_high,
                                            dual_clip=a.dual_clip)
                    kl_BT = None
                    if a.kl_mode == "loss" and self.uses_reference:
                        kl_BT = KL_ESTIMATORS[a.kl_estimator](lp, gather_rows(rollout.ref_logprobs_BT, mb))
                    loss, lstats = composite_loss(
                        policy_loss_BT=pl_BT, response_mask_BT=mask, aggregation=a.aggregation,
                        entropy_BT=ent, entropy_coef=a.entropy_coef, kl_BT=kl_BT,
                        kl_coef=self.beta if kl_BT is not None else 0.0,
                        num_sequences=n_seq, num_tokens=n_tok, max_len=r.max_new_tokens)
                    if self.shared_critic:  # one backward: the value loss also flows into the shared trunk
                        vloss = self._value_loss(shared_values, rollout, mb, n_seq, n_tok, lstats, acc)
                        loss = loss + a.value_coef * vloss
                    (loss * world).backward()
                    if self.critic is not None and not self.shared_critic:
                        # The value term of the composite loss shares no parameters with the policy terms:
                        # its own backward, after the policy's activations are freed, lowers peak memory.
                        values = critic_values(self.critic_module, mb, autocast_dtype=self.autocast_dtype)
                        vloss = self._value_loss(values, rollout, mb, n_seq, n_tok, lstats, acc)
                        (a.value_coef * vloss * world).backward()
                    ntok = mask.sum()
                    for k, v in lstats.items():  # each micro-batch holds its share of the minibatch sum
                        mb_loss_stats[k] = mb_loss_stats.get(k, 0.0) + v.detach()
                    if "approx_kl" in pstats:
                        approx_kl_sum = approx_kl_sum + pstats["approx_kl"].detach() * ntok
                    for k in ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "dual_clip_frac"):
                        if k in pstats:
                            acc.mean(f"policy/{k}", pstats[k], ntok)
                    if "ratio_min" in pstats:
                        acc.minimum("policy/ratio_min", pstats["ratio_min"])
                        acc.maximum("policy/ratio_max", pstats["ratio_max"])
                    if ent is not None:
                        acc.mean("policy/entropy", (ent * mask).sum() / ntok.clamp(min=1), ntok)
                    if first_minibatch and rollout.old_logprobs_BT is None:
                        # No old pass: the first minibatch's forward is pi_old, the policy that sampled.
                        self._log_mismatch(acc, lp.detach(), gather_rows(rollout.sampler_logprobs_BT, mb), mask)
                    if first_minibatch and "ratio_max" in pstats:
                        acc.maximum("policy/first_minibatch_ratio_dev",
                                    (torch.exp(lp.detach() - old) - 1).abs().mul(mask).max())
                first_minibatch = False
                keys = list(mb_loss_stats)
                summed = self.dist.sum(torch.stack([mb_loss_stats[k] for k in keys] + [approx_kl_sum]))
                for k, v in zip(keys, summed[:-1]):
                    acc.mean(k, v)
                if self._optimizer_step(acc):
                    updates += 1
                else:
                    skipped += 1
                # Early stop when pi_theta has moved too far from pi_old (same decision on every rank).
                if a.target_approx_kl is not None and summed[-1].item() / max(n_tok, 1) > a.target_approx_kl:
                    stopped_early = True
                    break
            epochs_done += 1
            if stopped_early:
                break
        return {"update/epochs_done": epochs_done, "update/optimizer_steps": updates,
                "update/skipped": skipped, "update/early_stopped": float(stopped_early)}

    def _value_loss(self, values: torch.Tensor, rollout: Rollout, mb, n_seq: float, n_tok: float,
                    lstats: dict, acc: StatAccumulator) -> torch.Tensor:
        """The value term of the composite loss for one micro-batch (its share of the minibatch)."""
        a, mask = self.cfg.algorithm, mb.response_mask
        vl_BT, vstats = value_loss(values, gather_rows(rollout.old_values_BT, mb), gather_rows(rollout.returns_BT, mb),
                                   mask, clip_range=a.value_clip)
        vloss = aggregate(vl_BT, mask, a.aggregation, num_sequences=n_seq, num_tokens=n_tok,
                          max_len=self.cfg.rollout.max_new_tokens)
        lstats["loss/value"] = vloss.detach()
        lstats["loss/total"] = lstats["loss/total"] + a.value_coef * vloss.detach()
        acc.mean("value/clip_frac", vstats["value_clip_frac"], mask.sum())
        return vloss

    def _optimizer_step(self, acc: StatAccumulator) -> bool:
        """Clip, check finiteness, step. A non-finite loss or gradient leaves weights and optimiser as they were."""
        max_norm = self.cfg.optim.max_grad_norm
        ok = True
        for name, opt in self.optimizers.items():
            params = [p for g in opt.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
            if hasattr(norm, "full_tensor"):  # FSDP2: the norm over sharded gradients is a DTensor
                norm = norm.full_tensor()
            acc.mean(f"optim/grad_norm_{name}", norm)
            if not torch.isfinite(norm):
                ok = False
                self.last_bad_cause = f"non-finite gradient norm of the {name} ({norm.item()})"
        if ok:
            for name, opt in self.optimizers.items():
                opt.step()
                self.schedulers[name].step()
                if name in self.masters:
                    self.masters[name].masters_to_model()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        return ok

    # ------------------------------------------------------------------------------------------------------
    # one step

    def step(self) -> StepResult:
        a, r = self.cfg.algorithm, self.cfg.rollout
        self.timing = {"generate": 0.0, "score": 0.0, "logprobs": 0.0, "update": 0.0}
        self.filtered_groups = 0
        t_step = time.perf_counter()
        stats: dict[str, float] = {}

        rollout = self.collect()
        B = len(rollout)
        first_epoch_order = self._minibatch_order(B, epoch=0)
        acc = StatAccumulator()

        if self._nothing_scored(rollout):
            # Every advantage would be 0: an update would follow the KL and entropy terms alone, away from
            # nothing the reward said. Skip it, say so, and stop if it goes on (_check_unscored).
            stats.update({"update/epochs_done": 0, "update/optimizer_steps": 0, "update/skipped": 0,
                          "update/early_stopped": 0.0, "update/unscored": 1.0})
        else:
            t0 = time.perf_counter()
            self.reference_passes(rollout, first_epoch_order, acc)
            self.timing["logprobs"] = time.perf_counter() - t0

            self.compute_advantages(rollout, stats)

            t0 = time.perf_counter()
            stats.update(self.update(rollout, first_epoch_order, acc))
            self.backend.sync_weights(self.policy)  # a no-op for HF generate; vLLM gets the new weights
            self.timing["update"] = time.perf_counter() - t0
        stats.update(acc.result(self.dist))  # per-token figures of the whole batch, not rank 0's share

        # Adaptive beta from the KL per token measured on this batch (Ziegler et al. 2019).
        if "kl/ref_per_token" in stats:
            self.kl_ctl.update(stats["kl/ref_per_token"], B * self.dist.world_size)
        self.step_count += 1
        stats.update(self._rollout_stats(rollout))
        stats["kl/beta"] = self.beta
        for k, v in self.timing.items():
            stats[f"time/{k}"] = v
        stats["time/step"] = time.perf_counter() - t_step
        stats["throughput/tokens_per_s"] = stats["completion/tokens"] / max(stats["time/step"], 1e-9)
        stats["optim/lr"] = self.schedulers["policy"].get_last_lr()[0]
        self._check_finite_step(stats)
        stats.update(self._check_weight_norms())
        if self.cfg.keep_freed_memory and not self._first_step_memory_released:
            # The first step's garbage (compilation above all) is one-off: hand it back, keep the rest.
            gc.collect()
            release_freed_memory()
            self._first_step_memory_released = True
        return StepResult(self.step_count, stats, rollout)

    def _rollout_stats(self, rollout: Rollout) -> dict[str, float]:
        mask = rollout.response_mask_BT
        valid = rollout.valid_B
        lengths = mask.sum(-1)
        scores = rollout.scores_B[valid]
        d = self.dist
        n_valid = d.sum(valid.sum().float())
        s = d.sum(torch.stack([scores.sum(), (scores**2).sum(), lengths.sum(), rollout.truncated_B.float().sum(),
                               torch.tensor(float(len(rollout)))]))
        mean = s[0] / n_valid.clamp(min=1)
        var = (s[1] / n_valid.clamp(min=1) - mean**2).clamp(min=0)
        adv_mask = mask * valid.unsqueeze(-1)
        adv = rollout.advantages_BT
        inf = torch.tensor(math.inf)
        lo = d.min(scores.min() if len(scores) else inf).item()  # a rank with no score defers to the others
        hi = d.max(scores.max() if len(scores) else -inf).item()
        # No sample scored: the reward figures are missing (not 0), so no curve shows a reward never measured.
        rewards = {} if n_valid.item() == 0 else {"reward/mean": mean.item(), "reward/std": var.sqrt().item(),
                                                  "reward/min": lo, "reward/max": hi}
        out = {
            **rewards,
            "reward/valid_frac": (n_valid / s[4]).item(),
            "completion/length_mean": (s[2] / s[4]).item(),
            "completion/length_max": d.max(lengths.max()).item(),
            "completion/truncated_frac": (s[3] / s[4]).item(),
            "completion/tokens": s[2].item(),
        }
        if adv is not None:
            out.update(self._advantage_stats(adv, adv_mask))
        if self.cfg.algorithm.filter_groups:
            out["rollout/filtered_groups"] = float(self.filtered_groups)
        if rollout.returns_BT is not None and rollout.old_values_BT is not None:
            out["value/explained_variance"] = self._explained_variance(rollout.old_values_BT, rollout.returns_BT,
                                                                       mask)
        # The scorer's figures describe this rank's rows (every rank holds as many): average them over
        # ranks, and keep the global reward/mean and reward/std computed above.
        rs = dict(rollout.reward_stats)
        if rs and d.enabled:
            keys = sorted(rs)
            avg = d.sum(torch.tensor([float(rs[k]) for k in keys], dtype=torch.float64)) / d.world_size
            rs = dict(zip(keys, avg.tolist()))
        out = {**rs, **out}
        return out

    def _advantage_stats(self, adv: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Mean and (population) std of the advantages over the batch's scored completion tokens, all ranks."""
        if not self.dist.enabled:
            if mask.sum() == 0:
                return {"advantages/mean": 0.0, "advantages/std": 0.0}
            mean = masked_mean(adv, mask)
            return {"advantages/mean": mean.item(),
                    "advantages/std": masked_mean((adv - mean) ** 2, mask).sqrt().item()}
        s = self.dist.sum(torch.stack([(adv * mask).sum(), (adv * adv * mask).sum(), mask.sum()]).double())
        n = s[2].clamp(min=1)
        mean = s[0] / n
        return {"advantages/mean": mean.item(), "advantages/std": (s[1] / n - mean**2).clamp(min=0).sqrt().item()}

    def _explained_variance(self, values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
        """1 - Var[R - V] / Var[R] over the masked tokens of every rank (unbiased variances)."""
        if not self.dist.enabled:
            return explained_variance(values, returns, mask).item()
        v, R = values.detach().double(), returns.detach().double()
        d = R - v
        s = self.dist.sum(torch.stack([(R * mask).sum(), (R * R * mask).sum(), (d * mask).sum(),
                                       (d * d * mask).sum(), mask.double().sum()]))
        n = s[4]
        var_R = (s[1] - s[0] ** 2 / n) / (n - 1).clamp(min=1)
        var_d = (s[3] - s[2] ** 2 / n) / (n - 1).clamp(min=1)
        return (1.0 - var_d / var_R).item() if var_R > 0 else math.nan

    def _nothing_scored(self, rollout: Rollout) -> bool:
        if self.dist.sum(rollout.valid_B.sum().float()).item() > 0:
            self.unscored_steps = 0
            return False
        self.unscored_steps += 1
        log.warning("step %d: the reward scored none of the %d samples (every score None); no update this "
                    "step (%d in a row)", self.step_count + 1, len(rollout) * self.dist.world_size,
                    self.unscored_steps)
        if self.unscored_steps >= self.cfg.optim.max_bad_steps:
            raise TrainingError(f"the reward scored no sample in {self.unscored_steps} consecutive steps: check "
                                "that the reward functions return numbers for these completions (None means "
                                "'no opinion') and that the dataset has the columns they read")
        return True

    def _check_finite_step(self, stats: dict) -> None:
        if stats["update/optimizer_steps"] > 0 or stats.get("update/unscored"):
            self.bad_steps = 0 if stats["update/optimizer_steps"] > 0 else self.bad_steps
            return
        self.bad_steps += 1
        cause = getattr(self, "last_bad_cause", "non-finite loss")
        log.warning("step %d skipped: %s; weights and optimiser state left untouched (%d in a row)",
                    self.step_count, cause, self.bad_steps)
        if self.bad_steps >= self.cfg.optim.max_bad_steps:
            raise TrainingError(f"{self.bad_steps} consecutive steps had no finite update ({cause}); stopping "
                                "before anything is corrupted. Lower optim.lr, check the reward scale, or "
                                "use model.dtype=float32.")

    def _weight_norm(self, module: torch.nn.Module) -> float:
        local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in module.parameters()]
        sq = torch.stack([n.float() for n in torch._foreach_norm(local)]).square().sum() if local else torch.zeros(())
        if getattr(self, "_skeletons", None):  # FSDP: each rank holds a shard of every parameter
            sq = self.dist.sum(sq)
        return sq.sqrt().item()

    def _check_weight_norms(self) -> dict[str, float]:
        """||theta|| of each trained model, and a warning when one step changed it by more than
        optim.max_weight_growth: an update that is finite but absurd (an lr orders of magnitude too high) ruins
        the weights without tripping the non-finite check. From then on the run is unhealthy: its checkpoints
        say so, and pruning keeps the newest healthy one."""
        out, growth = {}, self.cfg.optim.max_weight_growth
        for name, module in self._checkpointed_models().items():
            norm, prev = self._weight_norm(module), self.weight_norms.get(name)
            out[f"optim/weight_norm_{name}"] = norm
            if prev and (not math.isfinite(norm) or not prev / growth <= norm <= prev * growth):
                if self.healthy:
                    log.warning("step %d: the %s's weight norm went from %.4g to %.4g in one step: the update is "
                                "unstable (optim.lr=%g); checkpoints from here on are marked unhealthy and the "
                                "last healthy one is kept", self.step_count, name, prev, norm, self.cfg.optim.lr)
                self.healthy = False
            self.weight_norms[name] = norm
        return out

    # ------------------------------------------------------------------------------------------------------
    # checkpoints

    def state(self) -> dict:
        return {"step": self.step_count, "sampler": self.sampler.state_dict(),
                "kl_controller": self.kl_ctl.state_dict(), "bad_steps": self.bad_steps,
                "healthy": self.healthy, "weight_norms": self.weight_norms}

    def save(self, keep_last: int) -> Path | None:
        """Write a checkpoint from rank 0 only; every rank must call this (and waits until it is written).

        One layout for every strategy, so a checkpoint resumes at any number of ranks: whole (unsharded)
        models and an unsharded optimiser state. With FSDP2 the full model and optimiser states are first
        gathered on rank 0 (collectives on every rank), into plain stand-ins the checkpoint code reads.
        With LoRA the policy checkpoint is the adapter alone.
        """
        from tether.train.checkpoint import rng_state, save_checkpoint

        rng_states = self.dist.gather_objects(rng_state())  # each rank resumes its own sampling stream
        if self.run_dir is None:
            self.dist.barrier()
            return None
        models = self._checkpointed_models()
        optimizers = self.optimizers
        if getattr(self, "_skeletons", None):
            models, optimizers = self._gather_for_checkpoint(models)
        path = None
        if self.dist.is_main:
            with self._full_precision_models():  # master weights: the checkpoint holds the fp32 masters
                path = save_checkpoint(self.run_dir, self.step_count, models=models, optimizers=optimizers,
                                       schedulers=self.schedulers, state=self.state(), keep_last=keep_last,
                                       tokenizer=self.tokenizer, rng_states=rng_states)
        self.dist.barrier()
        return path

    def _full_precision_models(self, load: bool = False) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for mw in self.masters.values():
            stack.enter_context(mw.full_precision(load=load))
        return stack

    def _checkpointed_models(self) -> dict:
        models = {"policy": self.policy}
        if self.critic is not None:
            models["critic"] = self.critic
        return models

    def _gather_for_checkpoint(self, models: dict) -> tuple[dict, dict]:
        """FSDP2: full state dicts (get_model_state_dict, full_state_dict + cpu_offload) and full optimiser
        states gathered on rank 0, held by plain copies of the models (meta skeletons filled by assignment,
        no extra copy) and plain AdamW optimisers over them. Other ranks get empty dicts. A LoRA policy
        gathers its adapter only (its checkpoint is the adapter; the frozen base stays on meta)."""
        from tether.train.distributed import fill_skeleton, full_state_dict, gather_optimizer_state

        plain_models, plain_opts = {}, {}
        for name, model in models.items():
            adapter_only = M.is_peft(model)
            full = full_state_dict(model, trainable_only=adapter_only)
            opt_state = gather_optimizer_state(self.optimizers[name], self.dist)
            if self.dist.is_main:
                plain = fill_skeleton(self._skeletons[name], full, trainable_only=adapter_only)
                opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1.0)
                opt.load_state_dict(opt_state)
                plain_models[name], plain_opts[name] = plain, opt
        return plain_models, plain_opts

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint written at any number of ranks. Every rank reads it: DDP replicas load
        the same weights; FSDP2 ranks read it into plain stand-ins and keep their own shards of it."""
        from tether.train.checkpoint import load_checkpoint, restore_rank_rng

        models = self._checkpointed_models()
        optimizers = self.optimizers
        sharded = bool(getattr(self, "_skeletons", None))
        if sharded:
            from tether.train.distributed import empty_like_skeleton

            # LoRA: only the adapter is read (and held); the frozen base stays as loaded from model.path.
            models = {name: empty_like_skeleton(skel, trainable_only=M.is_peft(skel))
                      for name, skel in self._skeletons.items()}
            optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1.0)
                          for name, m in models.items()}
        with self._full_precision_models(load=True):
            state = load_checkpoint(path, models=models, optimizers=optimizers, schedulers=self.schedulers,
                                    restore_rng=False)
        if sharded:
            self._scatter_loaded(models, optimizers)
        self.step_count = int(state["step"])
        if not restore_rank_rng(path, self.dist.rank):
            # Written at fewer ranks: this rank starts a stream of its own, fixed by (seed, rank, step).
            seed_everything(rank_seed(self.cfg.seed, self.dist.rank, self.step_count))
            log.info("rank %d: no RNG state in %s (written at fewer ranks); reseeded from (seed, rank, step)",
                     self.dist.rank, path)
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.healthy = bool(state.get("healthy", True))
        self.weight_norms = {k: float(v) for k, v in state.get("weight_norms", {}).items()}
        self.backend.sync_weights(self.policy)

    def _scatter_loaded(self, plain_models: dict, plain_opts: dict) -> None:
        """FSDP2: copy the full states read into the plain stand-ins into this rank's shards, then free them.
        With LoRA only the adapter weights come from the checkpoint; the base weights stay as loaded."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from tether.train.distributed import load_sharded_optimizer_state, loaded_state

        for name, model in self._checkpointed_models().items():
            plain = plain_models[name]
            full = loaded_state(plain, only_trainable=M.is_peft(plain), what=f"checkpoint {name}")
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
            load_sharded_optimizer_state(self.optimizers[name], plain_opts[name].state_dict())
            del full, plain  # the full copy goes with the stand-in
