"""Mixed precision and memory savers: bf16 autocast over fp32 master weights, a bf16 frozen reference,
gradient checkpointing and token-budget micro-batches."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PROMPTS, digit_fraction

from tether.config import resolve_config
from tether.rewards.functions import RewardScorer
from tether.train.loop import Trainer


def make_trainer(path, algo="grpo", **over) -> Trainer:
    raw = {"model": {"path": path}, "algorithm": {"name": algo}, "steps": 30, "seed": 0,
           "rollout": {"max_new_tokens": 4, "prompts_per_step": 8, "group_size": 4},
           "optim": {"lr": 1e-2, "critic_lr": 1e-3}}
    cfg = resolve_config(raw, [f"{k}={v}" for k, v in over.items()])
    return Trainer(cfg, rows=PROMPTS, reward_fn=RewardScorer([(digit_fraction, 1.0)]))


def rewards(trainer: Trainer, steps: int) -> list[float]:
    return [trainer.step().metrics["reward/mean"] for _ in range(steps)]


# Measured (20 steps, lr 1e-2): fp32 0.08 -> 0.73, bf16 autocast 0.08 -> 0.74 (first 4 vs last 4 steps).
def test_bf16_autocast_learns_like_fp32(llama):
    fp32 = rewards(make_trainer(llama), 20)
    t = make_trainer(llama, **{"model.autocast": "bfloat16"})
    bf16 = rewards(t, 20)
    assert all(p.dtype == torch.float32 for p in t.policy.parameters())  # fp32 master weights
    first = lambda r: sum(r[:4]) / 4
    last = lambda r: sum(r[-4:]) / 4
    assert last(fp32) > first(fp32) + 0.3, fp32
    assert last(bf16) > first(bf16) + 0.3, bf16
    assert abs(last(bf16) - last(fp32)) < 0.25, (fp32, bf16)


def test_bf16_autocast_logprobs_stay_float32(llama):
    t = make_trainer(llama, "ppo", **{"model.autocast": "bfloat16"})
    out = t.step()
    r, m = out.rollout, out.metrics
    for name in ("old_logprobs_BT", "ref_logprobs_BT", "old_values_BT", "advantages_BT"):
        assert getattr(r, name).dtype == torch.float32, name
    assert all(math.isfinite(v) for v in m.values())
    # Sampler and trainer both run under bf16 autocast: they agree to bf16 noise, not to fp32 noise.
    assert m["rollout/logprob_mismatch_max"] < 0.1
    assert m["policy/first_minibatch_ratio_dev"] == 0.0


def test_gradient_checkpointing_gives_the_same_update(llama):
    a = make_trainer(llama, "ppo", **{"optim.share_prompts": "false"})  # as checkpointing runs (same float order)
    ma = a.step().metrics  # each trainer seeds the global RNG at construction: step before building the next
    b = make_trainer(llama, "ppo", **{"model.gradient_checkpointing": "true"})
    assert any(getattr(m, "gradient_checkpointing", False) for m in b.policy.modules())
    mb = b.step().metrics
    assert ma["reward/mean"] == mb["reward/mean"]
    assert ma["loss/policy"] == pytest.approx(mb["loss/policy"], abs=1e-6)
    for model_a, model_b in ((a.policy, b.policy), (a.critic, b.critic)):
        for (k, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
            assert torch.allclose(pa, pb, atol=1e-6), k


def test_frozen_bf16_reference(llama):
    t = make_trainer(llama, "grpo", **{"model.frozen_dtype": "bfloat16"})
    ref = t.reference.model
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.parameters())
    assert all(p.dtype == torch.float32 for p in t.policy.parameters())
    ms = [t.step().metrics for _ in range(2)]
    assert all(math.isfinite(v) for m in ms for v in m.values())
    assert ms[-1]["kl/ref_per_token"] >= 0 and ms[-1]["loss/kl"] > -1e-3  # k3 >= 0 up to bf16 rounding
    assert t.step().rollout.ref_logprobs_BT.dtype == torch.float32


def test_memory_savers_together(llama):
    """bf16 autocast + bf16 reference + gradient checkpointing + token-budget micro-batches, PPO with critic."""
    t = make_trainer(llama, "ppo", **{"model.autocast": "bfloat16", "model.frozen_dtype": "bfloat16",
                                      "model.gradient_checkpointing": "true", "optim.token_budget": 24})
    m = t.step().metrics
    assert all(math.isfinite(v) for v in m.values())
    assert m["update/optimizer_steps"] == 4


# --- bf16 weights with float32 master weights (model.master_weights) --------------------------------------

MASTER = {"model.dtype": "bfloat16", "model.master_weights": "true"}


def test_master_weights_compute_in_bf16_and_step_fp32_masters(llama):
    t = make_trainer(llama, "grpo", **MASTER, **{"optim.lr": 1e-4})
    assert all(p.dtype == torch.bfloat16 for p in t.policy.parameters())
    masters = t.optimizers["policy"].param_groups[0]["params"]
    assert all(m.dtype == torch.float32 for m in masters)
    assert not t.backend.samples_from_copy  # the sampler is the bf16 policy itself
    assert t.sampler_is_exact()
    start = [m.clone() for m in masters]
    t.step()
    moved = max((m - s).abs().max().item() for m, s in zip(masters, start))
    assert 0 < moved < 1e-3  # lr 1e-4: every step is far below bf16's resolution for weights near 1...
    for (p, _), m in zip(t.masters["policy"].pairs, masters):
        assert torch.equal(p, m.to(torch.bfloat16))  # ...yet the bf16 weights follow the rounded masters
    assert all(p.grad is None for p in t.policy.parameters())  # gradients went to the masters in fp32


def test_master_weights_accumulate_updates_that_bf16_alone_rounds_away(llama):
    """Many small steps: the masters move, and pure bf16 weights (model.dtype=bfloat16) would not."""
    t = make_trainer(llama, "grpo", **MASTER, **{"optim.lr": 2e-5})
    pure = make_trainer(llama, "grpo", **{"model.dtype": "bfloat16", "optim.lr": 2e-5})
    norm = dict(t.policy.named_parameters())["model.norm.weight"]  # RMSNorm gains start at exactly 1
    pure_norm = dict(pure.policy.named_parameters())["model.norm.weight"]
    master = t.masters["policy"].params[[n for n, _ in t.policy.named_parameters()].index("model.norm.weight")]
    for _ in range(3):
        t.step()
        pure.step()
    assert torch.equal(pure_norm, torch.ones_like(pure_norm))  # 3 x 2e-5 < 2^-8: bf16 rounds them away
    assert (master - 1).abs().max() > 1e-5  # the fp32 master kept them
    assert torch.equal(norm, master.to(torch.bfloat16))


def test_master_weights_learn_like_fp32(llama):
    fp32 = rewards(make_trainer(llama), 20)
    mixed = rewards(make_trainer(llama, **MASTER), 20)
    first = lambda r: sum(r[:4]) / 4
    last = lambda r: sum(r[-4:]) / 4
    assert last(mixed) > first(mixed) + 0.3, mixed
    assert abs(last(mixed) - last(fp32)) < 0.25, (fp32, mixed)


def test_master_weights_checkpoint_holds_the_fp32_masters_and_resumes(llama, tmp_path):
    from safetensors.torch import load_file

    cfg_over = {**MASTER, "algorithm.use_critic": "true", "algorithm.advantage": "gae"}
    raw = {"model": {"path": llama}, "algorithm": {"name": "ppo"}, "steps": 30, "seed": 0,
           "rollout": {"max_new_tokens": 4, "prompts_per_step": 8, "group_size": 4},
           "optim": {"lr": 1e-3, "critic_lr": 1e-3}}
    cfg = resolve_config(raw, [f"{k}={v}" for k, v in cfg_over.items()])
    t = Trainer(cfg, rows=PROMPTS, reward_fn=RewardScorer([(digit_fraction, 1.0)]), run_dir=tmp_path / "run")
    t.step()
    path = t.save(keep_last=2)
    saved = load_file(str(path / "policy" / "model.safetensors"))
    names = [n for n, _ in t.policy.named_parameters()]
    for name, master in zip(names, t.masters["policy"].params):
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], master), name
    assert all(p.dtype == torch.bfloat16 for p in t.policy.parameters())  # back to bf16 after the save
    masters_at_save = {w: [m.clone() for m in t.masters[w].params] for w in ("policy", "critic")}
    weights_at_save = {w: [p.clone() for p, _ in t.masters[w].pairs] for w in ("policy", "critic")}
    next_loss = t.step().metrics["loss/total"]  # the global RNG is restored by load() below: step first

    again = Trainer(cfg, rows=PROMPTS, reward_fn=RewardScorer([(digit_fraction, 1.0)]), run_dir=tmp_path / "run")
    again.load(path)
    for which in ("policy", "critic"):
        for a, b in zip(masters_at_save[which], again.masters[which].params):
            assert b.dtype == torch.float32 and torch.equal(a, b)
        for p, (q, _) in zip(weights_at_save[which], again.masters[which].pairs):
            assert q.dtype == torch.bfloat16 and torch.equal(p, q)
    assert again.step().metrics["loss/total"] == next_loss


@pytest.mark.parametrize("over, message", [
    ({"model.master_weights": "true"}, "model.dtype=bfloat16"),
    ({**MASTER, "model.autocast": "bfloat16"}, "drop model.autocast"),
])
def test_master_weights_config_errors(llama, over, message):
    from tether.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        make_trainer(llama, **over)


def test_autocast_samples_from_a_bf16_copy_unless_told_otherwise(llama):
    t = make_trainer(llama, "grpo", **{"model.autocast": "bfloat16"})
    assert t.backend.samples_from_copy and not t.sampler_is_exact()
    assert all(p.dtype == torch.bfloat16 for p in t.backend.policy.parameters())
    m = t.step().metrics
    assert m["rollout/logprob_mismatch_max"] < 0.1  # a bf16 copy: bf16 noise, logged every step
    same = make_trainer(llama, "grpo", **{"model.autocast": "bfloat16", "rollout.weights_dtype": "policy"})
    assert not same.backend.samples_from_copy and same.backend.policy is same.policy


def test_master_weights_with_lora_keep_fp32_adapters_over_a_bf16_base(llama, tmp_path):
    from safetensors.torch import load_file

    raw = {"model": {"path": llama, "dtype": "bfloat16", "master_weights": True, "lora": {"r": 4}},
           "algorithm": {"name": "grpo"}, "steps": 5, "seed": 0,
           "rollout": {"max_new_tokens": 4, "prompts_per_step": 8, "group_size": 4}, "optim": {"lr": 1e-2}}
    t = Trainer(resolve_config(raw, []), rows=PROMPTS, reward_fn=RewardScorer([(digit_fraction, 1.0)]),
                run_dir=tmp_path / "run")
    masters = t.masters["policy"].params
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert len(masters) == sum(p.requires_grad for p in t.policy.parameters())  # adapters only
    frozen = {n: p.clone() for n, p in t.policy.named_parameters() if not p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    for _ in range(2):
        assert math.isfinite(t.step().metrics["loss/total"])
    assert all(torch.equal(p, frozen[n]) for n, p in t.policy.named_parameters() if not p.requires_grad)
    saved = load_file(str(t.save(keep_last=1) / "policy" / "adapter_model.safetensors"))
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
