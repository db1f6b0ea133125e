"""The stages of a step on tiny tensors, with a fake sampler backend and no HF model: collect (with DAPO's
refill), advantages (and the KL it hands the controller), the optimiser step's guard, and the health checks."""

from __future__ import annotations

import math

import pytest
import torch

from tether.config import resolve_config
from tether.data import PromptSampler
from tether.rewards.functions import RewardScorer
from tether.rollout.batch import Rollout
from tether.train.advantages import compute_advantages
from tether.train.collect import collect, filter_uniform_groups
from tether.train.distributed import Dist
from tether.train.errors import TrainingError
from tether.train.stats import StatAccumulator
from tether.train.step_stats import Health
from tether.train.update import Optimisation


class FakeBackend:
    """Completions chosen by a function of the prompt and the sample's index in its group: 2 tokens each."""

    def __init__(self, completion):
        self.completion = completion
        self.calls = 0

    def generate(self, rows, prompts, group_size):
        self.calls += 1
        B = len(prompts) * group_size
        completions = [self.completion(p, j) for p in prompts for j in range(group_size)]
        return Rollout(input_ids_BL=torch.ones(B, 3, dtype=torch.long), attention_mask_BL=torch.ones(B, 3),
                       prompt_len=1, response_mask_BT=torch.ones(B, 2), sampler_logprobs_BT=torch.zeros(B, 2),
                       truncated_B=torch.zeros(B, dtype=torch.bool), prompts=[p for p in prompts for _ in range(group_size)],
                       completions=completions, rows=[r for r in rows for _ in range(group_size)],
                       group_size=group_size)


def exact(prompts, completions, **_):
    return [float(c == "right") for c in completions]


def cfg_for(algo: str, **over):
    return resolve_config({"model": {"path": "unused"}, "algorithm": {"name": algo},
                           "rollout": {"prompts_per_step": 2, "group_size": 2}}, [f"{k}={v}" for k, v in over.items()])


def test_collect_refills_filtered_groups_from_further_prompts():
    """DAPO's dynamic sampling: prompts whose group scores all equal are dropped and more are drawn until
    prompts_per_step groups carry a signal; the kept groups, the dropped count and the merged reward figures."""
    rows = [{"prompt": p} for p in ("same", "mixed", "same2", "mixed2")]
    backend = FakeBackend(lambda p, j: "right" if p.startswith("mixed") and j == 0 else "wrong")
    cfg = cfg_for("dapo", **{"algorithm.max_filter_rounds": 3})
    sampler = PromptSampler(rows, batch_size=2, seed=0, shuffle=False)
    rollout, info = collect(cfg, sampler, backend, RewardScorer([exact]), Dist(), pad_token_id=0,
                            device=torch.device("cpu"))
    assert backend.calls == info.generation_rounds == 2 and info.filtered_groups == 2
    assert rollout.prompts == ["mixed", "mixed", "mixed2", "mixed2"]
    assert rollout.scores_B.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert rollout.reward_stats["reward/exact/mean"] == pytest.approx(2 / 8)  # all 8 scored samples
    assert rollout.scored_rows == 8


def test_collect_stops_when_no_group_ever_carries_a_signal():
    backend = FakeBackend(lambda p, j: "wrong")
    sampler = PromptSampler([{"prompt": "a"}, {"prompt": "b"}], batch_size=2, seed=0)
    with pytest.raises(TrainingError, match="every group had identical rewards"):
        collect(cfg_for("dapo", **{"algorithm.max_filter_rounds": 2}), sampler, backend, RewardScorer([exact]),
                Dist(), pad_token_id=0, device=torch.device("cpu"))
    assert backend.calls == 3


def test_filter_uniform_groups_treats_unscored_samples_as_absent():
    r = FakeBackend(lambda p, j: "x").generate([{"prompt": "a"}] * 3, ["a", "b", "c"], 2)
    r.scores_B = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, float("nan")])
    r.valid_B = torch.tensor([True, True, True, True, True, False])
    kept, dropped = filter_uniform_groups(r)
    assert dropped == 2 and kept.prompts == ["b", "b"]  # a: equal scores; c: one scored sample only


def test_grpo_advantages_and_the_measured_kl():
    """GRPO (Shao et al. 2024): A_i = (r_i - mean_g) / std_g on every token; the stage returns the k1 KL per
    token of pi_old to pi_ref averaged over the batch, which is what the adaptive controller consumes."""
    r = FakeBackend(lambda p, j: "x").generate([{"prompt": "a"}] * 2, ["a", "b"], 2)
    r.scores_B = torch.tensor([1.0, 0.0, 3.0, 3.0])
    r.valid_B = torch.ones(4, dtype=torch.bool)
    r.ref_logprobs_BT = torch.full((4, 2), -1.0)
    old = torch.tensor([[-0.5, -1.0], [-1.0, -1.0], [-2.0, -1.0], [-1.0, -1.0]])
    kl = compute_advantages(r, cfg_for("grpo"), Dist(), beta=0.1, uses_reference=True, old_logprobs_BT=old)
    assert kl == pytest.approx((0.5 + 0 + -1.0 + 0 + 0 + 0 + 0 + 0) / 8)
    a = r.advantages_BT[:, 0]
    std = torch.tensor([1.0, 0.0]).std()  # the group's unbiased std
    torch.testing.assert_close(a, torch.tensor([0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.0, 0.0]), atol=1e-4,
                               rtol=1e-4)
    assert torch.equal(r.advantages_BT[:, 0], r.advantages_BT[:, 1])


def test_optimiser_step_refuses_a_non_finite_gradient():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    o = Optimisation({"policy": opt}, {"policy": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)}, {}, 1.0)
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    acc = StatAccumulator()
    assert "non-finite gradient norm of the policy" in o.step(acc)
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None and not opt.state
    w.grad = torch.tensor([1.0, 0.0, 0.0])
    assert o.step(acc) is None and w[0].item() < 1.0


def test_health_stops_after_consecutive_bad_or_unscored_steps_and_flags_a_weight_jump(caplog):
    h = Health(max_bad=2, max_growth=4.0, lr=1e-5)
    skipped = {"update/optimizer_steps": 0}
    h.check_update(skipped, 1, "non-finite gradient norm of the policy (nan)")
    with pytest.raises(TrainingError, match=r"2 consecutive steps had no finite update \(non-finite gradient"):
        h.check_update(skipped, 2, None)
    h = Health(max_bad=2, max_growth=4.0, lr=1e-5)
    assert not h.nothing_scored(3, 4, 1) and h.nothing_scored(0, 4, 2)
    with pytest.raises(TrainingError, match="scored no sample in 2 consecutive steps"):
        h.nothing_scored(0, 4, 3)
    m = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.ones_(m.weight)
    assert h.check_weights({"policy": m}, 1, Dist(), False) == {"optim/weight_norm_policy": 2.0} and h.healthy
    with torch.no_grad():
        m.weight.mul_(5)
    h.check_weights({"policy": m}, 2, Dist(), False)
    assert not h.healthy and "went from 2 to 10 in one step" in caplog.text
    state = h.state_dict()
    again = Health(2, 4.0, 1e-5)
    again.load_state_dict(state)
    assert not again.healthy and again.weight_norms == {"policy": 10.0} and not math.isnan(state["weight_norms"]["policy"])


class VariableLengthBackend(FakeBackend):
    """Completion j of each group has lengths[j] tokens; one at the budget is cut (truncated)."""

    def __init__(self, lengths, budget):
        super().__init__(lambda p, j: "right" if j == 0 else "wrong")
        self.lengths, self.budget = lengths, budget

    def generate(self, rows, prompts, group_size):
        r = super().generate(rows, prompts, group_size)
        n = torch.tensor([self.lengths[j] for _ in prompts for j in range(group_size)])
        r.response_mask_BT = (torch.arange(self.budget) < n[:, None]).float()
        r.attention_mask_BL = torch.cat([torch.ones(len(n), 1), r.response_mask_BT], 1)
        r.input_ids_BL = torch.ones(len(n), 1 + self.budget, dtype=torch.long)
        r.sampler_logprobs_BT = torch.zeros(len(n), self.budget)
        r.truncated_B = n == self.budget
        return r


def test_dapo_overlong_penalty_joins_the_score_before_filtering_and_the_filter_drops_cut_rows_from_the_loss():
    # Budget 4, buffer 2: lengths 1 and 2 go unpunished, 3 gets -0.5, 4 (cut) the full -1.
    backend = VariableLengthBackend([3, 1, 4, 2], budget=4)
    cfg = cfg_for("dapo", **{"rollout.max_new_tokens": 4, "rollout.group_size": 4, "algorithm.overlong_buffer": 2,
                             "algorithm.overlong_filter": "true"})
    sampler = PromptSampler([{"prompt": "a"}, {"prompt": "b"}], batch_size=2, seed=0, shuffle=False)
    rollout, info = collect(cfg, sampler, backend, RewardScorer([exact]), Dist(), pad_token_id=0,
                            device=torch.device("cpu"))
    assert rollout.scores_B.tolist() == [0.5, 0.0, -1.0, 0.0] * 2 and info.filtered_groups == 0
    assert rollout.reward_stats["reward/overlong_penalty/mean"] == pytest.approx(-1.5 / 4)
    assert rollout.reward_stats["reward/exact/mean"] == pytest.approx(0.25)
    assert rollout.in_loss_B.tolist() == [True, True, False, True] * 2
    assert rollout.loss_mask_BT.sum().item() == 2 * (3 + 1 + 2)
    assert rollout.completion_lengths_B.tolist() == [3, 1, 4, 2] * 2  # the cut rows still count as sampled

    # Only a penalty tells the group apart: without it every score is 0 and dynamic sampling drops the group.
    flat = VariableLengthBackend([3, 1, 4, 2], budget=4)
    flat.completion = lambda p, j: "wrong"
    kept, info = collect(cfg, PromptSampler([{"prompt": "a"}, {"prompt": "b"}], batch_size=2, seed=0), flat,
                         RewardScorer([exact]), Dist(), pad_token_id=0, device=torch.device("cpu"))
    assert info.filtered_groups == 0 and kept.scores_B.tolist() == [-0.5, 0.0, -1.0, 0.0] * 2


def test_overlong_options_are_checked_against_the_budget():
    from tether.config import ConfigError

    with pytest.raises(ConfigError, match="overlong_buffer=9 is longer than the length budget"):
        cfg_for("dapo", **{"rollout.max_new_tokens": 8, "algorithm.overlong_buffer": 9})
    with pytest.raises(ConfigError, match="an episode's budget is env.max_tokens"):
        cfg_for("grpo", **{"env.name": "calculator", "algorithm.overlong_filter": "true"})


def test_high_entropy_selection_zeroes_the_advantages_of_low_entropy_tokens():
    r = FakeBackend(lambda p, j: "right" if j == 0 else "wrong").generate(
        [{"prompt": "a"}], ["a"], 2)
    r.scores_B, r.valid_B = torch.tensor([1.0, 0.0]), torch.tensor([True, True])
    r.old_entropy_BT = torch.tensor([[0.1, 2.0], [0.5, 0.3]])
    cfg = cfg_for("grpo", **{"rollout.prompts_per_step": 1, "algorithm.entropy_top_fraction": 0.5,
                             "algorithm.beta": 0.0})
    compute_advantages(r, cfg, Dist(), beta=0.0, uses_reference=False, old_logprobs_BT=None)
    a = 0.5 / math.sqrt(0.5)  # (1 - 0.5) / std([1, 0]) with the unbiased std
    torch.testing.assert_close(r.advantages_BT, torch.tensor([[0.0, a], [-a, 0.0]]), rtol=1e-5, atol=1e-6)
