"""Arithmetic asked in words, for instruct models: "What is 59 + 63? Reply with just the number." -> "122".

Correctness is that of the completion's final answer: the number in its last `\boxed{...}`, else its last
number, checked with math-verify (as GSM8K-style evaluations read a final answer). A format term rewards
answering in the asked form, a bare number or `\boxed{N}`, which a pretrained instruct model rarely does at
first (SmolLM2-135M-Instruct answered "59 + 63 = 122." and the like). Reward: 1 for a right answer in the
asked form, 1 - format_weight for a right answer in another form, format_weight for a wrong answer in the
asked form, 0 otherwise. Held-out problems are split off by hash, as in every task.

format_weight is 0 by default, a measured choice: with SmolLM2-135M-Instruct and GRPO, a format term of 0.2
or even 0.05 taught the policy within 15 steps to answer every question with a bare number, mostly wrong
(the reward stuck at the format term, KL to the reference 1.2-2.5 nats per token; scored on bare answers
only, held-out accuracy stayed 0% after 60 steps): group-normalised advantages rank "bare and wrong" above
"worked and wrong" whatever the weight. On correctness alone the same run went from 19% to 48% (README).
"""

from __future__ import annotations

import random
import re

from tether.tasks.base import Task

_BOXED = re.compile(r"^\\boxed\{\s*(-?\d+)\s*\}\.?$")
_BARE = re.compile(r"^(-?\d+)\.?$")
_LAST_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
_NUMBER = re.compile(r"-?\d+")


def extract_answer(completion: str) -> str | None:
    """The number of a completion in the asked format (bare, or \\boxed{N}, a final period allowed), else None."""
    text = completion.strip()
    m = _BARE.match(text) or _BOXED.match(text)
    return m.group(1) if m else None


def final_answer(completion: str) -> str | None:
    """The completion's final answer: the number in its last \\boxed{}, else its last number, else None."""
    boxed = _LAST_BOXED.findall(completion)
    if boxed:
        return boxed[-1]
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def _verified(answer_text: str, reference: str) -> bool:
    import logging

    from math_verify import parse, verify

    # No signal-based timeouts: scoring may run outside the main thread (a timed-out reward call); the
    # inputs are short numbers, so nothing can hang. math-verify warns about that on every call.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(reference, parsing_timeout=None)
    pred = parse(answer_text, parsing_timeout=None)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


class ChatArithmeticTask(Task):
    """Two-number sums and differences in words, answered as a bare number or \\boxed{N}."""

    name = "chat_arithmetic"

    def __init__(self, digits: int = 2, ops: str = "+-", format_weight: float = 0.0, eval_fraction: float = 0.1):
        if digits < 1 or digits > 6:
            raise ValueError(f"digits must be 1..6, got {digits}")
        if not ops or set(ops) - set("+-"):
            raise ValueError(f"ops must be made of '+' and '-', got {ops!r}")
        self.digits, self.ops, self.format_weight, self.eval_fraction = digits, ops, format_weight, eval_fraction
        self._lo, self._hi = (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        a, b, op = rng.randint(self._lo, self._hi), rng.randint(self._lo, self._hi), rng.choice(self.ops)
        return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)

    def _key(self, problem) -> str:
        a, op, b = problem
        return f"{min(a, b)}{op}{max(a, b)}" if op == "+" else f"{a}{op}{b}"

    def _prompt(self, problem) -> str:
        a, op, b = problem
        return f"What is {a} {op} {b}? Reply with just the number."

    def _answer(self, problem) -> str:
        a, op, b = problem
        return str(a + b if op == "+" else a - b)

    def _group(self, problem) -> str:
        return {"+": "sum", "-": "difference"}[problem[1]]

    def _demonstrate(self, problem, rng: random.Random) -> tuple[str, bool]:
        return self._answer(problem), False

    def score(self, completion: str, answer: str) -> float:
        got = final_answer(completion)
        right = got is not None and _verified(got, answer)
        in_form = extract_answer(completion) is not None
        return (1.0 if in_form else 1.0 - self.format_weight) if right else (self.format_weight if in_form else 0.0)

    def is_correct(self, completion: str, row: dict) -> bool:
        """The final answer is right, in whatever form (`in_asked_form` tells the form apart)."""
        got = final_answer(completion)
        return got is not None and _verified(got, str(row["answer"]))

    @staticmethod
    def in_asked_form(completion: str) -> bool:
        return extract_answer(completion) is not None
