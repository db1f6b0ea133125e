"""Mixed precision with float32 master weights: the model computes in bf16 (or fp16), AdamW steps fp32 copies.

This is the classic recipe (Micikevicius et al. 2018; Megatron's main params and grads; FSDP's
`param_dtype=bfloat16`): forward, backward and sampling run on low-precision weights, so no weight is re-cast
at every forward as under autocast, activations are stored in bf16, and the sampler needs no copy of its own;
the optimiser keeps float32 masters, so updates far below bf16's resolution (lr 1e-6 times a weight near 1
is under its 2^-8 relative step) accumulate instead of rounding away.

Gradients are accumulated in float32 too: a hook moves each parameter's bf16 gradient into its master's
`.grad` as soon as backward has produced it (and frees the bf16 one), so micro-batches add up in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class MasterWeights:
    """float32 masters of a model's trainable parameters; the model itself is cast to `dtype`.

    Use `params` for the optimiser; call `masters_to_model()` after every optimiser step. Frozen
    parameters (a LoRA base) are cast to `dtype` and have no master.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype
        self.pairs = [(p, p.detach().float().clone()) for p in model.parameters() if p.requires_grad]
        model.to(dtype)  # in place: the Parameter objects (and so `pairs`) stay the same
        for param, master in self.pairs:
            param.register_post_accumulate_grad_hook(self._make_hook(master))

    @staticmethod
    def _make_hook(master: torch.Tensor):
        def move_grad_to_master(param: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = param.grad.float()
            else:
                master.grad.add_(param.grad)
            param.grad = None
        return move_grad_to_master

    @property
    def params(self) -> list[torch.Tensor]:
        return [master for _, master in self.pairs]

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for param, master in self.pairs:
            param.copy_(master)

    @contextlib.contextmanager
    def full_precision(self, *, load: bool = False) -> Iterator[nn.Module]:
        """The model in float32 holding the masters, e.g. to save it; on exit it returns to `dtype`.

        With `load=True`, whatever was loaded into the model meanwhile becomes the masters (resume).
        """
        self.model.to(torch.float32)
        try:
            self.masters_to_model()
            yield self.model
            if load:
                with torch.no_grad():
                    for param, master in self.pairs:
                        master.copy_(param)
        finally:
            self.model.to(self.dtype)
