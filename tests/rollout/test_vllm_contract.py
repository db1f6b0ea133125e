"""The vLLM backend against a fake engine (fake_vllm.py) that implements exactly the vLLM 0.11 calls tether
makes, on CPU: the call sequence, the weight names and buckets, sleep mode, token-in prompts and token-out
completions, and the sampler/trainer log-prob check before and after a weight sync. The real engine runs
only where CUDA and vLLM are (test_vllm.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tether.config import resolve_config
from tether.rewards.functions import RewardScorer
from tether.tasks.tiny_model import build_tiny_model
from tether.train.loop import Trainer


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("llama"), hidden_size=32, num_layers=2, seed=0))


@pytest.fixture
def fake_vllm(monkeypatch):
    spec = importlib.util.spec_from_file_location("vllm", Path(__file__).with_name("fake_vllm.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vllm", module)  # before exec: its dataclasses look their module up
    spec.loader.exec_module(module)
    monkeypatch.setattr("tether.rollout.vllm.require_cuda", lambda: None)  # the one thing a CPU lacks
    return module


def length_reward(prompts, completions, **_):
    return [len(c) / 8 for c in completions]


def trainer(path, **over) -> Trainer:
    raw = {"model": {"path": path}, "algorithm": {"name": "grpo"}, "seed": 0, "steps": 3,
           "rollout": {"backend": "vllm", "max_new_tokens": 6, "prompts_per_step": 3, "group_size": 2},
           "optim": {"lr": 1e-2}, "logging": {"progress": False}}
    cfg = resolve_config(raw, [f"{k}={v}" for k, v in over.items()])
    rows = [{"prompt": p} for p in ("1+1=", "12+34=", "9=", "7*8=", "100-1=", "3+3=")]
    return Trainer(cfg, rows=rows, reward_fn=RewardScorer([(length_reward, 1.0)]))


def test_token_in_token_out_and_logprobs_match_the_trainer_before_and_after_a_sync(fake_vllm, llama):
    t = trainer(llama)
    llm = t.backend.llm
    assert llm.engine_args["logprobs_mode"] == "processed_logprobs"
    assert llm.engine_args["worker_extension_cls"] == "tether.rollout.vllm.WeightLoader"
    for step in range(2):
        res = t.step()
        r, m = res.rollout, res.metrics
        # The fp32 fake samples from the very policy: the gap is float order, as for HF generate (1e-4).
        assert m["rollout/logprob_mismatch_max"] < 1e-4, (step, m["rollout/logprob_mismatch_max"])
        assert m["policy/first_minibatch_ratio_dev"] == 0.0
        # Token in: every prompt went as ids, the trainer's own (left padding stripped); token out: the
        # completion block is vLLM's token_ids as returned.
        gens = [c for c in llm.calls if c[0] == "generate"]
        assert gens[-1] == ("generate", 3) and len(r) == 6
    # After the update the weights were pushed (one bucket here) and the prefix cache reset, before the
    # next generate; a policy that did not reach vLLM would have failed the mismatch check at step 2.
    names = [c[0] for c in llm.calls]
    first_gen, second_gen = [i for i, n in enumerate(names) if n == "generate"][:2]
    between = names[first_gen + 1:second_gen]
    assert between == ["collective_rpc", "reset_prefix_cache"], between
    assert ("collective_rpc", "tether_load_weights") in llm.calls


def test_weights_go_in_buckets_under_their_checkpoint_names(fake_vllm, llama):
    from tether.rollout.vllm import buckets, hf_weight_names

    t = trainer(llama, **{"rollout.vllm_sync_bucket_mb": 0.01})  # ~10 KB: many buckets for the tiny model
    llm = t.backend.llm
    seen = []
    original = llm.worker.tether_load_weights

    def spy(weights):
        seen.append([name for name, _ in weights])
        assert all(w.device.type == "cpu" for _, w in weights)
        return original(weights)

    llm.worker.tether_load_weights = spy
    t.backend.sync_weights(t.policy)
    flat = [n for b in seen for n in b]
    names = [n for n, _ in hf_weight_names(t.policy)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: sent once
    assert len(seen) > 2 and sorted(flat) == sorted(names) == sorted(set(flat))  # each weight once
    sizes = [sum(w.numel() * w.element_size() for _, w in b) for b in buckets(hf_weight_names(t.policy), 10_000)]
    assert all(s <= 10_000 for s, b in zip(sizes, seen) if len(b) > 1)


def test_lora_is_merged_for_the_copy_and_names_are_the_base_models(fake_vllm, llama):
    t = trainer(llama, **{"model.lora.r": 4, "model.lora.alpha": 8})
    with torch.no_grad():  # a non-zero adapter, so merging changes the weights
        for name, p in t.policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    base = {k: v.clone() for k, v in t.policy.state_dict().items() if "base_layer" in k}
    t.backend.sync_weights(t.policy)
    # The trained base weights are untouched (merged for the copy only, not merged and unmerged in place).
    assert base and all(torch.equal(v, t.policy.state_dict()[k]) for k, v in base.items())
    t.policy.merge_adapter()
    merged = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v.clone()
              for k, v in t.policy.state_dict().items() if "lora_" not in k}
    t.policy.unmerge_adapter()
    engine = dict(t.backend.llm.hf.state_dict())
    assert set(merged) == set(engine)  # tied lm_head included: the engine's shares the embedding
    for k, v in merged.items():  # W + B A x scale: computed out of place here, by peft in place there
        torch.testing.assert_close(engine[k], v, rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(engine[q], base[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"])
    m = t.step().metrics
    assert m["rollout/logprob_mismatch_max"] < 1e-4


def test_sleep_mode_wraps_the_update(fake_vllm, llama):
    t = trainer(llama, **{"rollout.vllm_sleep": "true"})
    llm = t.backend.llm
    assert llm.engine_args["enable_sleep_mode"] is True
    for _ in range(2):
        t.step()
    calls = [c for c in llm.calls if c[0] != "LLM"]
    # generate -> sleep (the update runs) -> weights awake -> load -> KV awake -> reset -> generate -> sleep
    i = calls.index(("generate", 3))
    assert calls[i + 1:i + 3] == [("reset_prefix_cache",), ("sleep", 1)]
    j = calls.index(("wake_up", ("weights",)))
    assert calls[j + 1] == ("collective_rpc", "tether_load_weights")
    k = calls.index(("wake_up", ("kv_cache",)))
    assert j < k and calls[k + 1] == ("reset_prefix_cache",) and calls[k + 2][0] == "generate"


def test_truncated_sampling_is_exact_through_vllm_too(fake_vllm, llama):
    """processed_logprobs with top-p 0.9: the trainer's truncated log-probs are the sampler's."""
    m = trainer(llama, **{"rollout.top_p": 0.9, "rollout.top_k": 20}).step().metrics
    assert m["rollout/logprob_mismatch_max"] < 1e-4, m["rollout/logprob_mismatch_max"]


def test_an_older_vllm_is_a_clear_error(fake_vllm, llama, monkeypatch):
    from tether.rollout.vllm import VLLMVersionError

    monkeypatch.setattr(fake_vllm, "__version__", "0.9.2")
    with pytest.raises(VLLMVersionError, match=r"vLLM 0.9.2 is installed; .* supports >= 0.10.2, < 0.12.0"):
        trainer(llama)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, llama):
    """A tiny Qwen2 (biases on q/k/v, lm_head untied) with the tiny Llama's tokenizer."""
    import shutil

    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("qwen2")
    for f in Path(llama).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    base = AutoConfig.from_pretrained(llama)
    config = Qwen2Config(vocab_size=base.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                         pad_token_id=base.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lora", [False, True])
def test_one_sync_fills_every_vllm_parameter_exactly_once(fake_vllm, llama, qwen2, arch, lora):
    """vLLM's Llama and Qwen2 fuse q/k/v and gate/up: every fused parameter must get each of its shards, every
    other parameter its weight, once per sync, from the names tether sends (LoRA merged for the copy)."""
    from tether.rollout.vllm import hf_weight_names

    over = {"model.lora.r": 4, "model.lora.alpha": 8} if lora else {}
    t = trainer(llama if arch == "llama" else qwen2, **over)
    model = t.backend.llm.worker.model_runner.model
    assert ("model.layers.0.self_attn.qkv_proj.bias" in model.params) == (arch == "qwen2")
    assert ("lm_head.weight" in model.params) == (arch == "qwen2")  # the tiny Llama ties its embeddings
    model.loads.clear()
    t.backend.sync_weights(t.policy)
    assert model.unfilled(model.loads) == {}
    assert len(model.loads) == sum(len(shards) for shards in model.params.values())
    expected = sum(w.double().pow(2).sum().item() for _, w in hf_weight_names(t.policy))
    assert t.backend.sum_of_squares() == [pytest.approx(expected, rel=1e-12)]


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def names_model(path: str, lora: bool):
    """The tiny model as the sync sees it: plain, or with a LoRA adapter whose delta W is not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora:
        torch.manual_seed(0)  # the same adapter in every process
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.1)
    return model


def _fsdp_names_worker(spec_path: str) -> None:
    """One rank: the model sharded with FSDP2 as the trainer shards it, then the weights the sync would send."""
    import torch.distributed as tdist

    from tether.rollout.vllm import hf_weight_names
    from tether.train.distributed import shard_model

    spec = json.loads(Path(spec_path).read_text())
    tdist.init_process_group("gloo")
    model = shard_model(names_model(spec["model"], spec["lora"]), tdist.get_world_size())
    sent = {name: t.detach().clone() for name, t in hf_weight_names(model)}
    if tdist.get_rank() == 0:
        torch.save(sent, spec["out"])
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_sharded_weights_go_gathered_under_the_same_names(llama, qwen2, tmp_path, lora):
    """Under FSDP2 each rank holds a shard of every weight (and of the LoRA factors); the sync gathers them, so
    the names and values it sends are those of the unsharded model, merged adapter included."""
    from tether.rollout.vllm import hf_weight_names

    for path in (llama, qwen2):
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"model": path, "lora": lora, "out": str(tmp_path / "sent.pt")}))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, str(spec)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
        sent = torch.load(tmp_path / "sent.pt", weights_only=True)
        want = dict(hf_weight_names(names_model(path, lora)))
        assert list(sent) == list(want)
        for name, tensor in want.items():
            torch.testing.assert_close(sent[name], tensor, rtol=0, atol=1e-6, msg=name)


if __name__ == "__main__":
    _fsdp_names_worker(sys.argv[1])
