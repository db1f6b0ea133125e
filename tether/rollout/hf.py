"""Rollouts with Hugging Face `generate`: on the policy itself, or on a low-precision copy of it. The pieces
it runs with live in their own modules: the preallocated KV cache (kv_cache.py), the log-prob recorder
(logprob_recorder.py), the compiled forward (compiled_forward.py), and which CPU speed-ups combine
(speedups.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tether.core.batch_invariant import batch_invariant as batch_invariant_mode
from tether.models import is_sharded
from tether.rollout.batch import Rollout
from tether.rollout.compiled_forward import CompiledForward
from tether.rollout.decode_attention import installed as matmul_decode_installed
from tether.rollout.kv_cache import preallocated_cache
from tether.rollout.logprob_recorder import SampledLogprobs
from tether.rollout.categorical import installed as inverse_cdf_sampling_installed
from tether.rollout.packed_linears import installed as packed_linears_installed
from tether.rollout.prompts import render
from tether.rollout.shared_prompts import CACHE_KWARG, prefill_shared_prompts
from tether.rollout.speedups import packed_linears_allowed, use_matmul_decode

def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list, *, chat_template: bool,
                   device: torch.device, system_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask. With `chat_template`, a string prompt becomes one user turn and a
    conversation is rendered as it is (`rollout/prompts.py`), the model's turn next."""
    rendered = [render(tokenizer, p, chat_template=chat_template, system_prompt=system_prompt) for p in prompts]
    ids = [tokenizer(text, add_special_tokens=special).input_ids for text, special in rendered]
    enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def prompt_token_count(tokenizer: PreTrainedTokenizerBase, prompt, *, chat_template: bool,
                       system_prompt: str | None = None) -> int:
    """How many tokens `prompt` takes in the sampler's input, as `encode_prompts` feeds it (chat template and
    the tokenizer's special tokens included)."""
    text, special = render(tokenizer, prompt, chat_template=chat_template, system_prompt=system_prompt)
    return len(tokenizer(text, add_special_tokens=special).input_ids)


def eos_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def completion_mask(completion_ids_BT: torch.Tensor, eos: list[int], generated_len_B: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask over tokens up to and including the first EOS; rows without EOS are truncated.

    `generated_len_B` bounds rows that ended early for another reason (a stop string).
    """
    B, T = completion_ids_BT.shape
    is_eos = torch.isin(completion_ids_BT, torch.tensor(eos, device=completion_ids_BT.device))
    has_eos = is_eos.any(-1)
    first_eos = torch.where(has_eos, is_eos.float().argmax(-1), torch.full_like(has_eos, T, dtype=torch.long))
    end = torch.where(has_eos, first_eos + 1, generated_len_B)  # exclusive end
    positions = torch.arange(T, device=completion_ids_BT.device).expand(B, T)
    mask = (positions < end.unsqueeze(-1)).float()
    return mask, ~has_eos


def sampler_copy(policy: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of the policy in `dtype` for sampling (refreshed by `copy_trainable_weights`)."""
    clone = copy.deepcopy(policy).to(dtype)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


@torch.no_grad()
def copy_trainable_weights(source: nn.Module, target: nn.Module) -> None:
    """target <- source for every parameter the optimiser can change (all of them, or LoRA's adapters)."""
    for (name, src), (name_t, dst) in zip(source.named_parameters(), target.named_parameters()):
        if name != name_t:
            raise RuntimeError(f"sampler copy out of step with the policy: {name!r} vs {name_t!r}")
        if src.requires_grad:
            dst.copy_(src)


class HFGenerateBackend:
    """Sample with `model.generate`, keeping the log-probs the sampler used for each token."""

    def __init__(self, policy: nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_strings=(),
                 micro_batch_size: int = 64, chat_template: bool = False, system_prompt: str | None = None,
                 autocast_dtype=None,
                 weights_dtype: torch.dtype | None = None, compile_backend: str | Callable | None = None,
                 share_prompts: bool = False, decode_attention: str = "auto", packed_linears: bool = True,
                 inverse_cdf_sampling: bool = True, batch_invariant: bool = False):
        """`weights_dtype`: sample from a copy of the policy in this dtype (e.g. bfloat16: no autocast casts,
        half the weight bandwidth), refreshed from the policy by `sync_weights` after every optimiser step.
        None samples from the policy itself (under `autocast_dtype`, if given). `compile_backend`: run the
        model's forward compiled by this torch.compile backend while sampling (see `CompiledForward`).
        `share_prompts`: rows with the same prompt prefill it once (`prefill_shared_prompts`).
        `decode_attention`: "matmul" runs the one-token decode steps of an SDPA model on CPU through
        `decode_attention.matmul_decode_attention`; "model" keeps the model's own attention; "auto": matmul
        on CPUs without AMX (`use_matmul_decode`). `packed_linears`: on CPU, run the linear layers on weights
        packed for oneDNN once per call (`packed_linears.installed`); not under autocast or `compile_backend`.
        `inverse_cdf_sampling`: draw tokens on CPU with `categorical.sample_categorical` instead of
        `torch.multinomial` (the same distribution, one uniform per row). `batch_invariant`: sample under
        `core.batch_invariant.BatchInvariant`, so that each recorded log-prob is bit for bit the one a
        trainer's forward under it computes (float32 policies; packed linears and matmul decode off)."""
        self.source = policy
        self.policy = policy
        if weights_dtype is not None and weights_dtype != next(policy.parameters()).dtype:
            self.policy = sampler_copy(policy, weights_dtype)
            autocast_dtype = None
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.micro_batch_size = micro_batch_size
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.autocast_dtype = autocast_dtype
        self.compiled_forward = CompiledForward(compile_backend) if compile_backend is not None else None
        self.share_prompts = share_prompts
        self.batch_invariant = batch_invariant
        self.matmul_decode = use_matmul_decode(decode_attention, batch_invariant=batch_invariant)
        self.inverse_cdf_sampling = inverse_cdf_sampling
        self.packed_linears = packed_linears_allowed(packed_linears, autocast_dtype=autocast_dtype,
                                                     compiled=compile_backend is not None,
                                                     batch_invariant=batch_invariant)
        self.eos = eos_ids(tokenizer, policy)
        # An explicit config with only our settings: a hub model's own generation_config may carry
        # repetition penalties or top_k=50 defaults that would make the sampler's distribution differ
        # from the pi_theta the trainer optimises. top_k=0 / top_p=1.0 are passed explicitly for that reason.
        # The warpers are ours, in HF's order (temperature, top-k, top-p), with the log-prob recorder after
        # them: custom processors would otherwise run before generate's own warpers.
        self.warpers = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.gen_config = GenerationConfig(
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=self.eos, use_cache=True,
            stop_strings=self.stop_strings or None,
        )

    @property
    def samples_from_copy(self) -> bool:
        """True when sampling runs on a separate (lower-precision) copy: its log-probs are then not
        bit-for-bit those of the trainer's forward."""
        return self.policy is not self.source

    def sync_weights(self, policy: nn.Module) -> None:
        if self.samples_from_copy:
            copy_trainable_weights(policy, self.policy)
        else:
            self.policy = self.source = policy  # generate runs on the policy object itself

    @torch.no_grad()
    def _sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Continuations of the left-padded `prompt_ids`: (completion_BT padded after its end, sampler
        log-probs_BT, mask_BT up to and including EOS, truncated_B)."""
        device = prompt_ids.device
        P = prompt_ids.shape[1]
        was_training = self.policy.training
        self.policy.eval()
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else torch.autocast(device.type, enabled=False))
        # Compiled, the cache stays HF's DynamicCache: Inductor cannot lower the preallocated buffer's
        # in-place writes through a view whose length is symbolic.
        forward = self.compiled_forward.installed(self.policy) if self.compiled_forward else nullcontext()
        try:
            # Inference mode: no version counters or view tracking on the ~600 small ops of a decode step
            # (about 5% off sampling on CPU). Its tensors cannot be saved for backward, hence the clone below.
            # Not under FSDP: the unsharded parameters it allocates in a forward would become inference
            # tensors that training later writes into.
            # Batch-invariant: a float64 copy of each weight for the call (FSDP's gathered weights change
            # between forwards without a new tensor, so they are converted at each call there).
            with (torch.inference_mode(not is_sharded(self.policy)), autocast, forward,
                  batch_invariant_mode(self.batch_invariant, cache_weights=not is_sharded(self.policy)),
                  matmul_decode_installed(self.policy, self.matmul_decode),
                  packed_linears_installed(self.policy, prompt_ids.shape[0], self.packed_linears),
                  inverse_cdf_sampling_installed(self.inverse_cdf_sampling)):
                recorder = SampledLogprobs()
                cache = (preallocated_cache(self.policy, P + max_new_tokens) if self.compiled_forward is None
                         else None)
                if self.share_prompts:
                    cache = prefill_shared_prompts(self.policy, prompt_ids, prompt_mask, cache)
                extra = {CACHE_KWARG: cache} if cache is not None else {}
                sequences = self.policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **extra,
                                                 generation_config=self.gen_config, max_new_tokens=max_new_tokens,
                                                 logits_processor=LogitsProcessorList(self.warpers + [recorder]),
                                                 tokenizer=self.tokenizer if self.stop_strings else None)
        finally:
            self.policy.train(was_training)
        completion = sequences[:, P:].clone()
        T = completion.shape[1]
        sampler_lp = recorder.finish(completion)
        generated_len = self._stop_string_lengths(completion, T)
        mask, truncated = completion_mask(completion, self.eos, generated_len)
        if self.stop_strings:
            truncated = truncated & (generated_len >= T)
        completion = torch.where(mask.bool(), completion, torch.full_like(completion, self.tokenizer.pad_token_id))
        # where, not a product: after EOS generate pads with a token that top-k / top-p may have cut (log 0).
        return completion, torch.where(mask.bool(), sampler_lp, 0.0), mask, truncated

    def _generate_chunk(self, prompts: list[str], rows: list[dict], group_size: int) -> Rollout:
        device = next(self.policy.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, chat_template=self.chat_template,
                                                 system_prompt=self.system_prompt,
                                                 device=device)
        completion, sampler_lp, mask, truncated = self._sample(prompt_ids, prompt_mask, self.max_new_tokens)
        texts = self.tokenizer.batch_decode(completion, skip_special_tokens=True)
        return Rollout(
            input_ids_BL=torch.cat([prompt_ids, completion], 1),
            attention_mask_BL=torch.cat([prompt_mask, mask.long()], 1),
            prompt_len=prompt_ids.shape[1], response_mask_BT=mask, sampler_logprobs_BT=sampler_lp,
            truncated_B=truncated, prompts=prompts, completions=texts, rows=rows, group_size=group_size,
        )

    def sample_tokens(self, sequences: list[list[int]], max_new_tokens: int) -> list:
        """Token in, token out: one continuation of each token sequence (an episode so far), up to
        `max_new_tokens`, as `episodes.Sampled` (its ids to and including EOS, their log-probs)."""
        from tether.rollout.episodes import Sampled

        device = next(self.policy.parameters()).device
        out = []
        for s in range(0, len(sequences), self.micro_batch_size):
            chunk = sequences[s:s + self.micro_batch_size]
            enc = self.tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt")
            completion, lp, mask, truncated = self._sample(enc.input_ids.to(device), enc.attention_mask.to(device),
                                                           max_new_tokens)
            lengths = mask.sum(-1).long().tolist()
            for i, n in enumerate(lengths):
                out.append(Sampled(completion[i, :n].tolist(), lp[i, :n].tolist(), not bool(truncated[i])))
        return out

    def _stop_string_lengths(self, completion_BT: torch.Tensor, T: int) -> torch.Tensor:
        """Tokens up to the end of the first stop string in each row (T where there is none)."""
        lengths = torch.full((completion_BT.shape[0],), T, dtype=torch.long)
        if not self.stop_strings:
            return lengths
        for i, ids in enumerate(completion_BT.tolist()):
            for n in range(1, T + 1):
                text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                if any(s in text for s in self.stop_strings):
                    lengths[i] = n
                    break
        return lengths

    def generate(self, rows: list[dict], prompts: list[str], *, group_size: int) -> Rollout:
        # Repeat each prompt G times, group-contiguously: rows i*G .. i*G+G-1 share prompt i.
        rep_prompts = [p for p in prompts for _ in range(group_size)]
        rep_rows = [r for r in rows for _ in range(group_size)]
        parts = []
        for s in range(0, len(rep_prompts), self.micro_batch_size):
            parts.append(self._generate_chunk(rep_prompts[s:s + self.micro_batch_size],
                                              rep_rows[s:s + self.micro_batch_size], group_size))
        return Rollout.concat(parts, self.tokenizer.pad_token_id)
