"""Atomic checkpoints: a crash at any moment leaves either the previous complete checkpoint or the new one.

Layout of `RUN/checkpoints/step-000010/`:
    policy/            HF model dir (save_pretrained, safetensors; a peft model saves its adapter only) + tokenizer
    critic/            model.safetensors (any other nn.Module: its state_dict)
    optimizers.pt      optimiser state dicts      } loaded with weights_only=True
    schedulers.pt      scheduler state dicts      }
    rng.pt             python / numpy / torch RNG states
    trainer_state.json step, data position, KL controller, ...
    COMPLETE           written last; a directory without it is never loaded

Everything is written into `checkpoints/.tmp-step-000010-<random>/`, fsynced, then renamed into place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

MARKER = "COMPLETE"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def _save_module(module: nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(out, safe_serialization=True)
    else:
        # Shared tensors (tied weights) must be stored once for safetensors.
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        seen: dict[int, str] = {}
        unique = {}
        for k, v in state.items():
            key = v.untyped_storage().data_ptr() if v.numel() else id(v)
            if key in seen:
                continue
            seen[key] = k
            unique[k] = v.clone()
        save_file(unique, str(out / "model.safetensors"))


def _load_module(module: nn.Module, path: Path) -> None:
    """Load weights saved by `_save_module` into `module` in place."""
    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(module, load_file(str(path / "adapter_model.safetensors")))
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {path} has weights the model does not: {unexpected[:5]}")
    tied = _tied_names(module)
    really_missing = [k for k in missing if k not in tied]
    if really_missing:
        raise ValueError(f"checkpoint {path} lacks weights of the model: {really_missing[:5]}")


def _tied_names(module: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier-named parameter (e.g. a tied LM head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, *, models: dict[str, nn.Module],
                    optimizers: dict | None = None, schedulers: dict | None = None, state: dict | None = None,
                    keep_last: int | None = 3, tokenizer=None, model_states: dict | None = None) -> Path:
    """Write a checkpoint atomically and prune to the newest `keep_last`. Returns its directory.

    `model_states` optionally gives already-gathered state dicts (sharded training) for some models.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / _step_name(step)
    tmp = root / f".tmp-{_step_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, module in models.items():
            if model_states and name in model_states:
                (tmp / name).mkdir()
                save_file({k: v.contiguous() for k, v in model_states[name].items()},
                          str(tmp / name / "model.safetensors"))
            else:
                _save_module(module, tmp / name)
        if tokenizer is not None and "policy" in models:
            tokenizer.save_pretrained(tmp / "policy")
        torch.save({k: o.state_dict() for k, o in (optimizers or {}).items()}, tmp / "optimizers.pt")
        torch.save({k: s.state_dict() for k, s in (schedulers or {}).items()}, tmp / "schedulers.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))
        _fsync_tree(tmp)
        (tmp / MARKER).write_text("ok\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one away first, then drop it
            old = root / f".tmp-old-{_step_name(step)}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: str | Path, *, clean: bool = True) -> Path | None:
    """The newest complete checkpoint, or None. Leftovers of interrupted writes are removed when `clean`."""
    root = Path(run_dir) / "checkpoints"
    if clean and root.exists():
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, *, models: dict[str, nn.Module], optimizers: dict | None = None,
                    schedulers: dict | None = None, restore_rng: bool = True) -> dict:
    """Load a checkpoint into existing objects in place; returns the trainer state (with 'step')."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker): it was interrupted "
                         "while being written; use tether.train.checkpoint.latest_checkpoint(run_dir)")
    for name, module in models.items():
        _load_module(module, path / name)
    if optimizers:
        saved = torch.load(path / "optimizers.pt", weights_only=True)
        for k, opt in optimizers.items():
            opt.load_state_dict(saved[k])
    if schedulers:
        saved = torch.load(path / "schedulers.pt", weights_only=True)
        for k, sched in schedulers.items():
            sched.load_state_dict(saved[k])
    if restore_rng:
        _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


class GracefulStop:
    """SIGINT / SIGTERM set `.requested`; the loop finishes its step, saves and exits.

    A second SIGINT raises KeyboardInterrupt at once. Handlers are restored on exit; outside the main
    thread this is a no-op (signals can only be handled there).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
