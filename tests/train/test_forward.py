"""Forward passes over a rollout: rows that share a prompt run it once, with the numbers and gradients of a
forward over every row."""

from __future__ import annotations

import pytest
import torch

from tether.models import SharedValueHead, apply_lora, load_causal_lm, load_tokenizer
from tether.rollout.hf import HFGenerateBackend
from tether.tasks.tiny_model import build_tiny_model
from tether.train.forward import make_micro_batch, policy_logprobs_and_values


def sampled_rollout(path, policy, group_size=3):
    tok = load_tokenizer(str(path))
    backend = HFGenerateBackend(policy, tok, max_new_tokens=7)
    prompts = ["1+1=", "123+45=", "9="]  # different lengths: left padding inside the prompt block
    torch.manual_seed(0)
    return backend.generate([{"prompt": p} for p in prompts], prompts, group_size=group_size)


def test_micro_batch_finds_rows_that_share_a_prompt(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1)
    rollout = sampled_rollout(path, load_causal_lm(str(path)))
    mb = make_micro_batch(rollout, torch.tensor([0, 4, 1, 3, 8]))  # groups 0, 1, 0, 1, 2
    groups = [0, 1, 0, 1, 2]
    assert len(mb.prompt_rows) == 3
    assert sorted(groups[r] for r in mb.prompt_rows.tolist()) == [0, 1, 2]  # one row of each prompt
    for row, prompt in enumerate(mb.prompt_of_row.tolist()):  # each row points at a row of its own group
        assert groups[mb.prompt_rows[prompt]] == groups[row]
    assert len(make_micro_batch(rollout, torch.tensor([0, 3, 6])).prompt_rows) == 3


@pytest.mark.parametrize("arch,lora,rows", [("llama", False, "all"), ("gpt2", False, "all"),
                                            ("mistral", False, "all"), ("llama", True, "all"),
                                            ("llama", False, "distinct")])
def test_shared_prompt_forward_gives_the_per_row_numbers_and_gradients(tmp_path, arch, lora, rows):
    """Also with no prompt repeated ("distinct"): the two-pass forward still gives the per-row numbers."""
    path = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2)
    policy = load_causal_lm(str(path))
    if lora:
        policy = apply_lora(policy, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    head = SharedValueHead(32)
    rollout = sampled_rollout(path, policy)
    mb = make_micro_batch(rollout, torch.arange(len(rollout)) if rows == "all" else torch.tensor([0, 3, 6]))
    assert len(mb.prompt_rows) == 3

    def run(share):
        policy.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        lp, ent, values = policy_logprobs_and_values(policy, head, mb, temperature=0.7, with_entropy=True,
                                                     share_prompts=share)
        # A loss that reaches every output: gradients flow back through the shared prompt's KV.
        ((lp * torch.linspace(0.5, 1.5, lp.numel()).view_as(lp)).sum() + ent.sum() + values.pow(2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in [*policy.named_parameters(), *head.named_parameters()]
                 if p.grad is not None}
        return lp.detach(), ent.detach(), values.detach(), grads

    want, got = run(False), run(True)
    for a, b in zip(want[:3], got[:3]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert want[3].keys() == got[3].keys() and len(want[3]) > 0
    for name, g in want[3].items():
        assert torch.allclose(g, got[3][name], atol=1e-5, rtol=1e-4), (name, (g - got[3][name]).abs().max())
