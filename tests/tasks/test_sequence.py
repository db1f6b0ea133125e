import pytest

from tether.tasks import SequenceTask, get_task


def _source(prompt: str) -> str:
    return prompt.split(":", 1)[1][:-1]


def test_rows_are_well_formed_and_deterministic_by_seed():
    task = SequenceTask()
    rows = task.make_rows("train", 200, seed=0)
    assert rows == task.make_rows("train", 200, seed=0) != task.make_rows("train", 200, seed=1)
    for row in rows:
        assert row["prompt"].startswith("reverse:") and row["prompt"].endswith("=")
        s = _source(row["prompt"])
        assert 3 <= len(s) <= 6 and row["answer"] == s[::-1]


def test_sort():
    task = get_task("sequence", op="sort")
    assert task._prompt("c4ab") == "sort:c4ab=" and task._answer("c4ab") == "4abc"
    for row in task.make_rows("eval", 50, seed=0):
        assert row["answer"] == "".join(sorted(_source(row["prompt"])))


def test_eval_is_held_out_from_train():
    task = SequenceTask(min_len=2, max_len=2, alphabet="abcdefgh")  # small: 64 problems, collisions certain
    every = {f"reverse:{x}{y}=": task.split_of(x + y) for x in "abcdefgh" for y in "abcdefgh"}
    held_out = {p for p, split in every.items() if split == "eval"}
    assert 0 < len(held_out) < 20
    eval_prompts = {r["prompt"] for r in task.make_rows("eval", len(held_out), seed=0)}
    train_prompts = {r["prompt"] for r in task.make_rows("train", 2000, seed=0)}
    assert eval_prompts == held_out
    assert train_prompts == set(every) - held_out
    with pytest.raises(ValueError, match="distinct"):
        task.make_rows("eval", len(held_out) + 1, seed=0)


def test_exact_and_partial_reward():
    completions = ["4cba", " 4cba\n", "4cab", "4cb", "4cbaa", "abc4", ""]
    answers = ["4cba"] * len(completions)
    prompts = ["reverse:abc4="] * len(completions)
    assert SequenceTask().reward(prompts, completions, answer=answers) == [1.0, 1.0, 0, 0, 0, 0, 0]
    partial = SequenceTask(partial_credit=True).reward(prompts, completions, answer=answers)
    assert partial == pytest.approx([1.0, 1.0, 0.5, 0.75, 0.8, 0.0, 0.0])


def test_demonstration_error_rate_is_as_documented():
    task = SequenceTask(demo_error_rate=0.6)
    demos = task.demonstrations(4000, seed=0)
    swap = [d for d in demos if d["group"] == "swap"]
    flawed = [d for d in demos if d["flawed"]]
    assert 0.40 < len(swap) / len(demos) < 0.55  # lengths 5 and 6 of 3..6, minus equal last pairs
    assert all(d["group"] == "swap" for d in flawed)
    assert 0.56 < len(flawed) / len(swap) < 0.64
    for d in demos:
        answer = _source(d["prompt"])[::-1]
        assert d["answer"] == answer
        assert d["completion"] == (answer[:-2] + answer[-1] + answer[-2] if d["flawed"] else answer)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(op="shuffle"), "op"),
        (dict(min_len=5, max_len=3), "min_len"),
        (dict(alphabet="ab="), "alphabet"),
        (dict(alphabet="a b"), "alphabet"),
        (dict(demo_error_rate=-1), "demo_error_rate"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        SequenceTask(**options)
    with pytest.raises(ValueError, match="no option"):
        get_task("sequence", length=4)
