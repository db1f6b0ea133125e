"""Rollout batches: joining rounds keeps the reward figures exact."""

import math

import pytest

from tether.rewards.functions import RewardScorer
from tether.rollout.batch import merge_reward_stats


def test_merged_reward_stats_equal_scoring_the_rounds_together():
    """DAPO's refill rounds are scored one at a time: their per-function figures, merged, are those of one
    call over all the samples (means and stds of the scored ones, None and failure rates)."""
    def f(prompts, completions, **_):
        return [None if c == "n" else float(len(c)) for c in completions]

    scorer = RewardScorer([(f, 1.0)])
    rounds = [["a", "bb", "n", "cccc"], ["n", "n", "dd", "e", "ffffff", "g"], ["n", "n"]]
    parts = [(scorer([""] * len(r), r).stats, len(r)) for r in rounds]
    want = scorer([""] * 12, sum(rounds, [])).stats
    got = merge_reward_stats(parts)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k
    assert merge_reward_stats(parts[:1]) == parts[0][0] and merge_reward_stats([]) == {}
    assert math.isnan(merge_reward_stats([parts[2], parts[2]])["reward/f/mean"])
