"""Rows that share a prompt (the G completions of a group) compute the prompt once and read its KV cache.

Used by sampling (the prefill) and by the trainer's forward passes (tether/train/forward.py).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from tether.rollout.batch import position_ids

# transformers renamed the cache argument and output field (past_key_values -> cache) within 5.x.
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def distinct_prompts(ids_BP: torch.Tensor, mask_BP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of each distinct prompt [U], index of each row's prompt in that list [B]).

    Equal tokens and equal padding mean an equal prompt forward (positions come from the mask).
    """
    distinct, prompt_of_row = torch.unique(torch.cat([ids_BP, mask_BP], 1), dim=0, return_inverse=True)
    rows = torch.arange(len(ids_BP), device=ids_BP.device)
    first = torch.full((len(distinct),), len(ids_BP), device=ids_BP.device)
    return first.scatter_reduce_(0, prompt_of_row, rows, reduce="amin"), prompt_of_row


@torch.no_grad()
def prefill_shared_prompts(model: nn.Module, ids_BP: torch.Tensor, mask_BP: torch.Tensor,
                           cache: Cache | None) -> Cache | None:
    """`cache` (or a new DynamicCache) holding every prompt position but the last, computed once per distinct
    prompt and gathered out to its rows; `generate` then feeds only the last prompt token of each row.

    Returns `cache` untouched when no two rows share a prompt or the prompts are one token wide.
    """
    if ids_BP.shape[1] < 2:
        return cache
    first, prompt_of_row = distinct_prompts(ids_BP, mask_BP)
    if len(first) == len(ids_BP):
        return cache
    if cache is None:
        cache = DynamicCache(config=model.config)
    positions = position_ids(mask_BP)
    model(input_ids=ids_BP[first, :-1], attention_mask=mask_BP[first, :-1], position_ids=positions[first, :-1],
          logits_to_keep=1, use_cache=True, **{CACHE_KWARG: cache})
    cache.batch_select_indices(prompt_of_row)
    return cache
