"""Data parallelism over torch.distributed: who am I, and reductions that make the update rank-invariant.

With one process every method is the identity, so the loop has one code path. The second half holds the FSDP2
pieces: sharding a model (`shard_model`), and moving whole-model and optimiser states between shards and the
plain, unsharded layout that checkpoints use at any number of ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from tether.models import is_sharded


class Dist:
    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1

    @classmethod
    def from_env(cls, backend: str | None = None) -> "Dist":
        """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a copy; float64 on the wire so large token counts stay exact)."""
        if not self.enabled:
            return x
        y = x.detach().to(torch.float64).clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.dtype)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.MAX)
        return y

    def min(self, x: torch.Tensor) -> torch.Tensor:
        return -self.max(-x)

    def gather_cat(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped 1-D tensors from every rank, in rank order."""
        if not self.enabled:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def shard(self, items: list, group_size: int = 1) -> list:
        """This rank's contiguous share of a globally drawn list, whole groups kept together."""
        if not self.enabled:
            return items
        n = len(items)
        if n % self.world_size:
            raise ValueError(f"{n} prompts per step cannot be split evenly over {self.world_size} ranks")
        k = n // self.world_size
        return items[self.rank * k:(self.rank + 1) * k]

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on some rank (e.g. a stop signal seen by one rank only), so all
        ranks take the same branch around collectives such as a checkpoint save."""
        if not self.enabled:
            return bool(flag)
        return bool(self.max(torch.tensor(float(bool(flag)))).item())

    def minibatch_order(self, rows: int, minibatches: int, seed: tuple[int, ...]) -> torch.Tensor:
        """This rank's rows (local indices) in minibatch order: `order.tensor_split(minibatches)` is its share
        of each minibatch, and the minibatches are the same sets of global rows whatever the number of ranks.

        A stratified shuffle, drawn from a generator seeded by `seed` (e.g. (run seed, step, epoch)), so
        it consumes nothing from torch's global RNG: each run of `minibatches` consecutive global rows sends
        one row to each minibatch, in random order. Ranks hold contiguous, equal shares of the global batch,
        so when `rows` is a multiple of `minibatches` every rank holds the same number of rows of every
        minibatch (and runs the same number of micro-batches). With G >= M completions per prompt, every
        minibatch sees every prompt.
        """
        if minibatches == 1:
            return torch.arange(rows)
        total = rows * self.world_size
        if total % minibatches:
            raise ValueError(f"{minibatches} minibatches do not divide the batch of {total} sequences")
        mixed = 0
        for part in seed:  # a fixed mix (Python's hash() of a tuple is not stable across versions)
            mixed = (mixed * 1_000_003 + int(part) + 0x9E3779B9) % (2**63 - 1)
        g = torch.Generator().manual_seed(mixed)
        slot = torch.argsort(torch.rand(total // minibatches, minibatches, generator=g), dim=1).flatten()
        mine = slot[self.rank * rows:(self.rank + 1) * rows]  # minibatch of each of this rank's rows
        return torch.argsort(mine, stable=True)  # rows of minibatch 0, then 1, ... (ascending within)


def split_to_count(parts: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Split the largest parts (row-index tensors) in two until there are `n`: every rank can then run the
    same number of micro-batches (DDP and FSDP communicate in each forward/backward). Splitting keeps each
    part within a token budget it already met."""
    parts = list(parts)
    total = sum(len(p) for p in parts)
    if n > total:
        raise ValueError(f"cannot run {n} micro-batches over {total} rows")
    while len(parts) < n:
        i = max(range(len(parts)), key=lambda j: len(parts[j]))
        big = parts.pop(i)
        half = (len(big) + 1) // 2
        parts[i:i] = [big[:half], big[half:]]
    return parts


# ----------------------------------------------------------------------------------------------------------
# Sharded (FSDP2) models: whole-model state for checkpoints that load at any number of ranks


def full_state_dict(model: torch.nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU, whatever the wrapping (plain, DDP's module, FSDP2);
    `trainable_only` leaves out frozen parameters (LoRA: the base weights).

    Sharded models: a collective (every rank must call it); rank 0 gets the full tensors, the other ranks
    an empty dict. Plain models: detached CPU copies on every rank.
    """
    if not is_sharded(model):
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad} if trainable_only else set()
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in frozen}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    full = get_model_state_dict(model, options=options)
    # A gathered tensor can be a view into a padded all-gather buffer (a dim 0 that does not divide evenly
    # over the ranks): give each its own storage, as safetensors (and any checkpoint) expects.
    return {k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
            for k, v in full.items()}


def shard_model(model: torch.nn.Module, world_size: int, device_type: str = "cpu") -> torch.nn.Module:
    """FSDP2: every transformer block (the classes named in HF `_no_split_modules`) and then the whole model
    become `fully_shard` units over a 1-D mesh of all ranks. Modifies `model` in place and returns it.

    Embeddings and the LM head stay in the root unit, so tied input/output embeddings stay tied. The root
    is initialised at once, so that whichever runs first (a training forward or `generate`) it stays the
    root. `generate` is wrapped to gather every unit once for the whole decode (no re-gathering at each
    new token; peft's generate also bypasses the root's hooks) and to reshard afterwards; it runs with
    HF's `synced_gpus`, so a rank whose sequences have all ended keeps stepping until every rank is done.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    block_names: set[str] = set()
    for m in model.modules():
        block_names.update(getattr(m, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names and m is not model]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = getattr(model, "_get_fsdp_state", lambda: None)()
    if state is not None and hasattr(state, "_lazy_init"):
        state._lazy_init()  # fix the root now (FSDP2 otherwise makes the first module that runs the root)
    if hasattr(model, "generate"):
        for m in model.modules():
            if hasattr(m, "generate"):
                m._is_fsdp_managed_module = True  # read by transformers' generate (synced_gpus default)
        model.generate = _gathered_generate(model.generate, blocks, model)
    return model


def _gathered_generate(generate, blocks: list[torch.nn.Module], root: torch.nn.Module):
    import functools

    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        units = [root] + blocks
        for unit in units:
            unit.unshard()
        for block in blocks:
            block.set_reshard_after_forward(False, recurse=False)
        try:
            return generate(*args, **kwargs)
        finally:
            for block in blocks:
                block.set_reshard_after_forward(True, recurse=False)
            for unit in units:
                unit.reshard()

    return wrapper


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of `model`'s structure (same class, names, tied parameters) with every tensor on the meta
    device: no memory. Call it before sharding; fill it with `load_state_dict(full, assign=True)` to get an
    ordinary module holding a full state (what checkpoint code sees), or `to_empty()` to load into."""
    import copy

    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        if id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def gather_optimizer_state(optimizer: torch.optim.Optimizer, dist_: Dist) -> dict | None:
    """`optimizer.state_dict()` with every DTensor shard gathered into a full CPU tensor: the format of an
    unsharded optimizer over the same parameters, so it loads at any number of ranks. A collective when
    sharded (every rank calls it, in the same order); rank 0 gets the dict, the other ranks None."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        entry = {}
        for k, v in sd["state"][idx].items():
            if isinstance(v, DTensor):
                v = v.full_tensor()
            entry[k] = v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
        state[idx] = entry
    if not dist_.is_main:
        return None
    return {"state": state, "param_groups": sd["param_groups"]}


def load_sharded_optimizer_state(optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load an unsharded optimizer state dict (as `gather_optimizer_state` writes it, or a single process
    saves it) into an optimizer over FSDP2 DTensor parameters: each rank keeps its own shard of every
    state tensor shaped like its parameter. Every rank must hold the same `full` dict (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, entry in full["state"].items():
        p = params[int(idx)]
        out = {}
        for k, v in entry.items():
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            out[k] = v
        state[idx] = out
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(plain: torch.nn.Module, tied: list[list[str]]) -> None:
    """Make every name of each tied group point at one parameter again (the first one not on meta)."""
    for names in tied:
        present = [n for n in names if not plain.get_parameter(n).is_meta] or names
        first = plain.get_parameter(present[0])
        for name in names:
            owner, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(owner) if owner else plain, attr, first)


def fill_skeleton(skeleton: torch.nn.Module, full: dict[str, torch.Tensor], *,
                  trainable_only: bool = False) -> torch.nn.Module:
    """A plain module of the skeleton's structure holding the tensors of `full` (assigned, not copied),
    with tied parameters tied again. The skeleton itself stays on the meta device. With `trainable_only`
    the frozen parameters may stay on meta (LoRA: peft's save_pretrained writes the adapter alone)."""
    plain = meta_skeleton(skeleton)
    tied = _tied_groups(plain)
    plain.load_state_dict(full, strict=False, assign=True)
    _retie(plain, tied)
    missing = [n for n, p in plain.named_parameters() if p.is_meta and (p.requires_grad or not trainable_only)]
    if missing:
        raise ValueError(f"the gathered state dict lacks {missing[:5]}")
    return plain


def empty_like_skeleton(skeleton: torch.nn.Module, *, trainable_only: bool = False) -> torch.nn.Module:
    """A plain module of the skeleton's structure on the CPU, floating tensors filled with NaN, to read a
    checkpoint into (`loaded_state` then tells whether the checkpoint filled everything). With
    `trainable_only` only the trainable parameters get memory (LoRA: the adapter); the rest stays on meta."""
    plain = meta_skeleton(skeleton)
    tied = _tied_groups(plain)
    if trainable_only:
        for name, p in list(plain.named_parameters()):
            if p.requires_grad:
                owner, _, attr = name.rpartition(".")
                fresh = torch.nn.Parameter(torch.full(p.shape, float("nan"), dtype=p.dtype), requires_grad=True)
                setattr(plain.get_submodule(owner) if owner else plain, attr, fresh)
    else:
        plain.to_empty(device="cpu")  # a new tensor per name: ties are made again below
        with torch.no_grad():
            for t in list(plain.parameters()) + list(plain.buffers()):
                t.fill_(float("nan") if t.is_floating_point() else 0)
    _retie(plain, tied)
    return plain


def loaded_state(plain: torch.nn.Module, *, only_trainable: bool, what: str) -> dict[str, torch.Tensor]:
    """The state a checkpoint filled in a module from `empty_like_skeleton`: every persistent tensor, or
    only the trainable parameters (LoRA: the adapter), checked to hold no NaN left from the fill."""
    if only_trainable:
        state = {n: p.detach() for n, p in plain.named_parameters() if p.requires_grad}
    else:
        state = {k: v.detach() for k, v in plain.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point() and torch.isnan(v).any():
            raise ValueError(f"{what}: {k} was not restored from the checkpoint")
    return state
