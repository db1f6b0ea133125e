"""Rollouts with Hugging Face `generate` on the policy itself (no weight sync needed)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tether.rollout.batch import Rollout


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, chat_template: bool,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask; with `chat_template`, each prompt becomes one user turn."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.chat_template=true but the tokenizer has no chat template")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
        enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompts, padding=True, return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


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


class SampledLogprobs(LogitsProcessor):
    """Records log pi_sampler(o_t) of each sampled token while `generate` runs, one [B, V] at a time.

    It runs last in the processor chain, so it sees the distribution tokens are drawn from (temperature,
    top-k, top-p applied). At step t it keeps log_softmax(scores_t); at step t+1 the token drawn at t is
    the last column of input_ids, so only a [B] gather is kept. Asking generate for `output_scores`
    instead would hold a float [B, T, V] tensor: gigabytes at a real vocabulary and long completions.
    """

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.logprobs.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float(), -1)
        return scores

    def finish(self, completion_BT: torch.Tensor) -> torch.Tensor:
        """Log-probs [B, T] of `completion_BT` (the gather for the last step happens here)."""
        T = completion_BT.shape[1]
        if self.pending is not None and len(self.logprobs) < T:
            self.logprobs.append(self.pending.gather(-1, completion_BT[:, len(self.logprobs):len(self.logprobs) + 1])
                                 .squeeze(-1))
        self.pending = None
        if not self.logprobs:
            return torch.zeros_like(completion_BT, dtype=torch.float32)
        return torch.stack(self.logprobs[:T], 1)


class HFGenerateBackend:
    """Sample with `model.generate`, keeping the log-probs the sampler used for each token."""

    def __init__(self, policy: nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_strings=(),
                 micro_batch_size: int = 64, chat_template: bool = False, autocast_dtype=None):
        self.policy = policy
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.micro_batch_size = micro_batch_size
        self.chat_template = chat_template
        self.autocast_dtype = autocast_dtype
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

    def sync_weights(self, policy: nn.Module) -> None:
        self.policy = policy  # generate runs on the policy object itself

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[str], rows: list[dict], group_size: int) -> Rollout:
        device = next(self.policy.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, chat_template=self.chat_template,
                                                 device=device)
        P = prompt_ids.shape[1]
        was_training = self.policy.training
        self.policy.eval()
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else torch.autocast(device.type, enabled=False))
        try:
            with autocast:
                recorder = SampledLogprobs()
                sequences = self.policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                                 generation_config=self.gen_config,
                                                 logits_processor=LogitsProcessorList(self.warpers + [recorder]),
                                                 tokenizer=self.tokenizer if self.stop_strings else None)
        finally:
            self.policy.train(was_training)
        completion = sequences[:, P:]
        T = completion.shape[1]
        sampler_lp = recorder.finish(completion)
        generated_len = self._stop_string_lengths(completion, T)
        mask, truncated = completion_mask(completion, self.eos, generated_len)
        if self.stop_strings:
            truncated = truncated & (generated_len >= T)
        completion = torch.where(mask.bool(), completion, torch.full_like(completion, self.tokenizer.pad_token_id))
        texts = self.tokenizer.batch_decode(completion, skip_special_tokens=True)
        return Rollout(
            input_ids_BL=torch.cat([prompt_ids, completion], 1),
            attention_mask_BL=torch.cat([prompt_mask, mask.long()], 1),
            prompt_len=P, response_mask_BT=mask, sampler_logprobs_BT=sampler_lp * mask,
            truncated_B=truncated, prompts=prompts, completions=texts, rows=rows, group_size=group_size,
        )

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
