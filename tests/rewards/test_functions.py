import asyncio
import functools
import logging
import math
import textwrap
import time

import pytest
import torch

from tether.rewards.functions import (
    RewardError,
    RewardFunctionSpec,
    RewardResult,
    RewardScorer,
    load_reward_function,
)

PROMPTS = ["p0", "p1", "p2", "p3"]
COMPLETIONS = ["a", "bb", "ccc", "dddd"]


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def constant_one(prompts, completions, **kw):
    return [1.0] * len(completions)


# -- combination ---------------------------------------------------------------------------------------------


def test_weighted_sum_and_per_function_scores():
    scorer = RewardScorer([(length_reward, 2.0), (constant_one, -0.5)])
    res = scorer(PROMPTS, COMPLETIONS, {})
    assert isinstance(res, RewardResult)
    assert res.scores.dtype == torch.float32 and res.scores.shape == (4,)
    torch.testing.assert_close(res.scores, torch.tensor([1.5, 3.5, 5.5, 7.5]))
    torch.testing.assert_close(res.per_function["length_reward"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert res.valid.all()
    assert res.stats["reward/length_reward/mean"] == pytest.approx(2.5)
    assert res.stats["reward/length_reward/std"] == pytest.approx(math.sqrt(1.25))
    assert res.stats["reward/failure_rate"] == 0.0


def test_columns_are_passed_to_functions():
    def matches(prompts, completions, answer, truncated, **kw):
        return [float(c == a) - float(t) for c, a, t in zip(completions, answer, truncated)]

    scorer = RewardScorer([matches])
    res = scorer(PROMPTS, COMPLETIONS, {"answer": ["a", "x", "ccc", "dddd"], "truncated": [False, False, False, True]})
    assert res.scores.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_column_length_mismatch_is_named():
    with pytest.raises(ValueError, match="column 'answer' has 3 values for 4 samples"):
        RewardScorer([constant_one])(PROMPTS, COMPLETIONS, {"answer": [1, 2, 3]})


def test_none_scores_and_invalid_samples():
    def only_even(prompts, completions, **kw):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    def only_first(prompts, completions, **kw):
        return [10.0] + [None] * (len(completions) - 1)

    res = RewardScorer([only_even, only_first])(PROMPTS, COMPLETIONS, {})
    # sample 0: both; 1: none; 2: only_even; 3: none
    assert res.valid.tolist() == [True, False, True, False]
    assert res.scores[0].item() == 11.0 and res.scores[2].item() == 1.0
    assert math.isnan(res.scores[1].item()) and math.isnan(res.scores[3].item())
    assert math.isnan(res.per_function["only_even"][1].item())
    assert res.stats["reward/only_even/none_rate"] == 0.5
    assert res.stats["reward/only_first/none_rate"] == 0.75
    assert res.stats["reward/only_first/std"] == 0.0  # one score: population std
    assert res.stats["reward/only_even/failure_rate"] == 0.0
    assert res.stats["reward/failure_rate"] == 0.0


def test_all_none_gives_nan_stats():
    res = RewardScorer([lambda p, c, **kw: [None] * len(c)])(PROMPTS, COMPLETIONS, {})
    assert not res.valid.any()
    assert math.isnan(res.stats["reward/lambda/mean"]) and math.isnan(res.stats["reward/lambda/std"])
    assert res.stats["reward/lambda/none_rate"] == 1.0


def test_bool_numpy_and_tensor_values_are_numbers():
    import numpy as np

    res = RewardScorer([lambda p, c, **kw: [True, np.bool_(False), np.int64(1), torch.tensor(0.5)]])(PROMPTS, COMPLETIONS, {})
    assert res.scores.tolist() == [1.0, 0.0, 1.0, 0.5]


def test_tensor_return_is_accepted():
    res = RewardScorer([lambda p, c, **kw: torch.arange(len(c), dtype=torch.float32)])(PROMPTS, COMPLETIONS, {})
    assert res.scores.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_names_default_and_dedupe():
    fmt = functools.partial(length_reward)
    scorer = RewardScorer([length_reward, (length_reward, 1.0), fmt, RewardFunctionSpec(constant_one, 1.0, name="bonus")])
    assert scorer.names == ["length_reward", "length_reward_2", "length_reward_3", "bonus"]
    assert "reward/length_reward_3/mean" in scorer(PROMPTS, COMPLETIONS, {}).stats


def test_empty_batch():
    res = RewardScorer([constant_one])([], [], {})
    assert res.scores.shape == (0,) and res.stats["reward/failure_rate"] == 0.0


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="on_error"):
        RewardScorer([constant_one], on_error="ignore")
    with pytest.raises(ValueError, match="weight nan"):
        RewardScorer([(constant_one, float("nan"))])
    with pytest.raises(ValueError, match="timeout_s"):
        RewardScorer([constant_one], timeout_s=0)
    with pytest.raises(ValueError, match="not a callable"):
        RewardScorer([RewardFunctionSpec(42)])


# -- failures ------------------------------------------------------------------------------------------------


def returns(values):
    def bad_fn(prompts, completions, **kw):
        return list(values)

    return bad_fn


@pytest.mark.parametrize(
    "values, message",
    [
        ([1.0, float("nan"), 0.0, 0.0], r"'bad_fn' returned non-finite value nan for sample 1"),
        ([1.0, 0.0, float("inf"), 0.0], r"'bad_fn' returned non-finite value inf for sample 2"),
        ([1.0, 0.0, 0.0, "0.5"], r"'bad_fn' returned non-number \(str\) '0.5' for sample 3"),
        ([[1.0], 0.0, 0.0, 0.0], r"'bad_fn' returned non-number \(list\) \[1.0\] for sample 0"),
    ],
)
def test_bad_value_raises_with_name_index_value(values, message):
    with pytest.raises(RewardError, match=message):
        RewardScorer([returns(values)])(PROMPTS, COMPLETIONS, {})


@pytest.mark.parametrize(
    "values, bad_index",
    [([1.0, float("nan"), 0.0, 0.0], 1), ([1.0, 0.0, 0.0, "x"], 3)],
)
def test_bad_value_scored_none_and_counted(values, bad_index, caplog):
    scorer = RewardScorer([returns(values), constant_one], on_error="none")
    with caplog.at_level(logging.WARNING, logger="tether.rewards.functions"):
        res = scorer(PROMPTS, COMPLETIONS, {})
    assert math.isnan(res.per_function["bad_fn"][bad_index].item())
    assert res.stats["reward/bad_fn/failure_rate"] == 0.25
    assert res.stats["reward/bad_fn/none_rate"] == 0.0  # failures are not "deliberate" Nones
    assert res.stats["reward/failure_rate"] == 0.125  # 1 of 8 (function, sample) pairs
    assert res.valid.all()  # constant_one still scores the sample
    assert res.scores[bad_index].item() == 1.0
    assert f"for sample {bad_index}" in caplog.text


def test_wrong_count_raises():
    with pytest.raises(RewardError, match="'bad_fn' returned 3 scores for 4 samples"):
        RewardScorer([returns([1.0, 1.0, 1.0])])(PROMPTS, COMPLETIONS, {})


def test_non_list_return_raises():
    def scalar(prompts, completions, **kw):
        return 1.0

    with pytest.raises(RewardError, match="'scalar' returned a float; expected a list of 4 scores"):
        RewardScorer([scalar])(PROMPTS, COMPLETIONS, {})


def test_raising_function_is_wrapped_with_its_name():
    def explodes(prompts, completions, **kw):
        raise KeyError("answer")

    with pytest.raises(RewardError, match=r"'explodes' raised KeyError: 'answer'") as info:
        RewardScorer([explodes])(PROMPTS, COMPLETIONS, {})
    assert isinstance(info.value.__cause__, KeyError)


def test_whole_call_failure_scores_all_none_under_on_error_none():
    def explodes(prompts, completions, **kw):
        raise RuntimeError("boom")

    res = RewardScorer([explodes, returns([1, 2, 3])], on_error="none")(PROMPTS, COMPLETIONS, {})
    assert not res.valid.any()
    assert res.stats["reward/explodes/failure_rate"] == 1.0
    assert res.stats["reward/bad_fn/failure_rate"] == 1.0
    assert res.stats["reward/failure_rate"] == 1.0


# -- async and timeouts --------------------------------------------------------------------------------------


async def async_length(prompts, completions, **kw):
    await asyncio.sleep(0.01)
    return [float(len(c)) for c in completions]


def test_async_function():
    res = RewardScorer([(async_length, 1.0), (constant_one, 1.0)])(PROMPTS, COMPLETIONS, {})
    assert res.scores.tolist() == [2.0, 3.0, 4.0, 5.0]


def test_async_function_inside_running_loop():
    async def main():
        return RewardScorer([async_length])(PROMPTS, COMPLETIONS, {})

    assert asyncio.run(main()).scores.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_sync_wrapper_returning_a_coroutine():
    def wrapped(prompts, completions, **kw):  # e.g. a plain decorator around an async function
        return async_length(prompts, completions, **kw)

    assert RewardScorer([wrapped])(PROMPTS, COMPLETIONS, {}).scores.tolist() == [1.0, 2.0, 3.0, 4.0]


def slow_sync(prompts, completions, **kw):
    time.sleep(2.0)
    return [1.0] * len(completions)


async def slow_async(prompts, completions, **kw):
    await asyncio.sleep(2.0)
    return [1.0] * len(completions)


@pytest.mark.parametrize("fn, name", [(slow_sync, "slow_sync"), (slow_async, "slow_async")])
def test_timeout_raises(fn, name):
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=rf"'{name}' timed out after 0.2s"):
        RewardScorer([fn], timeout_s=0.2)(PROMPTS, COMPLETIONS, {})
    assert time.perf_counter() - t0 < 1.5


def test_timeout_scores_none_under_on_error_none():
    res = RewardScorer([slow_sync, constant_one], timeout_s=0.2, on_error="none")(PROMPTS, COMPLETIONS, {})
    assert res.stats["reward/slow_sync/failure_rate"] == 1.0
    assert res.scores.tolist() == [1.0] * 4


def test_fast_function_under_timeout_runs_normally():
    res = RewardScorer([length_reward], timeout_s=5.0)(PROMPTS, COMPLETIONS, {})
    assert res.scores.tolist() == [1.0, 2.0, 3.0, 4.0]


# -- loading -------------------------------------------------------------------------------------------------


def test_load_by_module_spec(tmp_path, monkeypatch):
    pkg = tmp_path / "my_reward_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring.py").write_text("def exclaim(prompts, completions, **kw):\n    return [c.count('!') for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_function("my_reward_pkg.scoring:exclaim")
    assert fn(["p"], ["a!!"]) == [2]

    from tether.rewards.builtin import math_answer_reward

    assert load_reward_function("tether.rewards.builtin:math_answer_reward") is math_answer_reward


def test_load_by_file_path(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent("""
        def shout(prompts, completions, **kw):
            return [float(c.endswith("!")) for c in completions]
        NOT_CALLABLE = 3
    """))
    fn = load_reward_function(f"{path}:shout")
    assert fn(["p", "p"], ["hi!", "hi"]) == [1.0, 0.0]
    assert RewardScorer([f"{path}:shout"]).names == ["shout"]
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_reward_function(f"{path}:missing")
    with pytest.raises(ValueError, match="'NOT_CALLABLE' is a int, not a callable"):
        load_reward_function(f"{path}:NOT_CALLABLE")


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="module 'no_such_pkg.rewards' not found"):
        load_reward_function("no_such_pkg.rewards:fn")
    with pytest.raises(ValueError, match="does not exist"):
        load_reward_function(f"{tmp_path}/nope.py:fn")
    with pytest.raises(ValueError, match="must look like"):
        load_reward_function("just_a_name")
    with pytest.raises(ValueError, match="unknown built-in reward 'nope'"):
        load_reward_function("builtin:nope")


def test_load_builtins_and_factories():
    from tether.rewards.builtin import math_answer_reward

    assert load_reward_function("builtin:math_answer") is math_answer_reward
    penalty = load_reward_function("builtin:missing_eos_penalty")  # factory with defaults
    assert penalty(["p"], ["c"], truncated=[True]) == [-1.0]
    length = load_reward_function("builtin:length_penalty", {"target_length": 2, "coef": 0.5})
    assert length(["p"], ["abcd"]) == [-1.0]
    with pytest.raises(ValueError, match="calling the factory"):
        load_reward_function("builtin:length_penalty")  # missing required arguments
    with pytest.raises(ValueError, match="takes no arguments"):
        load_reward_function("builtin:math_answer", {"x": 1})
