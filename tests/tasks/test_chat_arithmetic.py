"""chat_arithmetic: questions in words for instruct models, answers as a bare number or \\boxed{N}."""

import pytest

from tether.tasks import get_task
from tether.tasks.chat_arithmetic import extract_answer


def test_answers_in_the_asked_form_only():
    assert [extract_answer(c) for c in ("122", " 122.", "\\boxed{122}", "\\boxed{ -5 }", "-5")] == [
        "122", "122", "122", "-5", "-5"]
    assert [extract_answer(c) for c in ("59 + 63 = 122.", "The answer is 122", "122 apples", "")] == [None] * 4


def test_score_and_correctness():
    """Right in the asked form 1; right in another form 1 - w; wrong in the asked form w; else 0."""
    t = get_task("chat_arithmetic", format_weight=0.25)
    completions = ["122", "\\boxed{122}", "121", "59 + 63 = 122.", "so \\boxed{122} not 5", "59 + 63 = 121",
                   "one hundred"]
    assert t.reward(["q"] * 7, completions, answer=["122"] * 7) == [1.0, 1.0, 0.25, 0.75, 0.75, 0.0, 0.0]
    assert [t.is_correct(c, {"answer": "122"}) for c in completions] == [True, True, False, True, True, False, False]
    assert [t.in_asked_form(c) for c in completions[:4]] == [True, True, True, False]


def test_rows_and_held_out_split():
    t = get_task("chat_arithmetic")
    train, held_out = t.make_rows("train", 300, seed=0), t.make_rows("eval", 200, seed=0)
    assert held_out[0]["prompt"].startswith("What is ") and held_out[0]["prompt"].endswith("Reply with just the number.")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for r in held_out:
        a, op, b = r["prompt"][len("What is "):].split("?")[0].split()
        assert str(int(a) + int(b) if op == "+" else int(a) - int(b)) == r["answer"] and int(r["answer"]) >= 0
    with pytest.raises(ValueError, match="ops must be made of"):
        get_task("chat_arithmetic", ops="*")
