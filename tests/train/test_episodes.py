"""Multi-turn episodes through the real sampler and the training loop, on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from tether.algorithms import PRESETS
from tether.config import resolve_config
from tether.envs.base import Feedback
from tether.models import load_causal_lm, load_tokenizer
from tether.rollout.episodes import EpisodeRunner, PlainFormat, episodes_to_rollout
from tether.rollout.hf import HFGenerateBackend
from tether.tasks import get_task
from tether.train.forward import make_micro_batch, policy_logprobs
from tether.train.loop import Trainer
from tether.train.run import run_training


class Chatty:
    """Three turns, whatever the model says; a long-ish reply between them."""

    def reset(self, row):
        return row["prompt"]

    def step(self, turn):
        if turn.index == 2:
            return Feedback(reward=float(len(turn.text) % 2), done=True)
        return Feedback(messages=[{"role": "user", "content": f"reply {turn.index}: {turn.text[:5]}"}])


def test_sampler_logprobs_equal_one_teacher_forced_forward_over_the_whole_episode(llama):
    torch.manual_seed(0)
    model, tok = load_causal_lm(llama), load_tokenizer(llama)
    backend = HFGenerateBackend(model, tok, max_new_tokens=6, micro_batch_size=3)
    runner = EpisodeRunner(Chatty, PlainFormat(tok), tok, max_turns=3, max_tokens=80, max_new_tokens=6)
    episodes = runner.run([{"prompt": p} for p in ("ab", "cdefg")], backend.sample_tokens, group_size=3)
    r = episodes_to_rollout(episodes, pad_token_id=tok.pad_token_id, group_size=3)
    mask = r.response_mask_BT
    assert (mask == 0).logical_and(r.attention_mask_BL[:, r.prompt_len:] == 1).any()  # env tokens inside
    mb = make_micro_batch(r, torch.arange(len(r)))
    with torch.no_grad():
        lp, _ = policy_logprobs(model, mb, temperature=1.0, with_entropy=False)
    t = mb.width
    gap = ((lp - r.sampler_logprobs_BT[:, :t]) * mask[:, :t]).abs().max().item()
    # float32 both sides; the cached decode and the full forward sum in another order: a few ulps of the
    # logits, far below 1e-5 at this size.
    assert gap < 1e-5, gap
    assert mask[:, t:].sum() == 0


def guess_trainer(path, algo, **over):
    raw = {"model": {"path": path}, "algorithm": {"name": algo}, "seed": 0, "steps": 4,
           "data": {"source": "task:guess_number"},
           "rollout": {"prompts_per_step": 4, "group_size": 4},
           "optim": {"lr": 1e-3, "critic_lr": 1e-3}, "threads": "1"}
    cfg = resolve_config(raw, [f"{k}={v}" for k, v in over.items()])
    rows = get_task("guess_number").make_rows("train", 64)
    return Trainer(cfg, rows=rows, reward_fn=None)


@pytest.mark.parametrize("algo", sorted(set(PRESETS) - {"opd"}))  # opd needs a teacher model
def test_every_preset_trains_on_episodes(llama, algo):
    t = guess_trainer(llama, algo)
    assert t.cfg.env.name == "guess_number" and t.cfg.env.max_turns == 5  # from the task
    before = [p.detach().clone() for p in t.policy.parameters()]
    for _ in range(2):
        m = t.step().metrics
    assert all(math.isfinite(v) for k, v in m.items() if "rate" not in k), m
    assert m["episode/turns_mean"] >= 1 and 0 < m["episode/env_token_frac"] < 1
    assert m["completion/tokens"] > 0 and "reward/mean" in m
    assert any(not torch.equal(a, b) for a, b in zip(before, t.policy.parameters()))


def test_turn_rewards_reach_gae_on_the_token_ending_their_turn(llama):
    t = guess_trainer(llama, "ppo", **{"algorithm.gamma": 0.5, "algorithm.lam": 1.0, "algorithm.beta": 0.0})
    out = t.step()
    r = out.rollout
    assert r.turn_rewards_BT is not None and r.turn_rewards_BT.sum() > -1
    # The score is the sum of the environment's rewards (no reward functions here).
    assert torch.allclose(r.scores_B, r.turn_rewards_BT.sum(-1))


def comparable(metrics):
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))} for m in metrics]


def test_resume_in_the_middle_of_a_multi_turn_run_gives_the_straight_run(llama, tmp_path):
    base = {"model": {"path": llama}, "algorithm": {"name": "grpo"}, "seed": 0,
            "data": {"source": "task:guess_number"}, "task": {"train_size": 64},
            "rollout": {"prompts_per_step": 2, "group_size": 4}, "optim": {"lr": 1e-3}, "threads": "1",
            "logging": {"tensorboard": False, "report": False, "progress": False},
            "checkpoint": {"every": 2}}
    straight = run_training(resolve_config(base, {"steps": 4}), run_dir=tmp_path / "a").metrics
    run_training(resolve_config(base, {"steps": 2}), run_dir=tmp_path / "b")
    resumed = run_training(resolve_config(base, {"steps": 4, "checkpoint": {"resume": "latest"}}),
                           run_dir=tmp_path / "b").metrics
    assert len(resumed) == 2
    assert comparable(straight[2:]) == comparable(resumed)
