import re
import time

import pytest
import torch

from tether.rewards.reward_model import RewardModelScorer
from tether.rewards.training import train_reward_model
from tether.tasks.preference import REJECTION_KINDS, make_preference_data, preference_prompts
from tether.tasks.tiny_model import CHARS, build_tiny_model


def test_data_is_deterministic_printable_and_well_formed():
    rows = make_preference_data(500, seed=7)
    assert rows == make_preference_data(500, seed=7)
    assert rows != make_preference_data(500, seed=8)
    for row in rows:
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", row["prompt"]).groups())
        assert row["chosen"] == str(a + b)
        # Every rejected completion breaks the "short plain number" format.
        assert not re.fullmatch(r"\d{1,3}", row["rejected"]), row
        assert set(row["prompt"] + row["chosen"] + row["rejected"]) <= set(CHARS)  # no <|unk|> for the char tokenizer
    prompts = preference_prompts(50, seed=7)
    assert len(prompts) == 50 and all(re.fullmatch(r"\d+\+\d+=", p["prompt"]) for p in prompts)
    with pytest.raises(ValueError, match="n must be >= 1"):
        make_preference_data(0, seed=0)


def test_tiny_reward_model_learns_the_preference(tmp_path):
    base = build_tiny_model(tmp_path / "base", seed=0)  # hidden 64, 2 layers: ~130k parameters
    t0 = time.perf_counter()
    metrics = train_reward_model(
        base, make_preference_data(1000, seed=0), tmp_path / "rm",
        epochs=2, lr=1e-3, batch_size=32, eval_fraction=0.2, max_length=64, seed=0, log=None,
    )
    elapsed = time.perf_counter() - t0
    print(f"\nreward model held-out accuracy {metrics['eval_accuracy_before']:.3f} -> {metrics['eval_accuracy']:.3f} "
          f"on {metrics['n_eval']} pairs, trained in {elapsed:.1f}s")
    assert metrics["eval_accuracy_before"] < 0.75  # the untrained head is not already right
    assert metrics["eval_accuracy"] >= 0.9

    # The saved model, reloaded as a reward function, ranks chosen above rejected on fresh rows of every kind.
    scorer = RewardModelScorer(tmp_path / "rm", batch_size=64)
    fresh = make_preference_data(250, seed=12345)
    prompts = [r["prompt"] for r in fresh]
    chosen = torch.tensor(scorer(prompts, [r["chosen"] for r in fresh]))
    rejected = torch.tensor(scorer(prompts, [r["rejected"] for r in fresh]))
    wins = chosen > rejected
    assert wins.float().mean() >= 0.9
    for k, kind in enumerate(REJECTION_KINDS):  # rows cycle through the kinds
        assert wins[k :: len(REJECTION_KINDS)].float().mean() >= 0.8, kind

    # What PPO will see: on RL prompts, a bare number beats junk and an empty completion.
    rl_prompts = [r["prompt"] for r in preference_prompts(20, seed=99)]
    plain = torch.tensor(scorer(rl_prompts, ["42"] * 20))
    junk = torch.tensor(scorer(rl_prompts, ["the answer?"] * 20))
    empty = torch.tensor(scorer(rl_prompts, [""] * 20))
    assert (plain > junk).all() and (plain > empty).all()
