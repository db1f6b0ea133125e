"""Metrics and sample logging for a run directory.

``metrics.jsonl`` holds one JSON object per logged step: ``{"step": 12, "reward/mean": 0.4, ...}``.
``samples.jsonl`` holds one JSON object per sample: ``{"step": 12, "prompt": ..., "completion": ..., "reward": ...}``.

Both are strict JSON: non-finite floats (NaN, inf) are written as ``null``, because NaN/Infinity are not JSON and
other tools (jq, JavaScript, pandas with some engines) reject them. A ``null`` metric means "the value was not
finite" and readers such as the report treat it as a gap. Lines are flushed as they are written, so a crashed run
loses at most the line being written; ``read_jsonl`` skips such a torn line.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def to_jsonable(value: Any) -> Any:
    """Convert a logged value to plain JSON types: tensors/numpy scalars to numbers, non-finite floats to None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # torch tensors, numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)  # anything exotic in a sample row (a Path, a dataclass, ...) is still worth seeing


def _dumps(record: dict) -> str:
    # allow_nan=False is a guarantee that to_jsonable did its job: we never write invalid JSON.
    return json.dumps(to_jsonable(record), ensure_ascii=False, allow_nan=False)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file written by MetricsLogger. A missing file reads as empty.

    Lines that don't parse as a JSON object (normally a line torn by a crash mid-write) are skipped with a warning
    rather than making the whole file unreadable.
    """
    path = Path(path)
    if not path.exists():
        return []
    records, bad = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(line_no)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s): {bad[:5]}", stacklevel=2)
    return records


class MetricsLogger:
    """Writes metrics to ``metrics.jsonl`` (always), TensorBoard (optional) and Weights & Biases (optional).

    With ``enabled=False`` (non-zero data-parallel ranks) nothing is created and every method does nothing.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str | None = None,
        wandb_config: dict | None = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        self._files: dict[str, Any] = {}
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb:
            self._wandb = _start_wandb(self.run_dir, wandb_project, wandb_config)
        self._use_tensorboard = tensorboard
        if tensorboard:
            self._tb = self._open_tensorboard(purge_step=None)

    # ---------------------------------------------------------------------------------------------------- writing

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` for ``step``: one line in metrics.jsonl, TensorBoard scalars, and wandb if enabled."""
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("'step' is reserved in metrics; pass the step as the first argument")
        values = {}
        for key, value in metrics.items():
            if hasattr(value, "item"):  # 0-d tensors / numpy scalars
                value = value.item()
            if not isinstance(value, (int, float)):  # bool is an int, which is fine
                raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}")
            values[key] = value
        self._append(METRICS_FILE, {"step": int(step), **values})
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Append one line per sample row (prompt, completion, reward, ...) to samples.jsonl."""
        if not self.enabled:
            return
        for row in rows:
            self._append(SAMPLES_FILE, {"step": int(step), **row})

    def _append(self, name: str, record: dict) -> None:
        f = self._files.get(name)
        if f is None:
            path = self.run_dir / name
            _end_torn_line(path)
            f = self._files[name] = open(path, "a", encoding="utf-8")
        f.write(_dumps(record) + "\n")
        f.flush()  # so a crash loses at most this line, and `tail -f metrics.jsonl` is live

    # ---------------------------------------------------------------------------------------------------- resuming

    def truncate_after(self, step: int) -> None:
        """Drop every logged line with a step after ``step`` (call when resuming from the checkpoint at ``step``).

        The steps after the checkpoint will be run and logged again; without this they would appear twice. Each file
        is rewritten to a temporary file and swapped in with os.replace, so a crash here leaves either the old or the
        new file, never a half-written one. Torn lines are dropped too.
        """
        if not self.enabled:
            return
        for name in (METRICS_FILE, SAMPLES_FILE):
            f = self._files.pop(name, None)
            if f is not None:
                f.close()
            path = self.run_dir / name
            if not path.exists():
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a torn last line is expected after a crash; we drop it here
                kept = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step]
            tmp = path.with_name(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
            with open(tmp, "w", encoding="utf-8") as out:
                for record in kept:
                    out.write(_dumps(record) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        if self._tb is not None:
            # TensorBoard has its own mechanism: a writer opened with purge_step hides the events at and after that
            # step that earlier event files hold, so the resumed curve doesn't double back on itself.
            self._tb.close()
            self._tb = self._open_tensorboard(purge_step=step + 1)

    def _open_tensorboard(self, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _end_torn_line(path: Path) -> None:
    """If a crash left ``path`` ending mid-line, end that line so the next record starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _start_wandb(run_dir: Path, project: str | None, config: dict | None):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(
            "wandb logging was requested but the wandb package is not installed; "
            "install it (pip install 'tether[wandb]') or turn wandb logging off"
        ) from e
    # Keep one wandb run per run directory: a resumed run continues the same wandb run instead of starting a new one.
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if not run_id:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
    return wandb.init(project=project, config=config, dir=str(run_dir), id=run_id, resume="allow")
