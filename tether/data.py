"""Prompt datasets: load prompt rows from common file formats and sample them in reproducible batches.

Every problem with the data is reported with the row it was found in, so a user can go and fix it:

- ``.jsonl``: row numbers are 1-based line numbers in the file (blank lines are allowed and ignored).
- ``.json`` (a list of objects), ``.csv``, ``.parquet`` and ``datasets`` directories: row numbers are the 1-based
  position of the record (for CSV the header line is not counted, so row 1 is the first data row).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.rollout.prompts import prompt_problem

SUPPORTED_FORMATS = ".jsonl, .json, .csv, .parquet, or a directory written by datasets' save_to_disk"


class DataError(ValueError):
    """The prompt data is unusable. The message names the file and, where it applies, the row and the reason."""


@dataclass
class PromptData:
    """Prompt rows that passed validation, plus the (row number, reason) of every row that was skipped."""

    rows: list[dict[str, Any]]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    source: str = ""

    def skipped_summary(self, max_examples: int = 5) -> str:
        """One line for the training log: how many rows were skipped and why, for the first few of them."""
        if not self.skipped:
            return f"{self.source}: all {len(self.rows)} rows used"
        examples = "; ".join(f"row {n}: {reason}" for n, reason in self.skipped[:max_examples])
        more = f"; and {len(self.skipped) - max_examples} more" if len(self.skipped) > max_examples else ""
        total = len(self.skipped) + len(self.rows)
        return f"{self.source}: skipped {len(self.skipped)} of {total} rows ({examples}{more})"


# --------------------------------------------------------------------------------------------------------------------
# Readers. Each yields (row_number, record) where record is a dict, or (row_number, problem string) for a row that
# could not even be parsed into a dict. Whole-file problems (not found, not parseable at all) raise DataError.


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, f"malformed row: not valid JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(record, dict):
                yield line_no, f"malformed row: expected a JSON object, got {type(record).__name__}"
                continue
            yield line_no, record


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). "
            "A .json file must hold one list of objects; for one object per line, name the file .jsonl"
        ) from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects at the top level, got {type(data).__name__}")
    for i, record in enumerate(data, start=1):
        if isinstance(record, dict):
            yield i, record
        else:
            yield i, f"malformed row: expected a JSON object, got {type(record).__name__}"


def _read_csv(path: Path):
    # utf-8-sig: spreadsheet programs like to start CSV files with a byte-order mark, which would otherwise end up
    # glued to the first column's name.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: the CSV file is empty (no header row)")
        for i, values in enumerate(reader, start=1):
            if not values:
                continue  # csv yields [] for blank lines
            if len(values) != len(header):
                yield i, f"malformed row: {len(values)} fields but the header has {len(header)}"
                continue
            yield i, dict(zip(header, values))


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated exception types for unreadable files
        raise DataError(f"{path}: could not read as Parquet: {e}") from e
    for i, record in enumerate(table.to_pylist(), start=1):
        yield i, record


def _read_saved_dataset(path: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError for a dir that isn't a saved dataset, others for corrupt ones
        raise DataError(f"{path}: not a dataset directory written by datasets' save_to_disk ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds.keys())})")
        ds = ds["train"]
    for i, record in enumerate(ds, start=1):
        yield i, record


def _reader_for(path: Path):
    if path.is_dir():
        return _read_saved_dataset
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        shown = repr(suffix) if suffix else "(no extension)"
        raise DataError(f"{path}: unsupported data format {shown}; supported: {SUPPORTED_FORMATS}")
    return readers[suffix]


# --------------------------------------------------------------------------------------------------------------------


def load_prompt_rows(
    source: str | Path,
    *,
    prompt_column: str = "prompt",
    on_bad_row: str = "skip",
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> PromptData:
    """Load prompt rows from a file or saved dataset directory and validate them.

    Each returned row holds the prompt under the key ``"prompt"`` plus every other column unchanged (answers,
    metadata, ... for the reward function). Bad rows (malformed, missing prompt, empty or non-string prompt, prompt
    longer than ``max_prompt_tokens`` as measured by ``count_tokens``) are skipped and recorded in ``skipped`` when
    ``on_bad_row="skip"``, or raise DataError at the first one when ``on_bad_row="error"``. No usable rows at all is
    always a DataError.
    """
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    if max_prompt_tokens is not None and count_tokens is None:
        raise ValueError("max_prompt_tokens needs count_tokens (a function that returns a prompt's length in tokens)")

    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    reader = _reader_for(path)

    rows: list[dict[str, Any]] = []
    skipped: list[tuple[int, str]] = []
    columns_seen: set[str] = set()
    for row_no, record in _decoded(reader(path), path):
        problem = None
        if isinstance(record, str):
            problem = record
        else:
            columns_seen.update(record)
            problem = _prompt_problem(record, prompt_column, max_prompt_tokens, count_tokens)
        if problem is not None:
            if on_bad_row == "error":
                raise DataError(f"{path}: row {row_no}: {problem}")
            skipped.append((row_no, problem))
            continue
        if prompt_column != "prompt" and "prompt" in record:
            # Renaming the prompt column to "prompt" would silently overwrite this one.
            raise DataError(
                f"{path}: row {row_no}: has both the prompt column {prompt_column!r} and a separate 'prompt' column; "
                "rename one of them"
            )
        prompt = record[prompt_column]
        row = {k: v for k, v in record.items() if k != prompt_column}
        row["prompt"] = prompt
        rows.append(row)

    if not rows:
        if not skipped:
            raise DataError(f"{path}: no rows")
        hint = ""
        if columns_seen and prompt_column not in columns_seen:
            hint = f" (there is no {prompt_column!r} column; columns: {', '.join(sorted(columns_seen))})"
        first = "; ".join(f"row {n}: {reason}" for n, reason in skipped[:3])
        raise DataError(f"{path}: all {len(skipped)} rows are unusable{hint}; first problems: {first}")
    return PromptData(rows=rows, skipped=skipped, source=str(path))


def _decoded(records, path: Path):
    """The reader's records; a text file that is not UTF-8 becomes a DataError naming the file and the byte."""
    try:
        yield from records
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} is not valid UTF-8); save "
                        f"the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > "
                        f"{path.stem}.utf8{path.suffix}`") from None


def _prompt_problem(
    record: dict, prompt_column: str, max_prompt_tokens: int | None, count_tokens: Callable[[str], int] | None
) -> str | None:
    if prompt_column not in record:
        return f"missing prompt column {prompt_column!r}"
    prompt = record[prompt_column]
    if prompt is None:
        return f"prompt column {prompt_column!r} is null"
    if not isinstance(prompt, (str, list)):
        return f"prompt column {prompt_column!r} is a {type(prompt).__name__}, not a string or a list of messages"
    problem = prompt_problem(prompt)  # a string, or a conversation: [{"role": ..., "content": ...}, ...]
    if problem is not None:
        return problem
    if max_prompt_tokens is not None:
        n = count_tokens(prompt)
        if n > max_prompt_tokens:
            return f"prompt is {n} tokens, longer than max_prompt_tokens={max_prompt_tokens}"
    return None


# --------------------------------------------------------------------------------------------------------------------


class PromptSampler:
    """Draws batches of prompt rows, epoch after epoch, deterministically from ``seed``.

    Epoch ``e`` visits the rows in the order given by a shuffle seeded with ``seed + e`` (or in file order when
    ``shuffle=False``). A batch that runs past the end of an epoch continues into the next one, so every batch has
    exactly ``batch_size`` rows and every row is seen once per epoch. ``state_dict`` / ``load_state_dict`` capture
    (epoch, position), which is all it takes for a resumed run to draw the same batches as an uninterrupted one.
    """

    def __init__(self, rows: list[dict], *, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if not rows:
            raise ValueError("PromptSampler needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next row to draw
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[dict]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._order_for(self.epoch)
            batch.append(self.rows[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        # The position only means the same thing if the data is the same; a changed dataset can't resume exactly.
        if "num_rows" in state and state["num_rows"] != len(self.rows):
            raise ValueError(
                f"sampler state was saved for {state['num_rows']} rows but this dataset has {len(self.rows)}; "
                "the prompt data changed since the checkpoint was written"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.rows):
            raise ValueError(f"invalid sampler state: epoch={epoch}, position={position} for {len(self.rows)} rows")
        self.epoch, self.position = epoch, position
        self._order = self._order_for(epoch)

