"""HF generate backend: left padding, masks, stop strings, pad-less tokenizers, chat templates, the
preallocated KV cache and the bf16 sampler copy."""

import pytest
import torch

from tether.models import load_causal_lm, load_tokenizer
from tether.rollout.hf import HFGenerateBackend, completion_mask
from tether.rollout.kv_cache import PreallocatedLayer, preallocated_cache
from tether.rollout.shared_prompts import CACHE_KWARG
from tether.tasks.tiny_model import build_tiny_model


def test_completion_mask_hand_example():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 9], [5, 6, 7, 8], [2, 9, 9, 9]])
    mask, truncated = completion_mask(ids, [eos], torch.tensor([4, 4, 4]))
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_tokenizer_without_pad_token_uses_eos(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=32, with_pad_token=False)
    tok = load_tokenizer(str(path))
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
    model = load_causal_lm(str(path))
    backend = HFGenerateBackend(model, tok, max_new_tokens=6)
    torch.manual_seed(0)
    r = backend.generate([{"prompt": "1+1="}, {"prompt": "12+34="}], ["1+1=", "12+34="], group_size=3)
    assert len(r) == 6 and r.response_mask_BT.shape[1] <= 6
    # Rows of one group share the prompt; the prompt block is left-padded.
    assert r.prompts == ["1+1="] * 3 + ["12+34="] * 3
    assert r.attention_mask_BL[0, 0] == 0 and r.attention_mask_BL[3, 0] == 1


def test_rollout_tensors_can_enter_a_training_forward(tmp_path):
    """generate runs under inference mode; what it returns must still be usable (and saved) by autograd."""
    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1)
    tok, model = load_tokenizer(str(path)), load_causal_lm(str(path))
    r = HFGenerateBackend(model, tok, max_new_tokens=4).generate([{}], ["1+1="], group_size=2)
    tensors = [r.input_ids_BL, r.attention_mask_BL, r.response_mask_BT, r.sampler_logprobs_BT, r.truncated_B]
    assert not any(t.is_inference() for t in tensors)
    logits = model(input_ids=r.input_ids_BL, attention_mask=r.attention_mask_BL).logits
    loss = (logits[:, -r.response_mask_BT.shape[1]:].float().logsumexp(-1) * r.response_mask_BT).sum()
    (loss - r.sampler_logprobs_BT.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_stop_strings_end_completions(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=32)
    tok = load_tokenizer(str(path))
    model = load_causal_lm(str(path))
    stops = list("aeiou")
    backend = HFGenerateBackend(model, tok, max_new_tokens=24, stop_strings=stops)
    torch.manual_seed(0)
    r = backend.generate([{"prompt": "x"}], ["x"], group_size=16)
    ended = 0
    for text, trunc in zip(r.completions, r.truncated_B.tolist()):
        hits = [text.find(s) for s in stops if s in text]
        if not trunc and hits:
            ended += 1
            assert text[-1] in stops and min(hits) == len(text) - 1  # stops right after the first vowel
    assert ended > 0


def test_chat_template_wraps_prompts(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=32)
    tok = load_tokenizer(str(path))
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    model = load_causal_lm(str(path))
    backend = HFGenerateBackend(model, tok, max_new_tokens=2, chat_template=True)
    r = backend.generate([{"prompt": "hi"}], ["hi"], group_size=1)
    prompt_ids = r.input_ids_BL[0, :r.prompt_len][r.attention_mask_BL[0, :r.prompt_len].bool()]
    assert tok.decode(prompt_ids) == "[user]hi[assistant]"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("capacity_short", [False, True])
def test_preallocated_kv_cache_samples_exactly_what_the_dynamic_cache_does(tmp_path, arch, capacity_short):
    path = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2)
    tok = load_tokenizer(str(path))
    model = load_causal_lm(str(path)).eval()
    ids, mask = tok(["1+1=", "123+4="], padding=True, return_tensors="pt").values()
    P, T = ids.shape[1], 12

    def sample(cache):
        torch.manual_seed(0)
        extra = {CACHE_KWARG: cache} if cache is not None else {}
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                              max_new_tokens=T, pad_token_id=tok.pad_token_id, **extra)

    # A too-small capacity must grow the buffer (and still be exact).
    cache = preallocated_cache(model, 3 if capacity_short else P + T)
    assert cache is not None and any(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    assert torch.equal(sample(None), sample(cache))
    assert cache.get_seq_length() == P + T - 1  # the last sampled token is never fed back


def test_sliding_window_models_keep_hf_cache(tmp_path):
    path = build_tiny_model(tmp_path / "mistral", arch="mistral", hidden_size=32, num_layers=2)
    assert preallocated_cache(load_causal_lm(str(path)), 16) is None  # generate then builds its own


def test_preallocated_layer_survives_a_batch_select():
    layer = PreallocatedLayer(capacity=8)
    k = torch.randn(3, 2, 4, 5)
    layer.update(k, k + 1)
    layer.batch_select_indices(torch.tensor([0, 2]))
    new = torch.randn(2, 2, 1, 5)
    keys, values = layer.update(new, new + 1)
    assert torch.equal(keys, torch.cat([k[[0, 2]], new], 2))
    assert torch.equal(values, torch.cat([k[[0, 2]] + 1, new + 1], 2))


def test_bf16_sampler_copy_follows_the_policy(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=32)
    tok = load_tokenizer(str(path))
    policy = load_causal_lm(str(path))
    backend = HFGenerateBackend(policy, tok, max_new_tokens=4, weights_dtype=torch.bfloat16)
    assert backend.samples_from_copy and backend.policy is not policy
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in backend.policy.parameters())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.25)
    before = [p.clone() for p in backend.policy.parameters()]
    backend.sync_weights(policy)
    for p, q, old in zip(policy.parameters(), backend.policy.parameters(), before):
        assert torch.equal(q, p.to(torch.bfloat16)) and not torch.equal(q, old)
    r = backend.generate([{"prompt": "1+1="}], ["1+1="], group_size=2)
    assert torch.isfinite(r.sampler_logprobs_BT).all() and len(r) == 2
    # The same dtype as the policy: no copy, generate runs on the policy itself.
    same = HFGenerateBackend(policy, tok, max_new_tokens=4, weights_dtype=torch.float32)
    assert not same.samples_from_copy and same.policy is policy


def test_sampler_copy_of_a_lora_policy_refreshes_the_adapters(tmp_path):
    from tether.models import apply_lora

    path = build_tiny_model(tmp_path / "m", hidden_size=32)
    tok = load_tokenizer(str(path))
    policy = apply_lora(load_causal_lm(str(path)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    backend = HFGenerateBackend(policy, tok, max_new_tokens=4, weights_dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.fill_(0.5)
    backend.sync_weights(policy)
    copied = dict(backend.policy.named_parameters())
    for name, p in policy.named_parameters():
        assert torch.equal(copied[name], p.to(torch.bfloat16)), name


@pytest.mark.parametrize("lora", [False, True])
def test_compiled_sampling_matches_eager_and_leaves_the_model_eager(tmp_path, lora):
    """rollout.compile: generate runs the compiled forward (dynamic shapes: a new prompt length or batch
    compiles nothing new), samples what eager sampling does, and the model's own forward is back after."""
    from tether.models import apply_lora
    from tether.rollout.compiled_forward import forward_host

    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=2)
    tok = load_tokenizer(str(path))
    policy = load_causal_lm(str(path))
    if lora:
        policy = apply_lora(policy, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    graphs = []

    def counting_backend(gm, example_inputs):  # runs each captured graph as traced (no Inductor: fast)
        graphs.append(gm)
        return gm.forward

    eager = HFGenerateBackend(policy, tok, max_new_tokens=6)
    compiled = HFGenerateBackend(policy, tok, max_new_tokens=6, compile_backend=counting_backend)
    batches = [(["1+1=", "12+34="], 3), (["123+456=", "7+8=", "9="], 2)]  # other prompt length and batch
    seen = []
    for prompts, group in batches:
        rows = [{"prompt": p} for p in prompts]
        torch.manual_seed(0)
        want = eager.generate(rows, prompts, group_size=group)
        torch.manual_seed(0)
        got = compiled.generate(rows, prompts, group_size=group)
        assert torch.equal(want.input_ids_BL, got.input_ids_BL)
        assert torch.allclose(want.sampler_logprobs_BT, got.sampler_logprobs_BT, atol=1e-5)
        assert "forward" not in vars(forward_host(policy))  # the class's eager forward again
        seen.append(len(graphs))
    assert seen[0] > 0 and seen[1] == seen[0]  # compiled on the first batch, reused on the second


def test_compiled_forward_is_removed_when_generate_fails(tmp_path):
    from tether.rollout.compiled_forward import CompiledForward

    model = load_causal_lm(str(build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1)))
    with pytest.raises(RuntimeError, match="interrupted"):
        with CompiledForward("eager").installed(model):
            assert "forward" in vars(model)
            raise RuntimeError("interrupted")
    assert "forward" not in vars(model)


@pytest.mark.parametrize("arch,compiled", [("llama", False), ("gpt2", False), ("mistral", False), ("llama", True)])
def test_shared_prompt_prefill_samples_what_per_row_prefill_does(tmp_path, arch, compiled):
    """optim.share_prompts: each distinct prompt is prefilled once (all but its last token), its KV gathered
    out to the group's rows; generate continues from there and samples the same tokens."""
    path = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2)
    tok = load_tokenizer(str(path))
    policy = load_causal_lm(str(path))
    prompts = ["1+1=", "12+34=", "9="]  # left padding inside the block
    rows = [{"prompt": p} for p in prompts]
    widths = []
    policy.register_forward_pre_hook(lambda m, args, kw: widths.append(tuple(kw["input_ids"].shape)),
                                     with_kwargs=True)
    extra = {"compile_backend": "eager"} if compiled else {}
    results = []
    for share in (False, True):
        widths.clear()
        backend = HFGenerateBackend(policy, tok, max_new_tokens=6, share_prompts=share, **extra)
        torch.manual_seed(0)
        results.append(backend.generate(rows, prompts, group_size=4))
        P = results[-1].prompt_len
        first_call = widths[0]
        assert first_call == ((3, P - 1) if share else (12, P)), first_call  # 3 prompts prefilled, not 12 rows
    per_row, shared = results
    assert torch.equal(per_row.input_ids_BL, shared.input_ids_BL)
    assert torch.allclose(per_row.sampler_logprobs_BT, shared.sampler_logprobs_BT, atol=1e-5)
