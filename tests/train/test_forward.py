"""Forward passes over a rollout: rows that share a prompt run it once, with the numbers and gradients of a
forward over every row."""

from __future__ import annotations

import pytest
import torch

from tether.models import SharedValueHead, apply_lora, load_causal_lm, load_tokenizer
from tether.rollout.hf import HFGenerateBackend
from tether.tasks.tiny_model import build_tiny_model
from tether.train.forward import make_micro_batch, policy_logprobs_and_values


def sampled_rollout(path, policy, group_size=3, prompts=("1+1=", "123+45=", "9=")):
    """Different prompt lengths by default: left padding inside the prompt block."""
    tok = load_tokenizer(str(path))
    backend = HFGenerateBackend(policy, tok, max_new_tokens=7)
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
                                            ("llama", False, "distinct"), ("llama", False, "one-token")])
def test_shared_prompt_forward_gives_the_per_row_numbers_and_gradients(tmp_path, arch, lora, rows):
    """Also with no prompt repeated ("distinct"), and with one-token prompts (which run whole, their logits
    joined to the completions'): the two-pass forward still gives the per-row numbers."""
    path = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2)
    policy = load_causal_lm(str(path))
    if lora:
        policy = apply_lora(policy, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    head = SharedValueHead(32)
    rollout = sampled_rollout(path, policy, **({"prompts": ("1", "2", "3")} if rows == "one-token" else {}))
    mb = make_micro_batch(rollout, torch.tensor([0, 3, 6]) if rows == "distinct" else torch.arange(len(rollout)))
    assert len(mb.prompt_rows) == 3 and (mb.prompt_len == 1) == (rows == "one-token")

    def run(share):
        policy.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        lp, ent, values, _, _ = policy_logprobs_and_values(policy, head, mb, temperature=0.7, with_entropy=True,
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


@pytest.mark.parametrize("lora", [False, True])
def test_exact_kl_to_the_reference_inside_the_micro_batch(tmp_path, lora):
    """kl_estimator=full: the reference runs on the micro-batch, and the KL that comes back is
    sum_j p_j (log p_j - log q_j) at every completion position, with the exact gradient of that KL
    (checked against autograd through a plain log-softmax of both models' logits)."""
    from tether.models import ReferencePolicy

    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=2)
    policy = load_causal_lm(str(path))
    if lora:
        policy = apply_lora(policy, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
        reference = ReferencePolicy(adapter_host=policy)
    else:
        reference = ReferencePolicy(model=load_causal_lm(str(path)).requires_grad_(False))
    with torch.no_grad():  # move the policy away from the reference (for LoRA: the adapter's B is 0 at init)
        for name, p in policy.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in name):
                p.add_(0.3 * torch.randn_like(p))
    rollout = sampled_rollout(path, policy)
    mb = make_micro_batch(rollout, torch.arange(len(rollout)))
    out = policy_logprobs_and_values(policy, None, mb, temperature=0.7, with_entropy=False, reference=reference)
    policy.zero_grad(set_to_none=True)
    out.full_kl.sum().backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    def logits_of(model):
        return model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                     position_ids=mb.position_ids).logits[:, mb.prompt_len - 1:-1] / 0.7

    policy.zero_grad(set_to_none=True)
    logp = torch.log_softmax(logits_of(policy).float(), -1)
    with torch.no_grad(), reference.active() as ref:
        logq = torch.log_softmax(logits_of(ref).float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * mb.response_mask
    kl.sum().backward()
    torch.testing.assert_close(out.full_kl, kl.detach(), rtol=1e-4, atol=1e-6)
    ref_lp = logq.gather(-1, mb.completion_ids[..., None]).squeeze(-1) * mb.response_mask
    torch.testing.assert_close(out.ref_logprobs, ref_lp, rtol=1e-5, atol=1e-5)
    assert (out.full_kl[mb.response_mask.bool()] > 0).all()
    for name, g in got.items():
        # float32, two summation orders of the same gradient (sums over b * t * V terms): errors scale with
        # the tensor's largest entry, not with each entry (measured ~1e-6 of it).
        want = policy.get_parameter(name).grad
        torch.testing.assert_close(g, want, rtol=0, atol=1e-5 * want.abs().max().item(), msg=name)
