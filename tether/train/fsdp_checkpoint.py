"""Checkpoints of FSDP2-sharded models in the one layout every run uses: whole (unsharded) model and optimiser
states, so that a checkpoint resumes at any number of ranks."""

from __future__ import annotations

import torch
from torch import nn

from tether.models import is_peft
from tether.train.distributed import (
    Dist,
    empty_like_skeleton,
    fill_skeleton,
    full_state_dict,
    gather_optimizer_state,
    load_sharded_optimizer_state,
    loaded_state,
)


def gather_for_checkpoint(models: dict[str, nn.Module], optimizers: dict, skeletons: dict[str, nn.Module],
                          dist: Dist) -> tuple[dict, dict]:
    """Full state dicts (get_model_state_dict, full_state_dict + cpu_offload) and full optimiser states
    gathered on rank 0, held by plain copies of the models (meta skeletons filled by assignment, no extra copy)
    and plain AdamW optimisers over them; every rank must call it, and the other ranks get empty dicts. A LoRA
    policy gathers its adapter only (its checkpoint is the adapter; the frozen base stays on meta)."""
    plain_models, plain_opts = {}, {}
    for name, model in models.items():
        adapter_only = is_peft(model)
        full = full_state_dict(model, trainable_only=adapter_only)
        opt_state = gather_optimizer_state(optimizers[name], dist)
        if dist.is_main:
            plain = fill_skeleton(skeletons[name], full, trainable_only=adapter_only)
            opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1.0)
            opt.load_state_dict(opt_state)
            plain_models[name], plain_opts[name] = plain, opt
    return plain_models, plain_opts


def stand_ins_for_loading(skeletons: dict[str, nn.Module]) -> tuple[dict, dict]:
    """Plain, empty models and optimisers that a checkpoint is read into before `scatter_loaded`. With LoRA
    only the adapter is read (and held); the frozen base stays as loaded from model.path."""
    models = {name: empty_like_skeleton(skel, trainable_only=is_peft(skel)) for name, skel in skeletons.items()}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1.0)
                  for name, m in models.items()}
    return models, optimizers


def scatter_loaded(models: dict[str, nn.Module], optimizers: dict, plain_models: dict, plain_opts: dict) -> None:
    """Copy the full states read into the stand-ins into this rank's shards, then free them. With LoRA only the
    adapter weights come from the checkpoint; the base weights stay as loaded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    for name, model in models.items():
        plain = plain_models[name]
        full = loaded_state(plain, only_trainable=is_peft(plain), what=f"checkpoint {name}")
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        load_sharded_optimizer_state(optimizers[name], plain_opts[name].state_dict())
        del full, plain  # the full copy goes with the stand-in
