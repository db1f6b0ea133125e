"""Forward passes over a Rollout: micro-batches, completion-only logits, log-probs, entropy, values."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tether.core.logprobs import full_kl_from_logits, logprobs_and_entropy, token_logprobs
from tether.models import is_sharded
from tether.rollout.batch import Rollout, position_ids
from tether.rollout.shared_prompts import CACHE_KWARG, distinct_prompts


@dataclass
class MicroBatch:
    """Rows `index` of a rollout, trimmed to the widest prompt and completion they contain."""

    index: torch.Tensor        # [b] rows of the full batch
    input_ids: torch.Tensor    # [b, p + t]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_len: int            # p
    completion_ids: torch.Tensor  # [b, t]
    response_mask: torch.Tensor   # [b, t] float
    # Rows with the same prompt (a GRPO group): one row per distinct prompt, and each row's distinct prompt.
    prompt_rows: torch.Tensor     # [u] rows of this micro-batch, u <= b
    prompt_of_row: torch.Tensor   # [b] index into prompt_rows

    @property
    def width(self) -> int:
        return self.completion_ids.shape[1]


def make_micro_batch(rollout: Rollout, index: torch.Tensor) -> MicroBatch:
    P = rollout.prompt_len
    ids = rollout.input_ids_BL[index]
    am = rollout.attention_mask_BL[index]
    rmask = rollout.loss_mask_BT[index]  # the completion tokens that enter the loss
    # Trim padding both sides: fewer positions means fewer FLOPs and a smaller [b, t, V] logits tensor. The
    # completion block is attended contiguously from P (an episode's environment turns included).
    t = max(int(am[:, P:].sum(-1).max().item()), 1)
    p_real = int(am[:, :P].sum(-1).max().item())
    start = P - p_real
    ids = ids[:, start:P + t]
    am = am[:, start:P + t]
    prompt_rows, prompt_of_row = distinct_prompts(ids[:, :p_real], am[:, :p_real])
    return MicroBatch(
        index=index, input_ids=ids, attention_mask=am, position_ids=position_ids(am),
        prompt_len=p_real, completion_ids=ids[:, p_real:], response_mask=rmask[:, :t],
        prompt_rows=prompt_rows, prompt_of_row=prompt_of_row,
    )


def split_micro_batches(rollout: Rollout, rows: torch.Tensor, *, micro_batch_size: int,
                        token_budget: int | None = None) -> list[MicroBatch]:
    """Split `rows` into micro-batches by count, or by a padded-token budget after sorting by length.

    Sorting by length before packing under a budget cuts padding: rows of similar length share a batch.
    """
    if token_budget is None:
        return [make_micro_batch(rollout, idx) for idx in rows.split(micro_batch_size)]
    lengths = rollout.attention_mask_BL[rows].sum(-1)
    order = rows[torch.argsort(lengths, descending=True, stable=True)]
    sorted_len = rollout.attention_mask_BL[order].sum(-1).tolist()
    batches, current, widest = [], [], 0
    for row, n in zip(order.tolist(), sorted_len):
        if current and max(widest, n) * (len(current) + 1) > token_budget:
            batches.append(current)
            current, widest = [], 0
        current.append(row)
        widest = max(widest, n)
    if current:
        batches.append(current)
    return [make_micro_batch(rollout, torch.tensor(b)) for b in batches]


def autocast_context(model: nn.Module, device: torch.device, dtype: torch.dtype | None
                     ) -> contextlib.AbstractContextManager:
    """Autocast in `dtype` (if any); on CPU in bf16, a trained model's forwards use the math attention kernel.

    CPU's flash-attention backward is slow in bf16: on a 47M Llama (32 x 88 positions, 2 threads) a
    forward + backward took 1.55 s with it and 1.36 s with the math kernel, whose forward is slower but whose
    backward is a few large matmuls (benchmarks/README.md). The choice is per model, not per pass, so the
    no-grad pi_old pass and the training forward compute the same numbers (the first minibatch's ratio is
    exactly 1); frozen models keep the flash kernel, faster forward-only. Not with gradient checkpointing,
    whose recomputation in backward would run outside this context. fp32 and GPUs keep PyTorch's choice.
    """
    stack = contextlib.ExitStack()
    if dtype is not None:
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
    if device.type == "cpu" and _math_attention(model, dtype):
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def _math_attention(model: nn.Module, autocast_dtype: torch.dtype | None) -> bool:
    params = list(model.parameters())
    if not params or torch.bfloat16 not in (autocast_dtype, params[0].dtype):
        return False
    if not any(p.requires_grad for p in params):
        return False
    return not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def policy_logprobs(model: nn.Module, mb: MicroBatch, *, temperature: float, with_entropy: bool,
                    autocast_dtype: torch.dtype | None = None, share_prompts: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(o_t | q, o_<t) / temperature-scaled, for the completion tokens of a micro-batch.

    `logits_to_keep` asks the model for logits at the last t+1 positions only: position P-1+t predicts
    completion token t, and the final position predicts nothing, so it is dropped. `share_prompts`: see
    `completion_forward`.
    """
    out = policy_logprobs_and_values(model, None, mb, temperature=temperature, with_entropy=with_entropy,
                                     autocast_dtype=autocast_dtype, share_prompts=share_prompts)
    return out.logprobs, out.entropy


def completion_forward(model: nn.Module, mb: MicroBatch, *, with_hidden: bool, share_prompts: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [b, t+1, V] at positions p-1 .. p-1+t (the last prompt position onwards), and the last layer's
    hidden states there if `with_hidden`.

    `share_prompts` (for rows that share a prompt, the G completions of a GRPO group): the prompt but its last
    token is run once per distinct prompt, its KV cache is gathered out to every row, and each row runs its
    last prompt token and its completion on it, so the logits come out of one forward (no [b, t+1, V]
    concatenation). The same numbers up to float order (attention reads the same keys and values), and the
    same gradients (the gather's backward sums each row's gradient into its prompt's), for about G x fewer
    prompt positions.
    """
    p, t = mb.prompt_len, mb.width
    u, cache = mb.prompt_rows, None
    # The prompt tokens that run once: all but the last. The whole prompt, its last logits joined to the
    # completion's, for a one-token prompt (so every rank runs as many forwards whatever its prompt lengths)
    # and under FSDP, whose hooks gather a forward's parameters for backward only when its outputs get a
    # gradient: the prompt forward's logits must be in the graph, not its KV cache alone.
    head = p if p == 1 or is_sharded(model) else p - 1
    if share_prompts:  # even when no two rows here share one: every rank then runs as many forwards
        prompt = model(input_ids=mb.input_ids[u, :head], attention_mask=mb.attention_mask[u, :head],
                       position_ids=mb.position_ids[u, :head], logits_to_keep=1, use_cache=True,
                       output_hidden_states=with_hidden and head == p)
        cache = getattr(prompt, CACHE_KWARG, None)  # None: a model that keeps no KV cache here
    if cache is None:
        out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                    logits_to_keep=t + 1, use_cache=False, output_hidden_states=with_hidden)
        return out.logits, (out.hidden_states[-1][:, p - 1:] if with_hidden else None)
    row_prompt = mb.prompt_of_row
    cache.batch_select_indices(row_prompt)  # [u, ...] -> [b, ...]: rows of one prompt read the same KV
    out = model(input_ids=mb.input_ids[:, head:], attention_mask=mb.attention_mask,
                position_ids=mb.position_ids[:, head:], logits_to_keep=p + t - head, use_cache=False,
                output_hidden_states=with_hidden, **{CACHE_KWARG: cache})
    if head == p - 1:
        return out.logits, (out.hidden_states[-1] if with_hidden else None)
    logits = torch.cat([prompt.logits[row_prompt], out.logits], 1)
    hidden = (torch.cat([prompt.hidden_states[-1][row_prompt, -1:], out.hidden_states[-1]], 1) if with_hidden
              else None)
    return logits, hidden


class PolicyPass(NamedTuple):
    """What one policy forward over a micro-batch gives, each [b, t] on its completion tokens."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor | None         # V(s_t) from a value head on the policy's trunk
    full_kl: torch.Tensor | None        # KL(pi(.|s_t) || pi_ref(.|s_t)) over the whole vocabulary
    ref_logprobs: torch.Tensor | None   # log pi_ref(o_t), from the same reference forward


def policy_logprobs_and_values(model: nn.Module, value_head: nn.Module | None, mb: MicroBatch, *,
                               temperature: float, with_entropy: bool, autocast_dtype: torch.dtype | None = None,
                               share_prompts: bool = False, top_k: int = 0, top_p: float = 1.0,
                               reference=None) -> PolicyPass:
    """`policy_logprobs`, plus V(s_t) from a value head on the same forward's last hidden states (a critic
    that shares the policy's trunk) when `value_head` is given. With top_k / top_p, the log-probs and entropy
    are those of the truncated distribution a top-k / top-p sampler draws from (core/logprobs.py).

    With `reference` (a models.ReferencePolicy), the frozen reference runs on the same micro-batch without
    gradients, and the exact per-position KL(pi || pi_ref) comes back with gradients to the policy's logits:
    the reference's [b, t, V] logits live only as long as this micro-batch."""
    device = mb.input_ids.device
    with autocast_context(model, device, autocast_dtype):
        logits, hidden = completion_forward(model, mb, with_hidden=value_head is not None,
                                            share_prompts=share_prompts)
        values = None
        if value_head is not None:
            values = value_head(hidden[:, :mb.width]).float() * mb.response_mask
    lp, ent = logprobs_and_entropy(logits[:, :-1], mb.completion_ids, temperature=temperature,
                                   mask_BT=mb.response_mask, with_entropy=with_entropy, top_k=top_k, top_p=top_p)
    full_kl = ref_lp = None
    if reference is not None:
        with torch.no_grad(), reference.active() as ref_model, autocast_context(ref_model, device, autocast_dtype):
            ref_logits, _ = completion_forward(ref_model, mb, with_hidden=False, share_prompts=share_prompts)
        full_kl = full_kl_from_logits(logits[:, :-1], ref_logits[:, :-1], temperature=temperature,
                                      mask_BT=mb.response_mask)
        ref_lp = token_logprobs(ref_logits[:, :-1], mb.completion_ids, temperature=temperature,
                                mask_BT=mb.response_mask)
        del ref_logits
    return PolicyPass(lp, ent, values, full_kl, ref_lp)


def critic_values(critic: nn.Module, mb: MicroBatch, *, autocast_dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """V(s_t) for each completion token t: the value at the position that predicts token t."""
    with autocast_context(critic, mb.input_ids.device, autocast_dtype):
        values = critic(mb.input_ids, mb.attention_mask, mb.position_ids)
    p, t = mb.prompt_len, mb.width
    return values[:, p - 1:p - 1 + t].float() * mb.response_mask


def scatter_rows(full_BT: torch.Tensor, mb: MicroBatch, part: torch.Tensor) -> None:
    full_BT[mb.index, :part.shape[1]] = part.to(full_BT.dtype)


def gather_rows(full_BT: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    return full_BT[mb.index, :mb.width]
