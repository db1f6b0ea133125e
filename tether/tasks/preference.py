"""A synthetic, offline preference task: "answer an arithmetic question with a plain number".

Prompts are two-digit addition questions like ``"37+48="``. The chosen completion is the bare correct answer (``"85"``);
the rejected completion is the same question answered badly, one of:

  * answer + trailing chatter      ``"85 ok"``, ``"85?!"``
  * chatter + answer               ``"x=85"``, ``"ans 85"``
  * no number at all               ``"abc!"``, ``"?"``
  * digits mixed with other chars  ``"8a5"``, ``"8 k5"``
  * a runaway number               ``"85555555"`` (the answer followed by repeated digits: no stop)

Why this preference: it is a surface property (every character after "=" is a digit, and the number is short),
so a char-level transformer reward model of ~100k parameters learns it to well above 90% held-out accuracy
in a few seconds on a CPU, yet it is meaningful for RL on these prompts: a policy that starts out emitting
junk or running on past the answer is pushed by PPO toward terse numeric answers that stop, the format
an arithmetic task needs. Correctness itself is deliberately *not* part of the preference (a tiny reward
model cannot learn addition in seconds; use `builtin:math_answer` for that). Everything is printable ASCII,
covered by the tiny char tokenizer.

Measured (default tiny Llama from `tether.tasks.tiny_model`, ~130k parameters; 1000 pairs, 2 epochs, lr 1e-3,
batch 32; one torch thread): held-out accuracy ~0.5 before training and 1.000 after on 200 pairs for
seeds 0-4, in 1-2 s of training. 2000 pairs, 1 epoch at lr 1e-4 still reaches 0.995. The trained model
scores an empty completion and free text below a bare number, so PPO cannot win by stopping at once.
Tiny models train far slower with more than one torch thread on a busy 2-core machine (2.3 s -> 30 s).
"""

from __future__ import annotations

import random
import string

_JUNK = string.ascii_letters + string.punctuation + " "
# Two-digit operands, the same questions as `tether.tasks.arithmetic` (digits=2, "+"), so a policy trained
# there sees familiar prompts in the RL stage.
_MIN_OPERAND, _MAX_OPERAND = 10, 99
REJECTION_KINDS = ("suffix", "prefix", "no_number", "mixed", "runaway")


def _question(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(_MIN_OPERAND, _MAX_OPERAND), rng.randint(_MIN_OPERAND, _MAX_OPERAND)
    return f"{a}+{b}=", a + b


def _junk(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(_JUNK) for _ in range(rng.randint(lo, hi)))


def _rejected(rng: random.Random, answer: str, kind: str) -> str:
    if kind == "suffix":
        return answer + _junk(rng, 1, 5)
    if kind == "prefix":
        return _junk(rng, 1, 5) + answer
    if kind == "no_number":
        return _junk(rng, 1, 6)
    if kind == "mixed":
        # Digits of the answer with at least one non-digit inserted somewhere.
        chars = list(answer)
        for _ in range(rng.randint(1, 2)):
            chars.insert(rng.randint(0, len(chars)), rng.choice(_JUNK))
        return "".join(chars)
    if kind == "runaway":
        return answer + rng.choice(string.digits) * rng.randint(4, 8)
    raise ValueError(f"unknown rejection kind {kind!r}; known: {REJECTION_KINDS}")


def make_preference_data(n: int, seed: int) -> list[dict]:
    """`n` rows {prompt, chosen, rejected}; deterministic given `seed`. Rejection kinds cycle evenly."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, total = _question(rng)
        answer = str(total)
        rows.append({"prompt": prompt, "chosen": answer, "rejected": _rejected(rng, answer, REJECTION_KINDS[i % len(REJECTION_KINDS)])})
    return rows


def preference_prompts(n: int, seed: int) -> list[dict]:
    """`n` rows {prompt} of the same kind of question, for the RL stage (PPO against the trained reward model)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    return [{"prompt": _question(rng)[0]} for _ in range(n)]
