"""The matmul attention of one-token decode steps: exact math, SDPA's results, and sampling with it."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tether.models import load_causal_lm, load_tokenizer
from tether.rollout import decode_attention
from tether.rollout.decode_attention import NAME, installed, matmul_decode_attention
from tether.rollout.speedups import use_matmul_decode
from tether.rollout.hf import HFGenerateBackend
from tether.tasks.tiny_model import build_tiny_model


def reference_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale + mask) v in float64, each query head h reading KV head h // (H / Hkv)."""
    H, Hkv = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(H // Hkv, dim=1)
    v = v.double().repeat_interleave(H // Hkv, dim=1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [B, Q, H, D]


def inputs(heads, kv_heads, mask_kind, dtype, B=3, S=7, D=8, Q=1):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, heads, Q, D, generator=g).to(dtype)
    k = torch.randn(B, kv_heads, S, D, generator=g).to(dtype)
    v = torch.randn(B, kv_heads, S, D, generator=g).to(dtype)
    keep = torch.ones(B, 1, Q, S, dtype=torch.bool)
    keep[0, ..., :3] = False  # a left-padded row
    keep[2, ..., 1] = False
    mask = {"none": None, "bool": keep,
            "float": torch.zeros(B, 1, Q, S, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)}[mask_kind]
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    return module, q, k, v, mask


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_decode_step_is_exact_attention(heads, kv_heads, mask_kind):
    module, q, k, v, mask = inputs(heads, kv_heads, mask_kind, torch.float32)
    out, weights = matmul_decode_attention(module, q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (3, 1, heads, 8)
    want = reference_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)
    sdpa, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(out, sdpa, atol=1e-6, rtol=1e-6)


def test_decode_step_in_bf16_is_as_close_to_exact_as_sdpa():
    module, q, k, v, mask = inputs(8, 2, "bool", torch.bfloat16, B=4, S=40, D=16)
    want = reference_attention(q, k, v, mask, 0.25)
    ours = (matmul_decode_attention(module, q, k, v, mask, scaling=0.25)[0].double() - want).abs().max()
    sdpa = (sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0].double() - want).abs().max()
    assert ours <= max(2 * sdpa, 1e-2), (ours, sdpa)  # bf16: both round the output to 8 bits of mantissa


def test_longer_queries_and_soft_capping_go_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(decode_attention, "sdpa_attention_forward",
                        lambda *a, **kw: calls.append(a[1].shape[2]) or (None, None))
    module, q, k, v, mask = inputs(4, 2, "bool", torch.float32, Q=7)
    matmul_decode_attention(module, q, k, v, mask, scaling=0.3)  # a prompt: 7 query tokens
    module, q, k, v, mask = inputs(4, 2, "bool", torch.float32)
    matmul_decode_attention(module, q, k, v, mask, scaling=0.3, softcap=30.0)  # not implemented here
    assert calls == [7, 1]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_sampling_with_matmul_decode_matches_the_models_attention(tmp_path, arch, monkeypatch, assert_same_samples):
    """Same tokens and log-probs (float32) as the model's SDPA attention, with left-padded prompts; the
    decode steps did take the matmul path, and the model is back on SDPA afterwards."""
    path = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2)
    tok = load_tokenizer(str(path))
    policy = load_causal_lm(str(path))
    assert policy.config._attn_implementation == "sdpa"
    if arch == "mistral":
        policy.config.sliding_window = 4  # the window is part of the mask both paths read
    decode_calls = []
    registered = AttentionInterface._global_mapping[NAME]
    monkeypatch.setitem(AttentionInterface._global_mapping, NAME,
                        lambda m, q, *a, **kw: decode_calls.append(q.shape[2]) or registered(m, q, *a, **kw))

    def back_on_sdpa():
        assert policy.config._attn_implementation == "sdpa"

    assert_same_samples(policy, tok, {"decode_attention": "model"}, {"decode_attention": "matmul"},
                        after=back_on_sdpa)
    assert decode_calls.count(1) >= 2 * 8  # every layer of the decode steps (and prompts' last tokens)


def test_installed_restores_the_implementation_and_skips_other_attentions(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1)
    model = load_causal_lm(str(path))
    with pytest.raises(RuntimeError, match="interrupted"):
        with installed(model):
            assert model.config._attn_implementation == NAME
            raise RuntimeError("interrupted")
    assert model.config._attn_implementation == "sdpa"
    with installed(model, enabled=False):
        assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with installed(model):
        assert model.config._attn_implementation == "eager"


def test_unknown_decode_attention_is_refused(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match="decode_attention"):
        HFGenerateBackend(load_causal_lm(str(path)), load_tokenizer(str(path)), max_new_tokens=2,
                          decode_attention="flash")


def test_auto_uses_matmuls_unless_the_cpu_has_amx(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for amx in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert use_matmul_decode("auto") is (not amx)
        assert use_matmul_decode("matmul") and not use_matmul_decode("model")


@pytest.mark.parametrize("cap,amx", [(None, True), ("AVX2", False), ("AVX512_CORE_BF16", False),
                                     ("AVX512_CORE_AMX", True), ("ALL", True), ("NOT_AN_ISA", False)])
def test_onednn_isa_cap_hides_amx_from_auto(monkeypatch, cap, amx):
    """ONEDNN_MAX_CPU_ISA caps what oneDNN uses: a Xeon capped below AMX chooses as a CPU without it."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert use_matmul_decode("auto") is (not amx)


def test_a_moved_transformers_internal_turns_the_speed_up_off_not_the_import(tmp_path, monkeypatch, caplog):
    """Registration happens on first use, guarded: with transformers' interface gone, sampling keeps the
    model's own attention (a warning), and importing the sampler never fails."""
    import sys
    import types

    from tether.rollout import decode_attention

    decode_attention.registered.cache_clear()
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", types.ModuleType("transformers.masking_utils"))
    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1)
    model = load_causal_lm(str(path))
    with caplog.at_level("WARNING", logger="tether"):
        with decode_attention.installed(model):
            assert model.config._attn_implementation == "sdpa"
    assert "attention interface is not where it was" in caplog.text
    decode_attention.registered.cache_clear()
    monkeypatch.undo()
    with decode_attention.installed(model):
        assert model.config._attn_implementation == decode_attention.NAME
