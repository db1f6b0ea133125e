import pytest

from tether.tasks import TASKS, ArithmeticTask, get_task
from tether.tasks.arithmetic import add_without_carry, subtract_without_borrow


def _solve(prompt: str) -> int:
    a, rest = (prompt[:-1].split("+") if "+" in prompt else prompt[:-1].split("-"))
    return int(a) + int(rest) if "+" in prompt else int(a) - int(rest)


def test_rows_are_well_formed_and_deterministic_by_seed():
    task = ArithmeticTask()
    rows = task.make_rows("train", 200, seed=3)
    assert rows == task.make_rows("train", 200, seed=3)
    assert rows != task.make_rows("train", 200, seed=4)
    for row in rows:
        assert row["prompt"].endswith("=")
        a, b = row["prompt"][:-1].split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        assert row["answer"] == str(int(a) + int(b))


def test_eval_is_held_out_from_train_and_distinct():
    task = ArithmeticTask()
    eval_rows = task.make_rows("eval", 500, seed=0)
    assert len({r["prompt"] for r in eval_rows}) == 500
    eval_keys = {frozenset(r["prompt"][:-1].split("+")) for r in eval_rows}
    train_prompts = [r["prompt"] for s in range(3) for r in task.make_rows("train", 3000, seed=s)]
    train_prompts += [r["prompt"] for r in task.demonstrations(3000, seed=0)]
    # Held out up to operand order too: 37+48 in eval means 48+37 is never trained on.
    assert not eval_keys & {frozenset(p[:-1].split("+")) for p in train_prompts}
    # Asking for more distinct held-out problems than exist is an error (1-digit: ~20 of 100 are held out).
    with pytest.raises(ValueError, match="distinct"):
        ArithmeticTask(digits=1).make_rows("eval", 60, seed=0)


def test_subtraction_answers_are_non_negative():
    task = ArithmeticTask(ops="+-")
    rows = task.make_rows("train", 300, seed=0)
    assert {"+", "-"} <= {"+" if "+" in r["prompt"] else "-" for r in rows}
    for row in rows:
        assert int(row["answer"]) == _solve(row["prompt"]) >= 0


def test_dropped_carries():
    assert add_without_carry(37, 48) == "75"
    assert add_without_carry(57, 68) == "115"
    assert add_without_carry(15, 85) == "90"
    assert add_without_carry(64, 64) == "128"  # only the top column overflows: no carry to drop
    assert add_without_carry(999, 1) == "990"
    assert subtract_without_borrow(52, 17) == "45"
    assert subtract_without_borrow(31, 29) == "12"
    assert subtract_without_borrow(50, 20) == "30"


def test_exact_reward():
    task = ArithmeticTask()
    prompts = ["37+48="] * 5
    completions = ["85", " 85\n", "75", "085", "eighty-five"]
    assert task.reward(prompts, completions, answer=["85"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert task.is_correct(" 85 ", {"answer": "85"}) and not task.is_correct("84", {"answer": "85"})


def test_partial_reward():
    task = ArithmeticTask(partial_credit=True)
    completions = ["85", "75", "5", "185", "84", "12", "", "8a", "58"]
    rewards = task.reward(["37+48="] * len(completions), completions, answer=["85"] * len(completions))
    expected = [1.0, 0.8 * 1 / 2 + 0.2, 0.8 * 1 / 2, 0.8 * 2 / 3, 0.8 * 1 / 2 + 0.2, 0.2, 0.0, 0.0, 0.2]
    assert rewards == pytest.approx(expected)
    assert max(r for r, c in zip(rewards, completions) if c != "85") < 1.0


def test_reward_input_errors():
    task = ArithmeticTask()
    with pytest.raises(KeyError, match="answer"):
        task.reward(["1+1="], ["2"])
    with pytest.raises(ValueError, match="lengths"):
        task.reward(["1+1="], ["2", "3"], answer=["2"])


def test_demonstration_error_rate_is_as_documented():
    task = ArithmeticTask(demo_error_rate=0.6)
    demos = task.demonstrations(5000, seed=0)
    assert demos == task.demonstrations(5000, seed=0)
    carry = [d for d in demos if d["group"] == "carry"]
    assert 0.57 < len(carry) / len(demos) < 0.63  # carry_share=0.6
    flawed = [d for d in demos if d["flawed"]]
    assert all(d["group"] == "carry" for d in flawed)
    assert 0.57 < len(flawed) / len(carry) < 0.63
    for d in demos:
        a, b = map(int, d["prompt"][:-1].split("+"))
        if d["flawed"]:
            assert d["completion"] == add_without_carry(a, b) != d["answer"]
        else:
            assert d["completion"] == d["answer"] == str(a + b)
    assert not any(d["flawed"] for d in ArithmeticTask(demo_error_rate=0.0).demonstrations(500, seed=0))


def test_carry_share():
    def share(task: ArithmeticTask) -> float:
        rows = task.make_rows("train", 2000, seed=0)
        return sum(r["group"] == "carry" for r in rows) / len(rows)

    # Uniform operands: about 45% of 2-digit sums carry from the units into the tens.
    assert 0.42 < share(ArithmeticTask(carry_share=None)) < 0.48
    assert 0.57 < share(ArithmeticTask()) < 0.63
    assert share(ArithmeticTask(carry_share=0.0)) == 0.0 and share(ArithmeticTask(carry_share=1.0)) == 1.0
    eval_rows = ArithmeticTask().make_rows("eval", 500, seed=0)
    assert 0.55 < sum(r["group"] == "carry" for r in eval_rows) / 500 < 0.65
    assert ArithmeticTask(digits=1).carry_share is None  # one column never carries


def test_registry():
    assert {"arithmetic", "sequence"} <= set(TASKS)
    task = get_task("arithmetic", digits=3, partial_credit=True)
    assert isinstance(task, ArithmeticTask) and task.digits == 3 and task.partial_credit
    with pytest.raises(ValueError, match="known tasks: .*arithmetic.*sequence"):
        get_task("arithmetics")
    with pytest.raises(ValueError, match="no option.*digit;.*digits"):
        get_task("arithmetic", digit=3)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(digits=0), "digits"),
        (dict(ops="*"), "ops"),
        (dict(ops=""), "ops"),
        (dict(demo_error_rate=1.5), "demo_error_rate"),
        (dict(eval_fraction=-0.1), "eval_fraction"),
        (dict(carry_share=2), "carry_share"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticTask(**options)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        ArithmeticTask().make_rows("test", 10, seed=0)
