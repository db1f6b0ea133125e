import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.tasks.evaluation import greedy_generate
from tether.tasks.tiny_model import build_tiny_model
from tether.train.sft import IGNORE, collate, lr_at, run_sft, tokenize_example

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4)


def _constant_rows(n: int, seed: int) -> list[dict]:
    # Varied prompts, one fixed answer: trivially learnable, and the prompt is irrelevant to the target.
    rng = random.Random(seed)
    return [{"prompt": f"{rng.randint(0, 999)}+{rng.randint(0, 999)}=", "completion": "42"} for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("base"), **SMALL)


def test_labels_mask_prompt_and_padding(base):
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids, labels = tokenize_example(tokenizer, "12+30=", "42")
    prompt_ids = tokenizer("12+30=")["input_ids"]
    completion_ids = tokenizer("42", add_special_tokens=False)["input_ids"]
    assert ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert labels == [IGNORE] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]

    batch = collate([(ids, labels), tokenize_example(tokenizer, "1+1=", "2")], pad_id=tokenizer.pad_token_id)
    short = len(tokenizer("1+1=")["input_ids"]) + 2  # prompt + "2" + EOS
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["labels"][1].tolist() == [IGNORE] * 4 + [tokenizer.convert_tokens_to_ids("2"), tokenizer.eos_token_id] + [IGNORE] * (len(ids) - short)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (len(ids) - short)
    assert (batch["input_ids"][1, short:] == tokenizer.pad_token_id).all()  # right padding


def test_lr_schedule():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55) and lr_at(110, **kw) == pytest.approx(0.1)


def test_sft_learns_a_constant_answer_and_saves(base, tmp_path):
    out = tmp_path / "sft"
    lines: list[str] = []
    metrics = run_sft(base, _constant_rows(512, seed=0), out, steps=40, lr=1e-2, batch_size=32, max_length=16,
                      warmup_steps=5, log=lines.append)
    assert metrics["steps"] == 40 == len(metrics["losses"])
    assert metrics["first_loss"] > 2.0 and metrics["final_loss"] < 0.1
    assert metrics["tokens_per_s"] > 0 and metrics["epochs"] == pytest.approx(40 * 32 / 512)
    assert any("step 40/40" in line for line in lines)
    assert (out / "model.safetensors").exists()

    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    prompts = [r["prompt"] for r in _constant_rows(20, seed=1)]
    before = greedy_generate(AutoModelForCausalLM.from_pretrained(base), tokenizer, prompts, max_new_tokens=4)
    assert before.count("42") == 0
    assert greedy_generate(model, tokenizer, prompts, max_new_tokens=4) == ["42"] * 20


def test_sft_is_deterministic_given_seed(base, tmp_path):
    rows = _constant_rows(64, seed=0)
    kw = dict(steps=3, lr=1e-3, batch_size=8, max_length=16, log=lambda s: None)
    a = run_sft(base, rows, tmp_path / "a", seed=3, **kw)
    b = run_sft(base, rows, tmp_path / "b", seed=3, **kw)
    c = run_sft(base, rows, tmp_path / "c", seed=4, **kw)
    assert a["losses"] == b["losses"] != c["losses"]
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tokenizer_without_pad_token(tmp_path):
    base = build_tiny_model(tmp_path / "nopad", with_pad_token=False, **SMALL)
    assert AutoTokenizer.from_pretrained(base).pad_token is None
    lines: list[str] = []
    metrics = run_sft(base, _constant_rows(64, seed=0), tmp_path / "out", epochs=1, lr=1e-3, batch_size=16,
                      max_length=16, log=lines.append, progress=False)
    assert metrics["steps"] == 4
    assert any("no pad token" in line for line in lines)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.pad_token == tokenizer.eos_token


def test_truncation_and_rows_without_room(base, tmp_path):
    rows = [{"prompt": "1" * 20, "completion": "2"}, {"prompt": "1+1=", "completion": "2" * 30}]
    lines: list[str] = []
    metrics = run_sft(base, rows, tmp_path / "out", steps=1, lr=1e-3, batch_size=2, max_length=16, log=lines.append)
    assert metrics["examples"] == 1
    assert any("truncated" in line for line in lines) and any("skipped 1" in line for line in lines)
    with pytest.raises(ValueError, match="no row has a completion token"):
        run_sft(base, rows[:1], tmp_path / "out2", steps=1, max_length=16, log=lambda s: None)


@pytest.mark.parametrize(
    "rows, kwargs, match",
    [
        ([], {}, "non-empty"),
        ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], {}, "row 1 is missing completion"),
        ([{"completion": "b"}], {}, "row 0 is missing prompt"),
        ([{"prompt": "a", "completion": 3}], {}, "row 0"),
        ([{"prompt": "a", "completion": "b"}], {"steps": 2, "epochs": 1.0}, "either epochs or steps"),
        ([{"prompt": "a", "completion": "b"}], {"steps": 0}, "steps"),
    ],
)
def test_bad_input(base, tmp_path, rows, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_sft(base, rows, tmp_path / "out", log=lambda s: None, **kwargs)
