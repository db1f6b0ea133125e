"""Integer arithmetic: prompts like "37+48=", answers like "85".

Operands have exactly `digits` digits (10..99 for the default 2; 0..9 for 1). `ops` is a string of
operators drawn uniformly per problem: "+" and/or "-" (for "-" the larger operand comes first, so
answers are never negative).

Call a problem a *carry* problem when dropping its carries changes the answer (for "-": borrows); with
uniform operands 45% of 2-digit sums are. `carry_share` (default 0.6) sets the share of carry problems
in every split instead, each group uniform inside; `None` keeps uniform operands. Two reasons: the
tiny model learns addition sooner when carries are common, and the gap RL can close is the carry share.

Held-out split: a problem goes to "eval" or "train" by a stable hash of its canonical key; for "+" the
key ignores operand order, so 37+48 and 48+37 always share a split (knowing one is knowing the other).
`eval_fraction` 0.2 holds out ~1,660 of the 8,100 2-digit problems, enough for 500 distinct eval rows
that keep the carry share.

Rewards (the completion is stripped first):

* exact (default): 1.0 if the completion equals the answer, else 0.0;
* `partial_credit=True`: 0.8 * (share of digits that match, aligned from the right, over the longer of
  the two lengths) + 0.2 * (1 if the lengths agree). So "85" for 85 -> 1.0, "75" -> 0.6, "5" -> 0.4,
  "185" -> 0.53; anything that is not a plain run of digits -> 0.0. Only the exact answer earns 1.0.

Imperfect demonstrations -- the gap RL is meant to close. In a fraction `demo_error_rate` (p, default
0.65) of the demonstrations of carry problems the carries are dropped, the classic schoolchild slip:
each column is written modulo 10 and the leftmost column in full, so 37+48 -> "75", 57+68 -> "115",
52-17 -> "45". Every other demonstration is correct. With p > 0.5 the most likely demonstrated answer
to a carry problem is the wrong one, so a model that imitates well answers carry problems wrongly under
greedy decoding, while sampling at temperature 1 still gives the right answer about 1 - p of the time:
an error a reward signal can find and fix, and more imitation does not (it only sharpens the majority).

Measured with the defaults (2-digit "+", carry_share 0.6, p 0.65) and the default pipeline of
`tether.train.sft` (DEFAULT_MODEL: Llama, hidden 128, 2 layers, 16 heads, 0.5M parameters; DEFAULT_SFT:
2,000 steps of 64 over 50,000 demonstrations), 500 held-out problems, seeds 0-3:

* SFT greedy accuracy 41-47% (carry problems 3-13%, no-carry problems 99-100%);
* sample accuracy at temperature 1 on carry problems 32-35%;
* 2 idle CPU threads: SFT 51 s; build + demonstrations + SFT + eval 59 s in all;
* fixability check (a scratch script, not shipped): REINFORCE with a per-prompt mean baseline,
  16 prompts x 4 samples per step, Adam lr 1e-4, took held-out greedy accuracy from 41% to 97% in
  25 steps.

Other settings tried: p = 0.6 leaves 8-19% greedy accuracy on carry problems, varying more by seed
(less headroom for RL); p = 0.7 delays learning on some seeds and drops sample accuracy to 22-30%;
uniform operands (45% carry) cap the RL gain near 45 points.
"""

from __future__ import annotations

import random

from tether.tasks.base import Task, _check_probability, positional_match

KNOWN_OPS = "+-"


def _digits(x: int) -> list[int]:
    """Least significant digit first."""
    return [int(c) for c in reversed(str(x))]


def add_without_carry(a: int, b: int) -> str:
    """Column addition that forgets every carry: columns mod 10, the leftmost column written in full."""
    da, db = _digits(a), _digits(b)
    width = max(len(da), len(db))
    da += [0] * (width - len(da))
    db += [0] * (width - len(db))
    cols = [(x + y) % 10 for x, y in zip(da[:-1], db[:-1])]
    top = str(da[-1] + db[-1])
    return (top + "".join(str(c) for c in reversed(cols))).lstrip("0") or "0"


def subtract_without_borrow(a: int, b: int) -> str:
    """Column subtraction (a >= b) that forgets every borrow: a short column just takes 10 extra."""
    da, db = _digits(a), _digits(b)
    db += [0] * (len(da) - len(db))
    cols = [(x - y) % 10 for x, y in zip(da, db)]
    return "".join(str(c) for c in reversed(cols)).lstrip("0") or "0"


class ArithmeticTask(Task):
    name = "arithmetic"

    def __init__(
        self,
        digits: int = 2,
        ops: str = "+",
        partial_credit: bool = False,
        demo_error_rate: float = 0.65,
        eval_fraction: float = 0.2,
        carry_share: float | None = 0.6,
    ) -> None:
        if not isinstance(digits, int) or not 1 <= digits <= 9:
            raise ValueError(f"digits must be an int from 1 to 9, got {digits!r}")
        if not isinstance(ops, str) or not ops or any(op not in KNOWN_OPS for op in ops):
            raise ValueError(f"ops must be a non-empty string of operators from {KNOWN_OPS!r}, got {ops!r}")
        self.digits = digits
        self.ops = "".join(dict.fromkeys(ops))  # de-duplicated, order kept
        self.partial_credit = bool(partial_credit)
        self.demo_error_rate = _check_probability("demo_error_rate", demo_error_rate)
        self.eval_fraction = _check_probability("eval_fraction", eval_fraction)
        # One-digit problems never carry (the single column is written in full), so there is no mix to set.
        if carry_share is not None and digits > 1:
            carry_share = _check_probability("carry_share", carry_share)
        self.carry_share = carry_share if digits > 1 else None
        self._lo = 10 ** (digits - 1) if digits > 1 else 0
        self._hi = 10**digits - 1

    # A problem is the tuple (a, op, b).
    def _draw_uniform(self, rng: random.Random) -> tuple[int, str, int]:
        a, b = rng.randint(self._lo, self._hi), rng.randint(self._lo, self._hi)
        op = rng.choice(self.ops)
        if op == "-" and a < b:
            a, b = b, a
        return a, op, b

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        if self.carry_share is None:
            return self._draw_uniform(rng)
        # Pick the group first, then a uniform problem within it (rejection; either group is ~half).
        want = "carry" if rng.random() < self.carry_share else "no_carry"
        while True:
            problem = self._draw_uniform(rng)
            if self._group(problem) == want:
                return problem

    def _key(self, problem: tuple[int, str, int]) -> str:
        a, op, b = problem
        if op == "+":
            a, b = min(a, b), max(a, b)
        return f"{a}{op}{b}"

    def _prompt(self, problem: tuple[int, str, int]) -> str:
        a, op, b = problem
        return f"{a}{op}{b}="

    def _answer(self, problem: tuple[int, str, int]) -> str:
        a, op, b = problem
        return str(a + b if op == "+" else a - b)

    def flawed_answer(self, problem: tuple[int, str, int]) -> str:
        """The answer with every carry (or borrow) dropped."""
        a, op, b = problem
        return add_without_carry(a, b) if op == "+" else subtract_without_borrow(a, b)

    def _group(self, problem: tuple[int, str, int]) -> str:
        return "carry" if self.flawed_answer(problem) != self._answer(problem) else "no_carry"

    def _demonstrate(self, problem: tuple[int, str, int], rng: random.Random) -> tuple[str, bool]:
        # Draw for every problem, not only carry ones, so the random stream (and hence which rows are
        # flawed) does not depend on how the problems fall.
        slip = rng.random() < self.demo_error_rate
        if slip and self._group(problem) == "carry":
            return self.flawed_answer(problem), True
        return self._answer(problem), False

    def score(self, completion: str, answer: str) -> float:
        if completion == answer:
            return 1.0
        if not self.partial_credit or not (completion.isascii() and completion.isdigit()):
            return 0.0
        digits_right = positional_match(completion, answer, from_right=True)
        return 0.8 * digits_right + 0.2 * (len(completion) == len(answer))
