"""What every built-in task provides, plus the held-out split shared by all of them.

A task is a small, fully synthetic problem family. It can

* draw problems (`make_rows`): rows `{"prompt": str, "answer": str, "group": str, ...}` for RL and
  evaluation. The "eval" split is held out from "train" *by construction*: every problem is assigned to
  one split by a stable hash of its canonical key, so no eval problem can ever appear in training data,
  whatever seeds or sizes are asked for;
* write deliberately imperfect demonstrations for SFT (`demonstrations`), so that imitation alone stops
  short and RL has a real gap to close;
* score completions (`reward`, `is_correct`). `reward` has the plain reward-function shape
  `reward(prompts, completions, **columns) -> list[float]` and reads the `answer` column.

Subclasses implement `_draw`, `_key`, `_answer`, `_prompt`, `_demonstrate` and `score`; the sampling,
splitting and batching logic lives here once.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Sequence

SPLITS = ("train", "eval")


def _check_probability(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class Task:
    """Base class for synthetic tasks. See the module docstring for the contract."""

    name: str = "task"
    # Share of all problems that are held out for evaluation.
    eval_fraction: float = 0.1
    # The SFT row's field for what `_demonstrate` writes: a completion, or a multi-turn episode.
    demonstration_key: str = "completion"

    # ---- what a subclass implements -------------------------------------------------------------
    def _draw(self, rng: random.Random) -> Any:
        """Draw one problem (any hashable description of it) uniformly from the whole problem space."""
        raise NotImplementedError

    def _key(self, problem: Any) -> str:
        """Canonical text of a problem: problems with the same key always land in the same split."""
        raise NotImplementedError

    def _prompt(self, problem: Any) -> str:
        raise NotImplementedError

    def _answer(self, problem: Any) -> str:
        raise NotImplementedError

    def _group(self, problem: Any) -> str:
        """A coarse category reported separately by evaluation (e.g. carry vs no carry)."""
        return "all"

    def _demonstrate(self, problem: Any, rng: random.Random) -> tuple[str, bool]:
        """Return (demonstrated completion, whether it is flawed)."""
        raise NotImplementedError

    def score(self, completion: str, answer: str) -> float:
        """Reward of one stripped completion against the reference answer."""
        raise NotImplementedError

    # ---- shared logic -----------------------------------------------------------------------------
    def split_of(self, problem: Any) -> str:
        """'eval' or 'train'. A stable hash (not Python's salted `hash`) so splits never change."""
        digest = hashlib.sha256(f"{self.name}:{self._key(problem)}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        return "eval" if u < self.eval_fraction else "train"

    def _row(self, problem: Any) -> dict:
        return {"prompt": self._prompt(problem), "answer": self._answer(problem), "group": self._group(problem)}

    def _sample_problems(self, split: str, n: int, seed: int, *, distinct: bool) -> list[Any]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        # Seeding with a string makes the stream depend on the task, the split and the seed only.
        rng = random.Random(f"{self.name}|{split}|{seed}")
        problems: list[Any] = []
        seen: set[str] = set()
        # Rejection sampling: draw from the whole space, keep what falls in this split. The cap only
        # matters when more distinct problems are asked for than the split holds.
        max_draws = 200 * n + 10_000
        for _ in range(max_draws):
            if len(problems) == n:
                break
            problem = self._draw(rng)
            if self.split_of(problem) != split:
                continue
            if distinct:
                prompt = self._prompt(problem)
                if prompt in seen:
                    continue
                seen.add(prompt)
            problems.append(problem)
        if len(problems) < n:
            raise ValueError(
                f"{self.name}: asked for {n} distinct {split!r} problems but the split seems to hold only "
                f"about {len(problems)}; ask for fewer or make the task larger"
            )
        return problems

    def make_rows(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """`n` problems of `split` as rows {"prompt", "answer", "group"}; deterministic in (split, n, seed).

        Eval rows are distinct problems (an accuracy over repeats would be noisier than it looks); train
        rows are independent draws and may repeat, so any number can be asked for.
        """
        return [self._row(p) for p in self._sample_problems(split, n, seed, distinct=(split == "eval"))]

    def demonstrations(self, n: int, seed: int = 0) -> list[dict]:
        """`n` SFT rows {"prompt", "completion", "answer", "group", "flawed"} drawn from the train split.

        `completion` is the demonstrated answer, which is deliberately wrong in a documented share of rows
        (`flawed` says which); `answer` is the correct one.
        """
        rng = random.Random(f"{self.name}|demos|{seed}")
        rows = []
        for problem in self._sample_problems("train", n, seed + 1_000_003, distinct=False):
            completion, flawed = self._demonstrate(problem, rng)
            rows.append({**self._row(problem), self.demonstration_key: completion, "flawed": flawed})
        return rows

    def reward(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        """Plain reward function: one float per completion, scored against `columns["answer"]`."""
        if "answer" not in columns:
            raise KeyError(f"{self.name}.reward needs an 'answer' column; got columns {sorted(columns)}")
        answers = columns["answer"]
        if not (len(prompts) == len(completions) == len(answers)):
            raise ValueError(
                f"{self.name}.reward: lengths differ: {len(prompts)} prompts, {len(completions)} completions, "
                f"{len(answers)} answers"
            )
        return [self.score(c.strip(), str(a)) for c, a in zip(completions, answers)]

    def is_correct(self, completion: str, row: dict) -> bool:
        """Exact match of the stripped completion with the row's answer (independent of partial credit)."""
        return completion.strip() == str(row["answer"])

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"


def positional_match(completion: str, answer: str, *, from_right: bool = False) -> float:
    """Share of positions where the two strings agree, over the longer length (1.0 only on equality)."""
    if from_right:
        completion, answer = completion[::-1], answer[::-1]
    longest = max(len(completion), len(answer))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(completion, answer)) / longest
