"""LoRA policies: only adapters train, the reference is exactly the base model, checkpoints hold the adapter
alone and resume, and `tether merge-lora` gives a plain model with the LoRA policy's logits."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PROMPTS, digit_fraction
from transformers import AutoModelForCausalLM

from tether import models as M
from tether.config import resolve_config
from tether.rewards.functions import RewardScorer
from tether.train.forward import policy_logprobs, split_micro_batches
from tether.train.loop import Trainer


def make_trainer(path, algo="grpo", run_dir=None, **over) -> Trainer:
    raw = {"model": {"path": path, "lora": {"r": 4, "alpha": 8}}, "algorithm": {"name": algo}, "steps": 30,
           "seed": 0, "rollout": {"max_new_tokens": 4, "prompts_per_step": 8, "group_size": 4},
           "optim": {"lr": 1e-2, "critic_lr": 1e-3}}
    cfg = resolve_config(raw, [f"{k}={v}" for k, v in over.items()])
    return Trainer(cfg, rows=PROMPTS, reward_fn=RewardScorer([(digit_fraction, 1.0)]), run_dir=run_dir)


def split(state: dict) -> tuple[dict, dict]:
    adapters = {k: v.detach().clone() for k, v in state.items() if "lora_" in k}
    base = {k: v.detach().clone() for k, v in state.items() if "lora_" not in k}
    return base, adapters


def rollout_logprobs(model, rollout, temperature=1.0) -> torch.Tensor:
    out = torch.zeros_like(rollout.response_mask_BT)
    with torch.no_grad():
        for mb in split_micro_batches(rollout, torch.arange(len(rollout)), micro_batch_size=64):
            lp, _ = policy_logprobs(model, mb, temperature=temperature, with_entropy=False)
            out[mb.index, :lp.shape[1]] = lp
    return out * rollout.response_mask_BT


@pytest.fixture(scope="module")
def trained(llama):
    """A LoRA GRPO trainer after 3 steps, with its initial weights."""
    t = make_trainer(llama)
    base0, adapters0 = split(t.policy.state_dict())
    steps = [t.step() for _ in range(3)]
    return t, base0, adapters0, steps


def test_only_adapter_weights_train(trained):
    t, base0, adapters0, steps = trained
    assert M.is_peft(t.policy) and adapters0
    trainable = {n for n, p in t.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimised = sum(p.numel() for g in t.optimizers["policy"].param_groups for p in g["params"])
    assert optimised == sum(p.numel() for p in t.policy.parameters() if p.requires_grad)
    base, adapters = split(t.policy.state_dict())
    assert base.keys() == base0.keys()
    assert all(torch.equal(base[k], base0[k]) for k in base)  # bit-identical base weights
    moved = [k for k in adapters if not torch.equal(adapters[k], adapters0[k])]
    assert len(moved) == len(adapters), set(adapters) - set(moved)
    assert all(s.metrics["update/optimizer_steps"] == t.cfg.algorithm.minibatches for s in steps)


def test_reference_is_the_base_model(trained, llama):
    t, *_ = trained
    assert t.reference.model is None and t.reference.adapter_host is t.policy  # no second copy in memory
    rollout = t.step().rollout  # ref log-probs of this batch were taken with the adapters switched off
    base = M.freeze(M.load_causal_lm(llama))
    expected = rollout_logprobs(base, rollout)
    assert torch.allclose(rollout.ref_logprobs_BT, expected, atol=1e-5)
    # ... and the adapters are not a no-op: the LoRA policy's log-probs differ from the base model's.
    t.policy.eval()
    policy_lp = rollout_logprobs(t.policy, rollout)
    t.policy.train()
    assert (policy_lp - expected).abs().max() > 1e-2


def test_merge_lora_gives_a_plain_model_with_the_same_logits(trained, tmp_path):
    from tether.cli import main

    t, *_ = trained
    adapter = tmp_path / "adapter"
    t.policy.save_pretrained(adapter)
    assert (adapter / "adapter_config.json").exists()
    assert main(["merge-lora", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not M.is_peft(merged) and not any("lora_" in k for k in merged.state_dict())
    ids = t.tokenizer(["abc", "hello 12"], return_tensors="pt", padding=True)
    t.policy.eval()
    with torch.no_grad():
        want = t.policy(**ids).logits
        got = merged(**ids).logits
    t.policy.train()
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_checkpoint_holds_the_adapter_alone_and_resumes(llama, tmp_path):
    from tether.train.checkpoint import latest_checkpoint

    t = make_trainer(llama, run_dir=tmp_path / "run")
    for _ in range(2):
        t.step()
    path = t.save(keep_last=1)
    want = {k: v.clone() for k, v in t.policy.state_dict().items()}
    a = t.step().metrics  # before the resumed trainer exists: the RNG is process-wide, and load() restores it
    assert path is not None and latest_checkpoint(tmp_path / "run") == path
    policy_dir = path / "policy"
    assert (policy_dir / "adapter_config.json").exists()
    names = {f.name for f in policy_dir.iterdir()}
    assert "model.safetensors" not in names and "pytorch_model.bin" not in names, names
    weight_bytes = sum(f.stat().st_size for f in policy_dir.iterdir()
                       if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    base_bytes = sum(p.numel() * p.element_size() for n, p in t.policy.named_parameters() if "lora_" not in n)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in t.policy.named_parameters() if "lora_" in n)
    assert 0 < weight_bytes < adapter_bytes + base_bytes / 4, (weight_bytes, adapter_bytes, base_bytes)

    resumed = make_trainer(llama, run_dir=tmp_path / "resumed")
    resumed.load(path)
    assert resumed.step_count == 2
    got = resumed.policy.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # adapter restored, base as loaded
    b = resumed.step().metrics
    assert resumed.step_count == 3 and all(math.isfinite(v) for v in b.values())
    assert a["loss/policy"] == pytest.approx(b["loss/policy"], abs=1e-6)  # same state, RNG and data order
