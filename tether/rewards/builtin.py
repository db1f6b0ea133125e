"""Built-in reward functions. Each is a plain reward function (or a factory returning one), usable in a config
as ``builtin:<name>`` (see `BUILTIN_REWARDS`).

Math answers are checked with math-verify. Its own timeouts use `signal.alarm`, which only works in the main
thread, and a timeout signal cannot interrupt sympy anyway when it is stuck inside one C call (e.g. expanding
``9^{9^{9^{9}}}`` never returns and holds the GIL, freezing every thread). So the checks run in one long-lived
helper process with math-verify's timeouts off; a check that takes longer than `timeout_s` gets the helper
killed (and restarted on the next call) and scores 0.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import re
import subprocess
import sys
import threading
from typing import Any, Callable

from tether.rewards.sandbox import code_tests_reward

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Math answers

# The helper process: reads {"gold": ..., "pred": ...} lines, answers {"ok": true | false | null} lines
# (null: the reference answer itself could not be parsed). It prints "ready" once math-verify is imported.
_MATH_WORKER = r"""
import json, logging, sys
logging.disable(logging.WARNING)  # math-verify warns that its timeouts are off: that is on purpose here
from math_verify import parse, verify

def parse_gold(gold):
    # A bare reference like "x+1" is not found by the extractors unless it is marked as math.
    if "$" not in gold and "\\boxed" not in gold:
        parsed = parse("$" + gold + "$", parsing_timeout=None)
        if parsed:
            return parsed
    return parse(gold, parsing_timeout=None)

print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    gold = parse_gold(req["gold"])
    if not gold:
        ok = None
    else:
        pred = parse(req["pred"], parsing_timeout=None)
        ok = bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
    print(json.dumps({"ok": ok}), flush=True)
"""


class MathVerifier:
    """Checks `pred` against `gold` with math-verify in a helper process that is killed when a check runs
    past `timeout_s`. Thread-safe (one check at a time). Started lazily on first use."""

    def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 120.0):
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        atexit.register(self.close)

    def check(self, gold: str, pred: str) -> bool | None:
        """True/False for (in)equivalent answers, None if `gold` cannot be parsed. A check that times out
        counts as False (and is logged)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({"gold": gold, "pred": pred}) + "\n")
            self._proc.stdin.flush()
            try:
                line = self._lines.get(timeout=self.timeout_s)
            except queue.Empty:
                logger.warning("math check timed out after %gs (answer %.80r); scoring it 0", self.timeout_s, pred)
                self._kill()
                return False
            if line is None:
                self._kill()
                raise RuntimeError("the math-verify helper process exited unexpectedly (see stderr above)")
            return json.loads(line)["ok"]

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _start(self) -> None:
        self._lines = queue.Queue()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _MATH_WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        # A reader thread turns the pipe into a queue, so waiting for an answer can time out.
        threading.Thread(target=self._read, args=(self._proc.stdout, self._lines), daemon=True).start()
        try:
            first = self._lines.get(timeout=self.startup_timeout_s)
        except queue.Empty:
            first = None
        if first != "ready":
            self._kill()
            raise RuntimeError(f"the math-verify helper process did not start (got {first!r}); is math-verify installed?")

    @staticmethod
    def _read(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)  # EOF: the process is gone

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self._proc = None


_default_verifier: MathVerifier | None = None
_default_verifier_lock = threading.Lock()


def _verifier() -> MathVerifier:
    global _default_verifier
    with _default_verifier_lock:
        if _default_verifier is None:
            _default_verifier = MathVerifier()
        return _default_verifier


def make_math_answer_reward(timeout_s: float = 5.0) -> Callable[..., list[float | None]]:
    """A `math_answer_reward` with its own helper process and per-sample time limit."""
    verifier = MathVerifier(timeout_s=timeout_s)

    def math_answer_reward(prompts: list[str], completions: list[str], answer: list[Any], **kwargs) -> list[float | None]:
        return _score_math(verifier, completions, answer)

    return math_answer_reward


def math_answer_reward(prompts: list[str], completions: list[str], answer: list[Any], **kwargs) -> list[float | None]:
    """1.0 if the completion's final answer equals the row's `answer`, else 0.0; None if the reference answer
    cannot be parsed.

    math-verify extracts the answer from the completion (a ``\\boxed{}`` answer first, else the last
    expression it finds) and compares mathematically, so ``1/2``, ``0.5`` and ``\\frac{1}{2}`` all match.
    Each check is limited to 5 s (see the module docstring); use `make_math_answer_reward` for another limit."""
    return _score_math(_verifier(), completions, answer)



def _score_math(verifier: MathVerifier, completions: list[str], answer: list[Any]) -> list[float | None]:
    if len(answer) != len(completions):
        raise ValueError(f"math_answer: got {len(answer)} answers for {len(completions)} completions")
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer):
        if gold is None or str(gold).strip() == "":
            scores.append(None)
            continue
        ok = verifier.check(str(gold), completion)
        scores.append(None if ok is None else float(ok))
    return scores


# ----------------------------------------------------------------------------------------------------------
# Format, length, EOS


def format_reward(pattern: str, reward: float = 1.0, *, mode: str = "fullmatch", flags: int = re.DOTALL) -> Callable[..., list[float]]:
    """A reward function giving `reward` to completions that match the regex `pattern`, else 0.0.

    mode="fullmatch" (default) requires the whole completion, stripped of surrounding whitespace, to match
    (what a format reward usually means: "<think>...</think> then an answer, nothing else"); mode="search"
    accepts a match anywhere. `re.DOTALL` is on by default so `.` spans lines. Logs as "format"."""
    if mode not in ("fullmatch", "search"):
        raise ValueError(f"format_reward mode must be 'fullmatch' or 'search', got {mode!r}")
    try:
        regex = re.compile(pattern, flags)
    except re.error as e:
        raise ValueError(f"format_reward: invalid regular expression {pattern!r}: {e}") from e
    reward = float(reward)

    def format(prompts: list[str], completions: list[str], **kwargs) -> list[float]:  # noqa: A001 - log name
        if mode == "fullmatch":
            return [reward if regex.fullmatch(c.strip()) else 0.0 for c in completions]
        return [reward if regex.search(c) else 0.0 for c in completions]

    return format


def length_penalty(target_length: int, coef: float) -> Callable[..., list[float]]:
    """A reward function scoring ``-coef * max(0, length - target_length)``.

    Length is in tokens when the trainer passes `completion_lengths`, else in characters of the completion.
    Logs as "length_penalty"."""
    if target_length < 0:
        raise ValueError(f"length_penalty: target_length must be >= 0, got {target_length}")
    if coef < 0:
        raise ValueError(f"length_penalty: coef must be >= 0 (it is subtracted), got {coef}")

    def length_penalty(prompts: list[str], completions: list[str], completion_lengths: list[int] | None = None, **kwargs) -> list[float]:
        lengths = completion_lengths if completion_lengths is not None else [len(c) for c in completions]
        return [-coef * max(0, int(n) - target_length) for n in lengths]

    return length_penalty


def missing_eos_penalty(penalty: float = -1.0) -> Callable[..., list[float]]:
    """A reward function scoring `penalty` for completions that were cut off at the length limit without an
    EOS (the trainer's reserved `truncated` column), else 0.0. Logs as "missing_eos_penalty"."""
    penalty = float(penalty)

    def missing_eos_penalty(prompts: list[str], completions: list[str], truncated: list[bool] | None = None, **kwargs) -> list[float]:
        if truncated is None:
            raise ValueError("missing_eos_penalty needs the 'truncated' column (the trainer passes it; "
                             "pass truncated=[...] when calling it yourself)")
        return [penalty if t else 0.0 for t in truncated]

    return missing_eos_penalty


# name -> reward function or factory. Factories (listed in BUILTIN_FACTORIES) are called with the config's
# arguments by `load_reward_function`.
BUILTIN_REWARDS: dict[str, Callable[..., Any]] = {
    "math_answer": math_answer_reward,
    "code_tests": code_tests_reward,
    "format": format_reward,
    "length_penalty": length_penalty,
    "missing_eos_penalty": missing_eos_penalty,
}
BUILTIN_FACTORIES = frozenset({"format", "length_penalty", "missing_eos_penalty"})
