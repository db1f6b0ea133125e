"""Which of the sampler's and the training forward's speed-ups run together: every rule in one place.

| speed-up (config) | where | off when | why |
|---|---|---|---|
| low-precision sampler copy (`rollout.weights_dtype`) | HF sampling | FSDP (refused by config) | the shards would have to be gathered into the copy; "auto" keeps a bf16 copy under bf16 autocast only |
| matmul decode attention (`rollout.decode_attention`) | HF sampling, CPU | "auto" on a CPU with AMX; `model.batch_invariant` | the flash kernel was faster there (decode_attention.py); its float32 sums are not the trainer's |
| packed linears (`rollout.packed_linears`) | HF sampling, CPU | autocast; `rollout.compile`; `model.batch_invariant` | autocast would need the packed copies in its dtype; Inductor cannot trace oneDNN's packed tensors; oneDNN's float32 sums are not the trainer's |
| inverse-CDF token draws (`rollout.inverse_cdf_sampling`) | HF sampling, CPU | never (other devices keep torch.multinomial) | the same distribution; only the random stream differs |
| shared prompt prefill (`optim.share_prompts`) | HF sampling | FSDP | the prefill would gather the shards on its own, and only on ranks whose prompts repeat |
| shared prompt forward (`optim.share_prompts`) | training / no-grad passes | gradient checkpointing; group_size 1 | HF turns the KV cache off in a checkpointed model's forwards; with no group no prompt repeats |

Each rule is a small function; the sampler backend and the run's setup call them, and none of them looks
at anything but its arguments.
"""

from __future__ import annotations

import logging

import torch

from tether.config import TrainConfig
from tether.models import DTYPES

log = logging.getLogger("tether")


def sampler_weights_dtype(cfg: TrainConfig, fsdp: bool) -> torch.dtype | None:
    """The dtype of the HF sampler's own copy of the policy; None: sample from the policy itself.

    'auto' keeps a bf16 copy under bf16 autocast (sampling on bf16 weights instead of casting at every
    matmul), except under FSDP, whose shards would have to be gathered into the copy."""
    r, m = cfg.rollout, cfg.model
    if r.weights_dtype == "auto":
        return torch.bfloat16 if m.autocast == "bfloat16" and not fsdp else None
    if r.weights_dtype == "policy":
        return None
    return DTYPES[r.weights_dtype]  # config.validate_for_world refuses a copy under FSDP


def use_matmul_decode(choice: str, *, batch_invariant: bool = False) -> bool:
    """`rollout.decode_attention`: "matmul", "model", or "auto" (matmul unless the CPU has AMX tiles, or the
    model runs batch-invariant: the model's attention then goes through core/batch_invariant.py)."""
    if choice not in ("auto", "matmul", "model"):
        raise ValueError(f"decode_attention must be 'auto', 'matmul' or 'model', not {choice!r}")
    if choice == "matmul" and batch_invariant:  # config.validate refuses it first
        raise ValueError("decode_attention='matmul' sums in float32 in its own order: not with batch_invariant")
    if batch_invariant:
        return False
    if choice == "auto":
        from tether.rollout.cpu_features import has_amx

        return not has_amx()
    return choice == "matmul"


def packed_linears_allowed(requested: bool, *, autocast_dtype: torch.dtype | None, compiled: bool,
                           batch_invariant: bool = False) -> bool:
    """Packed linears while sampling, unless under autocast, through the compiled forward, or batch-invariant
    (logged)."""
    allowed = requested and autocast_dtype is None and not compiled and not batch_invariant
    if requested and not allowed:
        why = ("under autocast" if autocast_dtype is not None else "through rollout.compile" if compiled
               else "under model.batch_invariant")
        log.info("rollout.packed_linears: off while sampling %s (documented: F.linear there)", why)
    return allowed


def sampler_share_prompts(requested: bool, *, fsdp: bool) -> bool:
    """Shared prompt prefill while sampling: under FSDP generate's own gather must stay the only one."""
    return requested and not fsdp


def training_share_prompts(requested: bool, *, gradient_checkpointing: bool, group_size: int) -> bool:
    """Shared prompt forwards in training and the no-grad passes: they need the model's KV cache (off under
    gradient checkpointing) and prompts that repeat (a group)."""
    return requested and not gradient_checkpointing and group_size > 1
