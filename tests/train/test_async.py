"""Asynchronous rollouts (rollout.max_staleness): a generation worker process samples ahead from a policy at
most k updates old; pi_old is recomputed (decoupled PPO); the worker stops with the run and its errors reach
the trainer; a resumed run neither loses nor repeats data rows."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PROMPTS, digit_fraction

from tether.config import ConfigError, resolve_config
from tether.rewards.functions import RewardScorer
from tether.train.loop import Trainer, TrainingError


def make_trainer(path, run_dir=None, **over) -> Trainer:
    raw = {"model": {"path": path}, "algorithm": {"name": "grpo"}, "steps": 4, "seed": 0,
           "rollout": {"max_new_tokens": 4, "prompts_per_step": 4, "group_size": 2},
           "optim": {"lr": 1e-2}, "logging": {"progress": False}}
    cfg = resolve_config(raw, [f"{k}={v}" for k, v in over.items()])
    return Trainer(cfg, rows=PROMPTS, reward_fn=RewardScorer([(digit_fraction, 1.0)]), run_dir=run_dir)


def prompts_of(rollout) -> list[str]:
    return rollout.prompts[::rollout.group_size]


def test_batches_are_one_update_stale_and_pi_old_is_recomputed(llama):
    t = make_trainer(llama, **{"rollout.max_staleness": 1, "algorithm.tis_cap": 2.0})
    try:
        results = [t.step() for _ in range(4)]
    finally:
        t.close()
    ms = [r.metrics for r in results]
    # Batch 1 is sampled before any update; batch 2 while the first update runs (still version 0), and so
    # on: each later batch is trained one update after the policy that sampled it.
    assert [m["rollout/staleness"] for m in ms] == [0.0, 1.0, 1.0, 1.0]
    assert ms[0]["rollout/logprob_mismatch_max"] < 1e-4  # version 0 on both sides: the same policy
    for m in ms:
        assert m["policy/first_minibatch_ratio_dev"] == 0.0  # the ratio is against the recomputed pi_old
        assert all(math.isfinite(v) for k, v in m.items() if "rate" not in k), m
    # Stale batches: the behaviour policy is not the proximal one, and the weights say by how much.
    assert max(m["rollout/logprob_mismatch_mean"] for m in ms[1:]) > 1e-3
    assert any(m["rollout/is_weight_max"] != 1.0 for m in ms[1:])
    assert t.async_generator.process is None


def test_a_batch_invariant_worker_samples_the_trainers_log_probs_bit_for_bit(llama):
    """model.batch_invariant reaches the worker's sampler: the first batch (version 0 on both sides) has a
    mismatch of exactly 0."""
    t = make_trainer(llama, **{"rollout.max_staleness": 1, "model.batch_invariant": True})
    try:
        m = t.step().metrics
    finally:
        t.close()
    assert m["rollout/staleness"] == 0.0 and m["rollout/logprob_mismatch_max"] == 0.0


def test_the_workers_error_reaches_the_trainer_and_the_worker_is_gone(llama):
    t = make_trainer(llama, **{"rollout.max_staleness": 1})
    process = t.async_generator.process
    t.async_generator.requests.put((-1, [{"no prompt here": 1}], 2))  # a batch the worker cannot sample
    with pytest.raises(TrainingError, match="the generation worker failed:(.|\n)*KeyError: 'prompt'"):
        t.step()
    t.close()
    process.join(timeout=10)
    assert not process.is_alive()


def test_resumed_async_run_continues_the_data_order(llama, tmp_path):
    sync = make_trainer(llama)
    want = [p for _ in range(4) for p in prompts_of(sync.step().rollout)]

    t = make_trainer(llama, run_dir=tmp_path / "run", **{"rollout.max_staleness": 1})
    try:
        got = [p for _ in range(2) for p in prompts_of(t.step().rollout)]
        checkpoint = t.save(keep_last=1)  # a batch is in flight: its rows are drawn again on resume
    finally:
        t.close()
    resumed = make_trainer(llama, run_dir=tmp_path / "run", **{"rollout.max_staleness": 1})
    try:
        resumed.load(checkpoint)
        got += [p for _ in range(2) for p in prompts_of(resumed.step().rollout)]
    finally:
        resumed.close()
    assert got == want


def test_async_rollouts_refuse_what_they_do_not_support_yet(llama):
    with pytest.raises(ConfigError, match="does not work with a colocated vLLM"):
        make_trainer(llama, **{"rollout.max_staleness": 1, "rollout.backend": "vllm"})
    from tether.config import validate_for_world

    raw = resolve_config({"model": {"path": llama}, "rollout": {"max_staleness": 1},
                          "distributed": {"strategy": "fsdp"}}, [])
    with pytest.raises(ConfigError, match="which FSDP shards: use distributed.strategy=ddp"):
        validate_for_world(raw, 2)
    validate_for_world(resolve_config({"model": {"path": llama}, "rollout": {"max_staleness": 1}}, []), 2)


def test_staleness_zero_is_the_synchronous_loop(llama):
    a = make_trainer(llama)
    ma = a.step().metrics  # one after the other: each Trainer seeds the global RNG it samples with
    b = make_trainer(llama, **{"rollout.max_staleness": 0})
    mb = b.step().metrics
    assert a.async_generator is None and b.async_generator is None
    drop = {"time/", "throughput/"}
    assert {k: v for k, v in ma.items() if not k.startswith(tuple(drop))} == \
           {k: v for k, v in mb.items() if not k.startswith(tuple(drop))}
    assert torch.equal(next(a.policy.parameters()), next(b.policy.parameters()))


def test_a_worker_that_dies_without_a_word_is_an_error_not_a_hang(llama):
    t = make_trainer(llama, **{"rollout.max_staleness": 1})
    t.async_generator.process.kill()
    with pytest.raises(TrainingError, match=r"the generation worker exited \(code -9\)"):
        t.step()
    t.close()


@pytest.mark.parametrize("lora", [False, True])
def test_the_worker_computes_the_reference_logprobs_the_trainer_would(llama, lora, monkeypatch):
    """The frozen reference's pass runs in the worker (a separate copy in shared memory, or LoRA's adapter-off
    base), not in the trainer; the trainer's own pass over the same tokens gives the same log-probs, up to
    float32 summation order (the two processes may use different thread counts)."""
    from tether.train import passes
    from tether.train.forward import split_micro_batches

    reference_logprobs = passes.reference_logprobs

    def not_in_the_trainer(*args, **kwargs):
        raise AssertionError("the trainer ran the reference pass")

    over = {"rollout.max_staleness": 1, "algorithm.minibatches": 1}  # one update: no separate pi_old pass
    if lora:
        over.update({"model.lora.r": 4, "model.lora.alpha": 8})
    t = make_trainer(llama, **over)
    try:
        monkeypatch.setattr(passes, "reference_logprobs", not_in_the_trainer)  # the spawned worker has its own
        results = [t.step() for _ in range(2)]
        assert (t.models.reference.model is None) == lora
        for r in results:
            rollout = r.rollout
            from_worker = rollout.ref_logprobs_BT.clone()
            mask = rollout.response_mask_BT.bool()
            assert mask.any() and from_worker[mask].lt(0).all()
            micro = split_micro_batches(rollout, torch.arange(len(rollout)), micro_batch_size=len(rollout))
            reference_logprobs(rollout, micro, t.models.reference, temperature=1.0, autocast_dtype=None,
                               share_prompts=False)
            torch.testing.assert_close(from_worker[mask], rollout.ref_logprobs_BT[mask], rtol=0, atol=1e-5)
            # No old pass: the trainer's first forward stood for pi_old, and measured the KL to the reference.
            assert rollout.old_logprobs_BT is None
            assert math.isfinite(r.metrics["kl/ref_per_token"])
        # Before the first update the policy is the reference; k1 on the stale samples of step 2 need not be >= 0.
        assert abs(results[0].metrics["kl/ref_per_token"]) < 1e-6
        assert results[1].metrics["kl/ref_per_token"] != 0.0
        assert results[1].metrics["rollout/behaviour_kl"] != 0.0
    finally:
        t.close()


def test_an_adaptive_beta_keeps_the_old_pass_it_reads_the_kl_from(llama):
    t = make_trainer(llama, **{"rollout.max_staleness": 1, "algorithm.kl_target": 0.01})
    try:
        r = t.step()
    finally:
        t.close()
    assert r.rollout.old_logprobs_BT is not None and math.isfinite(r.metrics["kl/ref_per_token"])


def test_the_worker_runs_whole_episodes_with_their_masks(llama):
    """With an environment the worker runs group_size episodes of each row (its own environments, in the
    sync loop's row order); environment tokens stay out of the loss mask, and at version 0 the worker's
    per-token log-probs over every turn are the trainer's."""
    from tether.tasks import get_task

    def trainer(**over):
        raw = {"model": {"path": llama}, "algorithm": {"name": "grpo"}, "seed": 0, "steps": 3,
               "data": {"source": "task:guess_number"}, "rollout": {"prompts_per_step": 4, "group_size": 2},
               "optim": {"lr": 1e-3}, "threads": "1", "logging": {"progress": False}}
        cfg = resolve_config(raw, [f"{k}={v}" for k, v in over.items()])
        return Trainer(cfg, rows=get_task("guess_number").make_rows("train", 32), reward_fn=None)

    sync = trainer()
    want = [row for _ in range(3) for row in sync.step().rollout.rows]
    t = trainer(**{"rollout.max_staleness": 1})
    try:
        results = [t.step() for _ in range(3)]
    finally:
        t.close()
    assert [row for r in results for row in r.rollout.rows] == want
    ms = [r.metrics for r in results]
    assert [m["rollout/staleness"] for m in ms] == [0.0, 1.0, 1.0]
    assert ms[0]["rollout/logprob_mismatch_max"] < 1e-5  # float32, the same weights on both sides
    for r in results:
        ro = r.rollout
        assert ro.turn_rewards_BT is not None and ro.ref_logprobs_BT is not None
        completion_region = ro.attention_mask_BL[:, ro.prompt_len:].bool()
        env_tokens = completion_region & ~ro.response_mask_BT.bool()
        assert env_tokens.any() and not (ro.loss_mask_BT.bool() & env_tokens).any()
        assert r.metrics["episode/turns_mean"] >= 1 and 0 < r.metrics["episode/env_token_frac"] < 1


def test_dapo_refills_from_the_workers_next_batches(llama):
    """Dynamic sampling with a worker: the groups of every prompt in the first half of the alphabet score alike
    and are dropped, so the trainer takes further batches from the worker to refill the step. The groups kept
    follow the data order (nothing skipped out of turn, nothing repeated), and no batch is staler than k."""
    uniform = set("abcdefgh")

    def half_flat(prompts, completions, **_):
        return [0.0 if p in uniform else float(sum(map(ord, c)) % 7) for p, c in zip(prompts, completions)]

    order_of = make_trainer(llama, **{"algorithm.name": "dapo"}).sampler  # the same seed: the same data order
    order = [row["prompt"] for _ in range(16) for row in order_of.next_batch()]
    raw = {"model": {"path": llama}, "algorithm": {"name": "dapo"}, "seed": 0,
           "rollout": {"max_new_tokens": 4, "prompts_per_step": 4, "group_size": 2, "max_staleness": 1},
           "optim": {"lr": 1e-2}, "logging": {"progress": False}}
    t = Trainer(resolve_config(raw, []), rows=PROMPTS, reward_fn=RewardScorer([(half_flat, 1.0)]))
    try:
        results = [t.step() for _ in range(3)]
    finally:
        t.close()
    ms = [r.metrics for r in results]
    assert sum(m["rollout/generation_rounds"] for m in ms) > 3  # refilled at least once
    assert all(m["rollout/staleness"] <= 1 for m in ms)
    kept = [p for r in results for p in prompts_of(r.rollout)]
    assert kept and not set(kept) & uniform
    it = iter(order)
    assert all(p in it for p in kept), (kept, order)  # a subsequence of the data order
    assert all(math.isfinite(m["loss/total"]) for m in ms)


REWARD_FILE = '''
import os


def pid_digits(prompts, completions, **_):
    with open(os.environ["PID_LOG"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''


def test_the_reward_is_scored_in_the_worker_while_the_trainer_updates(llama, tmp_path, monkeypatch):
    """A reward given as path.py:fn (its file loaded again in the worker) runs in the generation worker, not in
    the trainer, and its scores are the ones the trainer would have computed."""
    import os

    from tether.train.run import build_reward

    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    monkeypatch.setenv("PID_LOG", str(tmp_path / "pids.txt"))
    cfg = resolve_config({"model": {"path": llama}, "algorithm": {"name": "grpo"}, "seed": 0,
                          "rollout": {"max_new_tokens": 4, "prompts_per_step": 4, "group_size": 2,
                                      "max_staleness": 1},
                          "reward": {"functions": [f"{tmp_path / 'rewards.py'}:pid_digits"]},
                          "logging": {"progress": False}}, [])
    reward = build_reward(cfg)
    t = Trainer(cfg, rows=PROMPTS, reward_fn=reward)
    try:
        results = [t.step() for _ in range(2)]
        worker_pid = t.async_generator.process.pid
        assert t.async_generator.scores_in_worker and t.async_generator.scoring_note is None
    finally:
        t.close()
    assert set((tmp_path / "pids.txt").read_text().split()) == {str(worker_pid)} != {str(os.getpid())}
    for res in results:
        r = res.rollout
        again = reward(r.prompts, r.completions, {"truncated": r.truncated_B.tolist(),
                                                  "completion_lengths": r.completion_lengths_B.tolist()})
        assert torch.equal(r.scores_B.cpu(), again.scores.float())
        assert "reward/pid_digits/mean" in res.metrics


def test_a_reward_the_worker_cannot_load_is_scored_in_the_trainer(llama, caplog):
    import sys
    import types

    local = types.ModuleType("defined_only_in_the_trainer")  # pickles by reference here, not importable there
    exec("def reward(prompts, completions, **_):\n    return [float(len(c)) for c in completions]", local.__dict__)
    sys.modules[local.__name__] = local
    try:
        t = Trainer(resolve_config({"model": {"path": llama}, "seed": 0, "logging": {"progress": False},
                                    "rollout": {"max_new_tokens": 4, "prompts_per_step": 4, "group_size": 2,
                                                "max_staleness": 1}}, []),
                    rows=PROMPTS, reward_fn=RewardScorer([(local.reward, 1.0)]))
        try:
            with caplog.at_level("WARNING", logger="tether"):
                m = t.step().metrics
        finally:
            t.close()
    finally:
        del sys.modules[local.__name__]
    assert not t.async_generator.scores_in_worker
    assert "ModuleNotFoundError" in t.async_generator.scoring_note
    assert "could not load the reward" in caplog.text and math.isfinite(m["reward/reward/mean"])

    lambda_reward = RewardScorer([(lambda p, c, **_: [1.0 for _ in c], 1.0)])
    with caplog.at_level("WARNING", logger="tether"):
        t = Trainer(resolve_config({"model": {"path": llama}, "seed": 0, "logging": {"progress": False},
                                    "rollout": {"max_new_tokens": 4, "prompts_per_step": 4, "group_size": 2,
                                                "max_staleness": 1}}, []), rows=PROMPTS, reward_fn=lambda_reward)
        t.close()
    assert "the reward does not pickle" in caplog.text


def test_a_configured_factory_reward_is_built_again_in_the_worker(llama):
    """builtin:format with kwargs is a closure, which does not pickle; the scorer built from the config is
    built again in the worker from that config."""
    from tether.train.run import build_reward

    cfg = resolve_config({"model": {"path": llama}, "seed": 0, "logging": {"progress": False},
                          "rollout": {"max_new_tokens": 4, "prompts_per_step": 4, "group_size": 2,
                                      "max_staleness": 1},
                          "reward": {"functions": [{"spec": "builtin:format", "kwargs": {"pattern": ".*[0-9].*"}}]}},
                         [])
    t = Trainer(cfg, rows=PROMPTS, reward_fn=build_reward(cfg))
    try:
        res = t.step()
        assert t.async_generator.scores_in_worker
    finally:
        t.close()
    r = res.rollout
    want = [1.0 if any(ch.isdigit() for ch in c) else 0.0 for c in r.completions]
    assert r.scores_B.tolist() == want


def test_staleness_histogram_covers_every_level_up_to_k(llama):
    t = make_trainer(llama, **{"rollout.max_staleness": 2})
    try:
        ms = [t.step().metrics for _ in range(4)]
    finally:
        t.close()
    for m in ms:
        shares = [m[f"rollout/staleness_frac_{k}"] for k in range(3)]
        assert sum(shares) == pytest.approx(1.0) and shares[int(m["rollout/staleness"])] > 0
    assert ms[0]["rollout/staleness_frac_0"] == 1.0  # the first batch: nothing published yet
