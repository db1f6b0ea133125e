"""Reward functions, how to load them from a config string, and how several are combined into one score.

A reward function is a plain callable

    f(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` are the dataset's other fields for the same rows (lists aligned with `prompts`, e.g.
`answer=[...]`). The trainer also passes two reserved columns: `truncated: list[bool]` (the completion hit
the length limit without an EOS) and `completion_lengths: list[int]` (in tokens). A function takes `**kwargs`
and ignores what it does not need. It may be `async def`.

Return values, per sample:
  * an int or float (finite) is a score; a bool counts as a number (True -> 1.0, False -> 0.0) because
    `return [ok for ok in checks]` is common and harmless;
  * None means "no opinion on this sample" (e.g. the row has no reference answer). A sample that no function
    scores is invalid: the trainer sets its advantage to 0;
  * anything else (NaN, inf, a string, a list, ...) is a failure, as is raising, returning the wrong number of
    scores, or running past the timeout.

`RewardScorer` runs the functions, checks every value and combines them into a weighted sum. Failures raise a
`RewardError` that names the function, the sample and the value (on_error="raise", the default), or score the
affected samples None and count them in `reward/<name>/failure_rate` (on_error="none").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import pickle
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., Any]  # sync -> list[float | None], or async -> awaitable of that

# Columns the trainer fills in itself; documented here so a dataset column cannot silently shadow them.
RESERVED_COLUMNS = ("truncated", "completion_lengths")


class RewardError(ValueError):
    """A reward function failed: it raised, timed out, or returned something that is not a score."""


# ----------------------------------------------------------------------------------------------------------
# Loading a reward function from a string


def load_reward_function(spec: str, kwargs: dict[str, Any] | None = None) -> RewardFunction:
    """Resolve a config string to a reward function.

    Accepted forms:
      * ``package.module:function``  - imported with importlib;
      * ``path/to/file.py:function`` - the file is loaded as a module (module name derived from the path);
      * ``builtin:<name>``           - one of `tether.rewards.builtin.BUILTIN_REWARDS`.

    If `kwargs` is given, the resolved object is treated as a factory and called with them to build the reward
    function (e.g. ``load_reward_function("builtin:length_penalty", {"target_length": 64, "coef": 0.01})``).
    Built-in factories are always called (with no arguments if `kwargs` is None).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"reward function spec {spec!r} must look like 'package.module:function', "
            f"'path/to/file.py:function' or 'builtin:<name>'"
        )
    # rpartition: a Windows drive letter ("C:\\...") may contain a colon, the function name never does.
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"reward function spec {spec!r} has an empty module or function part")

    is_factory = kwargs is not None
    if target == "builtin":
        from tether.rewards.builtin import BUILTIN_FACTORIES, BUILTIN_REWARDS

        if attr not in BUILTIN_REWARDS:
            raise ValueError(f"unknown built-in reward {attr!r} in {spec!r}; known: {sorted(BUILTIN_REWARDS)}")
        obj = BUILTIN_REWARDS[attr]
        is_factory = is_factory or attr in BUILTIN_FACTORIES
        if kwargs is not None and attr not in BUILTIN_FACTORIES:
            raise ValueError(f"built-in reward {spec!r} takes no arguments, got kwargs {kwargs}")
    else:
        module = _load_module(target, spec)
        if not hasattr(module, attr):
            raise ValueError(f"reward function spec {spec!r}: module {target!r} has no attribute {attr!r}")
        obj = getattr(module, attr)

    if is_factory:
        if not callable(obj):
            raise ValueError(f"reward function spec {spec!r}: {attr!r} is not callable, so it is not a factory")
        try:
            obj = obj(**(kwargs or {}))
        except TypeError as e:
            raise ValueError(f"reward function spec {spec!r}: calling the factory with {kwargs or {}} failed: {e}") from e
    if not callable(obj):
        raise ValueError(f"reward function spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


_FILE_MODULE_PREFIX = "tether_reward_"  # the modules loaded from reward files, named by their path


def _load_module(target: str, spec: str):
    looks_like_path = target.endswith(".py") or "/" in target or "\\" in target
    if not looks_like_path:
        try:
            return importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ValueError(f"reward function spec {spec!r}: module {target!r} not found ({e})") from e
        except SyntaxError as e:
            raise ValueError(f"reward function spec {spec!r}: {e.filename}, line {e.lineno}: syntax error: "
                             f"{e.msg}") from None

    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"reward function spec {spec!r}: file {str(path)!r} does not exist")
    # A unique, valid module name per file: two reward files called `rewards.py` must not collide.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    name = f"{_FILE_MODULE_PREFIX}{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward function spec {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before exec so dataclasses and pickling inside the file can find their module.
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[name]
        raise ValueError(f"reward function spec {spec!r}: {path}, line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"reward function spec {spec!r}: importing {path} raised "
                         f"{type(e).__name__}: {e}") from e
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ----------------------------------------------------------------------------------------------------------
# Combining reward functions


def to_another_process(reward) -> bytes:
    """`reward` pickled for another process (a spawned one, which imports nothing of this one's on its own):
    with the files that `path/to/file.py:fn` specs were loaded from, which `from_another_process` loads again
    before unpickling, so that functions defined there resolve. Raises what pickling raises (a lambda, a local
    function, an object holding a lock)."""
    files = sorted(str(m.__file__) for n, m in list(sys.modules.items()) if n.startswith(_FILE_MODULE_PREFIX))
    return pickle.dumps((files, pickle.dumps(reward)))


def from_another_process(payload: bytes):
    files, reward = pickle.loads(payload)
    for path in files:
        _load_module(path, f"{path}:<reward>")
    return pickle.loads(reward)


@dataclass
class RewardFunctionSpec:
    """One reward function in a `RewardScorer`: the callable (or a spec string for `load_reward_function`),
    its weight in the sum, and the name it logs under (defaults to the function's `__name__`)."""

    fn: RewardFunction | str
    weight: float = 1.0
    name: str | None = None


@dataclass
class RewardResult:
    """Scores for one batch.

    scores:       [B] float32, weighted sum over the functions that scored each sample; NaN where none did.
    valid:        [B] bool, True where at least one function gave a score.
    per_function: name -> [B] float32 raw (unweighted) scores, NaN where that function gave None or failed.
    stats:        `reward/<name>/{mean,std,failure_rate,none_rate}` per function and the overall
                  `reward/failure_rate` (failed (function, sample) pairs / all pairs). Means and stds are over
                  the function's non-None scores (population std), NaN when there are none. `none_rate`
                  counts the Nones the function returned itself; failures count only in `failure_rate`.
                  The overall mean/std/valid fraction of `scores` are left to the trainer (it reduces them
                  across ranks).
    """

    scores: torch.Tensor
    valid: torch.Tensor
    per_function: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)


class RewardScorer:
    """Runs a list of weighted reward functions on a batch and combines their scores.

    functions: a list of `RewardFunctionSpec`, `(fn, weight)` tuples, or bare callables / spec strings
               (weight 1). Names default to `fn.__name__` and are made unique with suffixes `_2`, `_3`, ...
    on_error:  "raise" (default) raises a `RewardError` on the first failure; "none" scores the failed samples
               None, logs a warning and counts them in the failure rates. A function that raises, times out
               or returns the wrong number of scores fails for every sample of that call; a bad single value
               (NaN, inf, non-number) fails only that sample.
    timeout_s: per-call limit for each function. Sync functions then run in a daemon worker thread; async ones
               under `asyncio.wait_for`. A timed-out *thread cannot be killed*: it keeps running in the
               background until it returns, so only use this for well-behaved code and run untrusted
               (model-written) code in `tether.rewards.sandbox`, which kills its process.
    """

    def __init__(
        self,
        functions: list[RewardFunctionSpec | tuple[RewardFunction | str, float] | RewardFunction | str],
        *,
        on_error: str = "raise",
        timeout_s: float | None = None,
    ):
        if on_error not in ("raise", "none"):
            raise ValueError(f"on_error must be 'raise' or 'none', got {on_error!r}")
        if timeout_s is not None and not (timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
        if not functions:
            raise ValueError("RewardScorer needs at least one reward function")
        self.on_error = on_error
        self.timeout_s = timeout_s

        self.fns: list[RewardFunction] = []
        self.weights: list[float] = []
        self.names: list[str] = []
        for i, item in enumerate(functions):
            spec = _as_spec(item, i)
            fn = load_reward_function(spec.fn) if isinstance(spec.fn, str) else spec.fn
            if not callable(fn):
                raise ValueError(f"reward function #{i} is a {type(fn).__name__}, not a callable")
            weight = spec.weight
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(f"reward function #{i} ({_default_name(fn)}) has weight {weight!r}; need a finite number")
            name = spec.name or _default_name(fn)
            self.fns.append(fn)
            self.weights.append(float(weight))
            self.names.append(_unique(name, self.names))

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None) -> RewardResult:
        columns = dict(columns or {})
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"got {n} prompts but {len(completions)} completions")
        for key, values in columns.items():
            if key in ("prompts", "completions"):
                raise ValueError(f"column name {key!r} clashes with the positional argument of the same name; rename it")
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} values for {n} samples")

        per_function: dict[str, torch.Tensor] = {}
        stats: dict[str, float] = {}
        total = torch.zeros(n, dtype=torch.float64)
        valid = torch.zeros(n, dtype=torch.bool)
        n_failures = 0
        for fn, weight, name in zip(self.fns, self.weights, self.names):
            values, failed, n_returned_none = self._score_one(fn, name, prompts, completions, columns)
            t = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
            has = ~torch.isnan(t)
            total += torch.where(has, t * weight, torch.zeros_like(t))
            valid |= has
            per_function[name] = t.float()
            n_failures += failed
            scored = t[has]
            stats[f"reward/{name}/mean"] = scored.mean().item() if len(scored) else math.nan
            stats[f"reward/{name}/std"] = scored.std(unbiased=False).item() if len(scored) else math.nan
            stats[f"reward/{name}/failure_rate"] = failed / n if n else 0.0
            stats[f"reward/{name}/none_rate"] = n_returned_none / n if n else 0.0

        scores = torch.where(valid, total, torch.full_like(total, math.nan)).float()
        # No overall reward/mean or reward/std here: the trainer logs those, reduced across ranks.
        stats["reward/failure_rate"] = n_failures / (n * len(self.fns)) if n else 0.0
        return RewardResult(scores=scores, valid=valid, per_function=per_function, stats=stats)

    # -- one function on the whole batch ---------------------------------------------------------------

    def _score_one(self, fn, name, prompts, completions, columns) -> tuple[list[float | None], int, int]:
        """Returns (values with failures as None, number of failed samples, number of Nones the function
        returned itself)."""
        n = len(prompts)
        if n == 0:
            return [], 0, 0
        try:
            raw = self._call(fn, name, prompts, completions, columns)
            raw = _as_list(raw, name, n)
        except RewardError as e:
            return self._fail_all(e, n)
        except Exception as e:  # the user's function raised: contain it, but keep the cause in the message
            err = RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}")
            err.__cause__ = e
            return self._fail_all(err, n)

        values: list[float | None] = []
        failed = n_none = 0
        for i, v in enumerate(raw):
            if v is None:
                values.append(None)
                n_none += 1
                continue
            problem = _check_value(v)
            if problem is None:
                values.append(float(v))
                continue
            err = RewardError(f"reward function {name!r} returned {problem} {v!r} for sample {i}")
            if self.on_error == "raise":
                raise err
            logger.warning("%s; scoring it None", err)
            values.append(None)
            failed += 1
        return values, failed, n_none

    def _fail_all(self, err: RewardError, n: int):
        if self.on_error == "raise":
            raise err
        logger.warning("%s; scoring all %d samples of this call None", err, n)
        return [None] * n, n, 0

    def _call(self, fn, name, prompts, completions, columns):
        kwargs = dict(columns)
        if _is_async(fn):
            return _run_coroutine(fn(list(prompts), list(completions), **kwargs), name, self.timeout_s)
        if self.timeout_s is None:
            raw = fn(list(prompts), list(completions), **kwargs)
        else:
            raw = _run_in_thread(functools.partial(fn, list(prompts), list(completions), **kwargs), name, self.timeout_s)
        if inspect.isawaitable(raw):  # a sync wrapper (e.g. a plain decorator) around an async function
            return _run_coroutine(raw, name, self.timeout_s)
        return raw


def _as_spec(item, i: int) -> RewardFunctionSpec:
    if isinstance(item, RewardFunctionSpec):
        return item
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(f"reward function #{i}: expected a (function, weight) pair, got a tuple of {len(item)}")
        return RewardFunctionSpec(fn=item[0], weight=item[1])
    if callable(item) or isinstance(item, str):
        return RewardFunctionSpec(fn=item)
    raise ValueError(f"reward function #{i}: expected a callable, a spec string, a (fn, weight) pair or a "
                     f"RewardFunctionSpec, got {type(item).__name__}")


def _default_name(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return name.strip("<>") or "reward"  # "<lambda>" -> "lambda": angle brackets make poor metric names


def _unique(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name}_{k}" in taken:
        k += 1
    return f"{name}_{k}"


def _is_async(fn) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _as_list(raw, name: str, n: int) -> list:
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().reshape(-1).tolist() if raw.dim() <= 1 else raw
    elif type(raw).__module__ == "numpy" and hasattr(raw, "tolist") and getattr(raw, "ndim", 2) <= 1:
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise RewardError(f"reward function {name!r} returned a {type(raw).__name__}; expected a list of {n} scores")
    if len(raw) != n:
        raise RewardError(f"reward function {name!r} returned {len(raw)} scores for {n} samples")
    return list(raw)


def _check_value(v) -> str | None:
    """None if `v` is a usable score, else a short description of what is wrong with it."""
    if isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")):
        return None
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if not isinstance(v, numbers.Real):  # numpy scalars are registered as numbers.Real
        return f"non-number ({type(v).__name__})"
    if not math.isfinite(float(v)):
        return "non-finite value"
    return None


def _run_in_thread(call: Callable[[], Any], name: str, timeout_s: float):
    # A daemon thread rather than a ThreadPoolExecutor: executor threads are joined at interpreter exit, so a
    # function that never returns would hang the program on shutdown. The Future only carries the result.
    future: concurrent.futures.Future = concurrent.futures.Future()

    def target():
        try:
            future.set_result(call())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            future.set_exception(e)

    threading.Thread(target=target, name=f"reward-{name}", daemon=True).start()
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise RewardError(
            f"reward function {name!r} timed out after {timeout_s:g}s (the thread keeps running in the "
            f"background; use the sandbox for code that may hang)"
        ) from None


def _run_coroutine(coro, name: str, timeout_s: float | None):
    async def runner():
        if timeout_s is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, timeout_s)
        except asyncio.TimeoutError:
            raise RewardError(f"reward function {name!r} timed out after {timeout_s:g}s") from None

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(runner())
    # Called from inside a running event loop (a notebook, an async trainer): asyncio.run would refuse, so run
    # the coroutine on a fresh loop in a helper thread and wait for it.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, runner()).result()
