"""Atomic, resumable checkpoints.

Layout of one checkpoint::

    run_dir/checkpoints/step-000010/
        policy/               HF model dir from save_pretrained (+ tokenizer), or adapter-only for a peft model
        critic/model.safetensors   a plain nn.Module's state_dict
        optimizers.pt         {name: optimizer.state_dict()}
        schedulers.pt         {name: scheduler.state_dict()}
        trainer_state.json    {"step": 10, ...caller's JSON state: KL controller, sampler position, config hash}
        rng.pt                python / numpy / torch (CPU and CUDA) RNG states, one set per rank
        MANIFEST.json         {relative path: {"size": bytes, "sha256": hex}} of every file above
        COMPLETE              written last

Why it can't be corrupted by a crash: everything is written into a hidden ``.tmp-step-000010-<random>`` directory,
every file is fsynced, then COMPLETE is written, then the directory is renamed to ``step-000010`` (rename is atomic
on POSIX) and the parent directory is fsynced. A checkpoint directory named ``step-*`` therefore either exists
complete or doesn't exist; ``latest_checkpoint`` additionally requires COMPLETE. Re-saving an existing step moves the
old copy aside to ``.old-step-...`` first; if a crash lands between the two renames, ``latest_checkpoint`` moves the
old copy back. Old checkpoints are pruned by renaming them to ``.trash-...`` before deleting, so a half-deleted
checkpoint never looks like a real one. A lock file (flock, released by the OS even on SIGKILL) keeps the cleanup of
leftovers from deleting the temporary directory of a save that is still running in another process.

A checkpoint can still be damaged after it was written (a disk fault, a copy cut short, a file truncated by hand):
``verify_checkpoint`` checks every file against the manifest, so that a resume can take the run's checkpoints
newest first and fall back, saying why, to the newest one that verifies. A save that fails (disk full, permissions) raises ``CheckpointWriteError`` with the path and the
cause, after removing its temporary directory; earlier checkpoints are never touched before the new one is complete.

Everything loaded with torch.load uses ``weights_only=True``, so a checkpoint can't run code when loaded.
"""

from __future__ import annotations

import errno
import fcntl
import inspect
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from tether.files import sha256_of

CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
MARKER = COMPLETE  # older name, still used by callers
TRAINER_STATE = "trainer_state.json"
OPTIMIZERS = "optimizers.pt"
SCHEDULERS = "schedulers.pt"
RNG = "rng.pt"
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_DIR = re.compile(r"^\.old-(step-\d+)-[0-9a-f]+$")
_LEFTOVER = re.compile(r"^\.(tmp|old|trash)-")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class CheckpointError(ValueError):
    """A checkpoint is incomplete or doesn't match the models it is being loaded into."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission); the earlier ones are intact."""


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ------------------------------------------------------------------------------------------------ filesystem helpers


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a directory can be opened read-only and fsynced on Linux/macOS
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))



def _manifest(root: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file under `root`, by path relative to it."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in sorted(filenames):
            path = Path(dirpath) / name
            out[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return dict(sorted(out.items()))


def verify_checkpoint(path: str | Path, *, hashes: bool = True) -> str | None:
    """None when the checkpoint at `path` is complete and every file matches its manifest; otherwise the first
    problem found, in words. A checkpoint written before manifests existed is checked for COMPLETE alone."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        return f"no {COMPLETE} marker (the save did not finish)"
    if not (path / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for rel, want in manifest.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"{rel} is {size} bytes, the manifest says {want['size']} (truncated or damaged)"
        if hashes and sha256_of(file) != want["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest (damaged)"
    return None


@contextmanager
def _lock(root: Path, blocking: bool) -> Iterator[bool]:
    """Exclusive lock on ``root/.lock``; yields False when ``blocking=False`` and someone else holds it."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _remove_dir(path: Path, root: Path) -> None:
    # Rename first: a directory that rmtree has half-emptied must not keep a name that looks like a checkpoint.
    trash = root / f".trash-{path.name.lstrip('.')}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _clean_leftovers(root: Path) -> None:
    """Remove what interrupted saves left behind, and put back a checkpoint caught mid-replacement."""
    for path in root.iterdir():
        if not path.is_dir():
            continue
        old = _OLD_DIR.match(path.name)
        if old:
            final = root / old.group(1)
            if not final.exists() and (path / COMPLETE).is_file():
                os.rename(path, final)  # the crash came between "move old copy aside" and "move new copy in"
                _fsync_path(root)
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------- models


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose weights we save: strip DDP / DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _is_peft(model: nn.Module) -> bool:
    # Duck-typed so it also covers transformers models with a peft adapter attached (load_adapter), whose
    # save_pretrained likewise writes the adapter alone.
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _save_model(model: nn.Module, directory: Path) -> None:
    model = _unwrap(model)
    if hasattr(model, "save_pretrained"):
        # transformers 5 always writes safetensors and dropped the argument; peft (and transformers 4) take it.
        kwargs = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True
        model.save_pretrained(str(directory), **kwargs)
    else:
        directory.mkdir()
        # save_model (not save_file) de-duplicates tensors that share memory, e.g. tied weights.
        save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"}, force_contiguous=True)


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        files = [single.name]
    else:
        present = ", ".join(sorted(p.name for p in directory.iterdir())) if directory.is_dir() else "nothing"
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json (found: {present})")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: shard {name} listed in the index is missing")
        with _reading(directory / name):
            weights.update(load_file(directory / name))
    return weights


@contextmanager
def _reading(what: Path) -> Iterator[None]:
    """Name the file when reading it fails: a truncated safetensors or zip file raises the library's own error
    (SafetensorError, 'PytorchStreamReader failed ...'), which names none."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader's failure means the same thing here: damaged
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{what}: cannot be read, damaged or truncated ({type(e).__name__}: {first})") from e


def _tied_partners(model: nn.Module) -> dict[str, set[str]]:
    """For each parameter/buffer name, the other names of the same tensor object (tied weights).

    By object identity rather than data pointer: meta and empty tensors all share pointer 0 without being tied.
    """
    groups: dict[int, set[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        groups.setdefault(id(tensor), set()).add(name)
    return {name: group - {name} for group in groups.values() for name in group}


def _save_state_dict(state: dict[str, torch.Tensor], directory: Path) -> None:
    """Write an already-gathered state dict (sharded training) as model.safetensors, storing tied tensors once."""
    directory.mkdir()
    unique: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        unique[key] = tensor.detach().contiguous()
    save_file(unique, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _load_weights(model: nn.Module, directory: Path) -> None:
    model = _unwrap(model)
    if _is_peft(model):
        adapter = directory / "adapter_model.safetensors"
        if not adapter.is_file():
            raise CheckpointError(f"{directory}: the model is a peft model but there is no adapter_model.safetensors")
        from peft import set_peft_model_state_dict

        with _reading(adapter):
            adapter_weights = load_file(adapter)
        result = set_peft_model_state_dict(model, adapter_weights)
        if result.unexpected_keys:
            raise CheckpointError(f"{adapter}: adapter weights the model doesn't have: {result.unexpected_keys[:5]}")
        return

    weights = _read_weights(directory)
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise CheckpointError(
            f"{directory}: {len(unexpected)} weight(s) in the checkpoint that the model doesn't have: {unexpected[:5]}"
        )
    # A weight may be absent only because it is tied to one that is present (save_pretrained drops lm_head.weight
    # when it is the input embedding, for example); anything else missing means a different model.
    partners = _tied_partners(model)
    missing = sorted(k for k in set(own) - set(weights) if not partners.get(k, set()) & set(weights))
    if missing:
        raise CheckpointError(
            f"{directory}: {len(missing)} weight(s) of the model missing from the checkpoint: {missing[:5]}"
        )
    wrong_shape = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items() if v.shape != own[k].shape
    ]
    if wrong_shape:
        raise CheckpointError(f"{directory}: weight shapes differ (checkpoint vs model): {wrong_shape[:5]}")
    model.load_state_dict(weights, strict=False)


# ------------------------------------------------------------------------------------------------------------- RNG


def _is_healthy(path: Path) -> bool:
    try:
        return json.loads((path / TRAINER_STATE).read_text()).get("healthy", True) is True
    except (OSError, ValueError):
        return False


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA), in a form torch.load(weights_only) reads."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            print(
                f"warning: checkpoint has CUDA RNG states for {len(state['cuda'])} devices but "
                f"{torch.cuda.device_count()} are visible; CUDA RNG not restored",
                file=sys.stderr,
            )


# ------------------------------------------------------------------------------------------------------ public API


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    keep_last: int | None = 3,
    tokenizer: Any = None,
    model_states: dict[str, dict[str, torch.Tensor]] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Atomically write the checkpoint for ``step`` to ``run_dir/checkpoints/step-NNNNNN/`` and return its path.

    ``models`` maps a folder name to a module (``{"policy": ..., "critic": ...}``); ``state`` is JSON-serializable
    trainer state stored in trainer_state.json next to the step. The tokenizer, if given, is saved into the policy
    folder (or a ``tokenizer`` folder if there is no policy) so the folder is a loadable HF model. Afterwards only the
    newest ``keep_last`` checkpoints are kept (None keeps all); the one just written is never pruned.
    ``model_states`` optionally gives already-gathered state dicts (sharded training) for some of the models; those
    are written as a plain model.safetensors instead of calling the module's save_pretrained.
    ``rng_states``: one RNG state per data-parallel rank (``rng_state()`` on each), rank order; default: this
    process's. Pruning never removes the newest checkpoint whose state says ``"healthy": True``, so a run whose
    last updates blew up keeps one checkpoint from before that.
    """
    optimizers = optimizers or {}
    schedulers = schedulers or {}
    state = dict(state or {})
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (or None to keep all), got {keep_last}")
    if not models:
        raise ValueError("save_checkpoint needs at least one model")
    for name in models:
        if not _MODEL_NAME.match(name):
            raise ValueError(f"model name {name!r} must be letters, digits, '_' or '-' (it becomes a folder name)")
    if state.get("step", step) != step:
        raise ValueError(f"state['step']={state['step']} contradicts step={step}")
    state["step"] = step
    try:  # check before writing anything, so a bad state can't leave half a checkpoint behind
        state_json = json.dumps(state, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint state must be JSON-serializable: {e}") from e

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_dir_name(step)
    final = root / name
    with _lock(root, blocking=True):
        tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for model_name, model in models.items():
                if model_states and model_name in model_states:
                    _save_state_dict(model_states[model_name], tmp / model_name)
                else:
                    _save_model(model, tmp / model_name)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / ("policy" if "policy" in models else "tokenizer")))
            torch.save({k: opt.state_dict() for k, opt in optimizers.items()}, tmp / OPTIMIZERS)
            torch.save({k: sch.state_dict() for k, sch in schedulers.items()}, tmp / SCHEDULERS)
            torch.save({"ranks": rng_states or [rng_state()]}, tmp / RNG)
            (tmp / TRAINER_STATE).write_text(state_json + "\n")
            _fsync_tree(tmp)
            # The manifest is read back from disk, so it describes what was written, not what was meant.
            (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1) + "\n")
            _fsync_path(tmp / MANIFEST)
            # COMPLETE goes last, after everything else is on disk: its presence is the promise that all of it is.
            (tmp / COMPLETE).write_text(f"step {step}\n")
            _fsync_path(tmp / COMPLETE)
            _fsync_path(tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, CheckpointWriteError):
                raise _write_error(final, root, e) from e
            raise

        if final.exists():  # re-saving a step: move the old copy aside, move the new one in, then delete the old
            old = root / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            _fsync_path(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
            _fsync_path(root)

        if keep_last is not None:
            found = [path for _, path in _complete_checkpoints(root)]
            healthy = [path for path in found if _is_healthy(path)]
            keep = set(found[-keep_last:]) | {final} | set(healthy[-1:])
            for path in found:
                if path not in keep:
                    _remove_dir(path, root)
    return final


def _write_error(final: Path, root: Path, cause: BaseException) -> CheckpointWriteError:
    """One line naming the checkpoint, the cause and the free space, and what is still there."""
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC or "unexpected pos" in text:
        text = f"the disk is full ({text})"  # torch's zip writer reports a full disk as an 'unexpected pos'
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    kept = [p.name for _, p in _complete_checkpoints(root)] if root.is_dir() else []
    intact = f"earlier checkpoints intact: {', '.join(kept)}" if kept else "no earlier checkpoint"
    err = CheckpointWriteError(f"could not write checkpoint {final}: {text}; {free}; {intact}")
    err.errno = getattr(cause, "errno", None)
    return err


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    return [path for _, path in _complete_checkpoints(root)] if root.is_dir() else []


def latest_checkpoint(run_dir: str | Path, *, clean: bool = True) -> Path | None:
    """The newest complete checkpoint of a run (by step), or None.

    Leftovers of interrupted saves (``.tmp-*`` and friends) are never returned. With ``clean`` they are deleted
    (and a checkpoint caught mid-replacement is put back), unless another process is saving into this run right now.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    # Only touch the directory (even the lock file) when there is something to clean: every data-parallel rank calls
    # this at startup, and the ranks other than 0 must not write to the run directory.
    if clean and any(_LEFTOVER.match(p.name) for p in root.iterdir()):
        with _lock(root, blocking=False) as locked:
            if locked:
                _clean_leftovers(root)
    found = _complete_checkpoints(root)
    return found[-1][1] if found else None


def load_checkpoint(
    path: str | Path,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    restore_rng: bool = True,
    rank: int = 0,
) -> dict[str, Any]:
    """Load a checkpoint into existing modules, optimizers and schedulers in place; returns the trainer state.

    Only the models named in ``models`` are loaded (a checkpoint may hold more). Weights must match exactly: a
    weight in the checkpoint that the model lacks is an error, and so is a missing weight unless it is tied to one
    that was loaded. The returned dict is trainer_state.json, including ``"step"``. ``restore_rng`` restores
    rank ``rank``'s RNG states where the checkpoint has them (see `restore_rank_rng`).
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    with _reading(path / TRAINER_STATE):
        state = json.loads((path / TRAINER_STATE).read_text())

    for name, model in models.items():
        if not (path / name).is_dir():
            have = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise CheckpointError(f"{path}: no model {name!r} in this checkpoint (it has: {', '.join(have)})")
        _load_weights(model, path / name)

    for filename, objects in ((OPTIMIZERS, optimizers), (SCHEDULERS, schedulers)):
        if not objects:
            continue
        with _reading(path / filename):
            saved = torch.load(path / filename, map_location="cpu", weights_only=True)
        for name, obj in objects.items():
            if name not in saved:
                raise CheckpointError(f"{path / filename}: no entry {name!r} (it has: {', '.join(saved) or 'none'})")
            obj.load_state_dict(saved[name])  # an optimizer moves its state to its parameters' device itself

    if restore_rng:
        restore_rank_rng(path, rank)
    return state


def restore_rank_rng(path: str | Path, rank: int = 0) -> bool:
    """Restore rank `rank`'s RNG states from a checkpoint; False (nothing restored) when the checkpoint was
    written at fewer ranks and holds none for it."""
    path = Path(path)
    with _reading(path / RNG):
        saved = torch.load(path / RNG, weights_only=True)
    per_rank = saved["ranks"] if "ranks" in saved else [saved]  # older checkpoints: one process's state
    if rank >= len(per_rank):
        return False
    _restore_rng(per_rank[rank])
    return True


class GracefulStop:
    """Turn SIGINT / SIGTERM into a request to stop at the next step boundary.

    Inside ``with GracefulStop() as stop:`` the training loop checks ``stop.requested`` between steps, and when it
    is set saves a checkpoint and exits cleanly (a cluster scheduler's SIGTERM then costs no work). A second SIGINT
    raises KeyboardInterrupt at once, for when the user really means it. The previous handlers come back on exit.
    Signal handlers can only be installed from the main thread; elsewhere this does nothing and ``requested``
    stays False unless the caller sets it.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        message = (
            f"\n{self.signal_name} received: stopping after this step and saving a checkpoint "
            "(press Ctrl-C again to abort immediately)\n"
        )
        # os.write, not print: the signal may arrive while the main thread is inside a print to stderr, and a
        # buffered stream written to reentrantly raises RuntimeError.
        try:
            os.write(2, message.encode())
        except OSError:
            pass

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # getsignal returns None for handlers not installed from Python; the default is the best we can restore.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
