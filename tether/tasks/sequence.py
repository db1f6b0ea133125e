"""String manipulation: reverse (or sort) a short string, e.g. "reverse:abc4=" -> "4cba".

Strings have `min_len`..`max_len` characters (length uniform, then characters uniform with repeats)
from `alphabet`, lowercase letters and digits by default. `op` is "reverse" or "sort" (sorting is by
character code, so digits come before letters: "sort:c4ab=" -> "4abc").

Held-out split: by a stable hash of the prompt, so eval strings never occur in training data.

Rewards (the completion is stripped first):

* exact (default): 1.0 if the completion equals the answer, else 0.0;
* `partial_credit=True`: share of positions (from the left) where completion and answer agree, over the
  longer of the two lengths; "4cab" for "4cba" -> 0.5, "4cb" -> 0.75. Only the exact answer earns 1.0.

Imperfect demonstrations: in a fraction `demo_error_rate` (p) of the demonstrations of strings with at
least `flaw_min_len` characters, the last two characters of the answer are swapped ("reverse:abcde4="
-> "4edcab" instead of "4edcba"); everything else is demonstrated correctly. Problems where the swap
changes the answer form the "swap" group (about half of them with the defaults), the rest "no_swap".
As with arithmetic, p > 0.5 makes the flawed answer the most likely one to imitate on the swap group
while the correct one keeps probability about 1 - p, so RL has something to find and reinforce.

Measured with the defaults (reverse, lengths 3-6, p 0.65), the default tiny model and SFT budget of
`tether.train.sft` (2,000 steps of 64; seed 0) and 500 held-out strings: greedy accuracy 68% (swap group
29%, no_swap 100%); sample accuracy at temperature 1 on the swap group 37%. Sequences are about twice as
long as arithmetic ones, so SFT costs about twice as much per step (157 s of CPU time on one thread).
"""

from __future__ import annotations

import random
import string

from tether.tasks.base import Task, _check_probability, positional_match

KNOWN_OPS = ("reverse", "sort")


class SequenceTask(Task):
    name = "sequence"

    def __init__(
        self,
        op: str = "reverse",
        min_len: int = 3,
        max_len: int = 6,
        alphabet: str = string.ascii_lowercase + string.digits,
        partial_credit: bool = False,
        demo_error_rate: float = 0.65,
        flaw_min_len: int = 5,
        eval_fraction: float = 0.1,
    ) -> None:
        if op not in KNOWN_OPS:
            raise ValueError(f"op must be one of {KNOWN_OPS}, got {op!r}")
        if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len <= 64):
            raise ValueError(f"need 1 <= min_len <= max_len <= 64, got min_len={min_len!r}, max_len={max_len!r}")
        # "=" ends the prompt and ":" separates the op, whitespace would be eaten by strip(): keep them out.
        if not alphabet or any(c in "=:" or c.isspace() or not c.isprintable() for c in alphabet):
            raise ValueError(f"alphabet must be non-empty printable characters without '=', ':' or spaces, got {alphabet!r}")
        if not isinstance(flaw_min_len, int) or flaw_min_len < 2:
            raise ValueError(f"flaw_min_len must be an int >= 2, got {flaw_min_len!r}")
        self.op = op
        self.min_len = min_len
        self.max_len = max_len
        self.alphabet = "".join(dict.fromkeys(alphabet))
        self.partial_credit = bool(partial_credit)
        self.demo_error_rate = _check_probability("demo_error_rate", demo_error_rate)
        self.flaw_min_len = flaw_min_len
        self.eval_fraction = _check_probability("eval_fraction", eval_fraction)

    # A problem is the input string.
    def _draw(self, rng: random.Random) -> str:
        length = rng.randint(self.min_len, self.max_len)
        return "".join(rng.choice(self.alphabet) for _ in range(length))

    def _key(self, problem: str) -> str:
        return self._prompt(problem)

    def _prompt(self, problem: str) -> str:
        return f"{self.op}:{problem}="

    def _answer(self, problem: str) -> str:
        return problem[::-1] if self.op == "reverse" else "".join(sorted(problem))

    def flawed_answer(self, problem: str) -> str:
        """The answer with its last two characters swapped (unchanged for strings below flaw_min_len)."""
        answer = self._answer(problem)
        if len(answer) < self.flaw_min_len:
            return answer
        return answer[:-2] + answer[-1] + answer[-2]

    def _group(self, problem: str) -> str:
        return "swap" if self.flawed_answer(problem) != self._answer(problem) else "no_swap"

    def _demonstrate(self, problem: str, rng: random.Random) -> tuple[str, bool]:
        slip = rng.random() < self.demo_error_rate  # drawn for every row: see ArithmeticTask
        if slip and self._group(problem) == "swap":
            return self.flawed_answer(problem), True
        return self._answer(problem), False

    def score(self, completion: str, answer: str) -> float:
        if completion == answer:
            return 1.0
        if not self.partial_credit:
            return 0.0
        return positional_match(completion, answer)
