import threading
import time

import pytest

from tether.rewards.builtin import (
    BUILTIN_REWARDS,
    format_reward,
    length_penalty,
    make_math_answer_reward,
    math_answer_reward,
    missing_eos_penalty,
)
from tether.rewards.functions import RewardScorer


def test_math_equivalent_forms_and_boxed():
    completions = [
        r"so the answer is \boxed{\frac{1}{2}}",  # boxed latex fraction vs decimal gold
        "half of it: 0.5",  # final plain answer vs fraction gold
        r"\boxed{1+x}",  # symbolic, reordered
        r"\boxed{4} and then 3",  # a boxed answer wins over a later bare number
        "I don't know",
        "7",
    ]
    answers = ["0.5", "1/2", "x+1", 3, "3", 7]
    assert math_answer_reward([""] * 6, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_math_missing_reference_is_none():
    assert math_answer_reward(["", ""], ["3", "3"], answer=[None, ""]) == [None, None]


def test_math_works_from_a_worker_thread():
    # math-verify's own timeouts use signal.alarm and fail off the main thread; ours must not.
    out = []
    t = threading.Thread(target=lambda: out.append(math_answer_reward(["q"], [r"\boxed{2}"], answer=["2"])))
    t.start()
    t.join(timeout=60)
    assert out == [[1.0]]


def test_math_pathological_answer_is_bounded_and_helper_recovers():
    # Without a process boundary this expression spins inside sympy (holding the GIL) for ever.
    reward = make_math_answer_reward(timeout_s=1.0)
    t0 = time.perf_counter()
    scores = reward(["", ""], [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{4}"], answer=["42", "4"])
    assert scores == [0.0, 1.0]  # the helper was killed and restarted for the second sample
    assert time.perf_counter() - t0 < 30


def test_math_answer_count_mismatch():
    with pytest.raises(ValueError, match="got 1 answers for 2 completions"):
        math_answer_reward(["", ""], ["1", "2"], answer=["1"])


def test_format_reward_fullmatch_and_search():
    think = format_reward(r"<think>.*</think>\s*<answer>.*</answer>", reward=0.5)
    assert think.__name__ == "format"
    assert think(["p"] * 3, [
        "<think>a\nb</think> <answer>4</answer>\n",  # multi-line thought, trailing whitespace ignored
        "<think>a</think>",
        "junk <think>a</think><answer>4</answer>",  # fullmatch: leading junk fails
    ]) == [0.5, 0.0, 0.0]
    anywhere = format_reward(r"<answer>\d+</answer>", mode="search")
    assert anywhere(["p", "p"], ["junk <answer>4</answer> junk", "<answer>x</answer>"]) == [1.0, 0.0]


def test_format_reward_bad_pattern():
    with pytest.raises(ValueError, match=r"invalid regular expression '\('"):
        format_reward("(")
    with pytest.raises(ValueError, match="mode"):
        format_reward("a", mode="match")


def test_length_penalty_chars_and_tokens():
    penalty = length_penalty(target_length=3, coef=0.5)
    assert penalty.__name__ == "length_penalty"
    assert penalty(["p"] * 3, ["ab", "abc", "abcdef"]) == [0.0, 0.0, -1.5]  # characters
    # With token counts from the trainer, those are used instead of characters.
    assert penalty(["p"] * 2, ["ab", "abcdef"], completion_lengths=[10, 1]) == [-3.5, 0.0]
    with pytest.raises(ValueError, match="coef"):
        length_penalty(3, -1.0)


def test_missing_eos_penalty():
    penalty = missing_eos_penalty(-2.0)
    assert penalty(["p", "p"], ["a", "b"], truncated=[True, False]) == [-2.0, 0.0]
    with pytest.raises(ValueError, match="needs the 'truncated' column"):
        penalty(["p"], ["a"])


def test_builtins_in_a_scorer_with_reserved_columns():
    scorer = RewardScorer([
        (math_answer_reward, 1.0),
        (format_reward(r"\d+"), 0.1),
        (missing_eos_penalty(), 1.0),
        (length_penalty(4, 0.1), 1.0),
    ])
    res = scorer(["1+1=", "1+1="], ["2", "two"], {
        "answer": ["2", "2"], "truncated": [False, True], "completion_lengths": [2, 9],
    })
    assert res.scores.tolist() == pytest.approx([1.1, -1.5])
    assert set(scorer.names) == {"math_answer_reward", "format", "missing_eos_penalty", "length_penalty"}


def test_registry_names():
    assert set(BUILTIN_REWARDS) == {"math_answer", "code_tests", "format", "length_penalty", "missing_eos_penalty"}
