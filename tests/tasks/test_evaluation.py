import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.tasks import get_task
from tether.tasks.evaluation import _decode_new, evaluate_task, generate, greedy_generate
from tether.tasks.tiny_model import build_tiny_model

# Different lengths, so batches really are left-padded.
PROMPTS = ["1+1=", "37+48=", "reverse:abc4=", "9=", "hello world, ", "12+345=", "x"]


@pytest.fixture(scope="module", params=[True, False], ids=["pad", "no-pad"])
def model_and_tokenizer(request, tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, num_layers=2, num_heads=4, seed=1,
                            with_pad_token=request.param)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _manual_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Reference: one prompt, no padding, no cache, argmax until EOS."""
    ids = tokenizer(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_is_deterministic_and_matches_one_by_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()  # generation must switch to eval mode and back
    tokenizer_state = (tokenizer.padding_side, tokenizer.pad_token)
    batched = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4)
    assert model.training
    assert batched == greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    assert batched == [greedy_generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert batched == [_manual_greedy(model, tokenizer, p, 8) for p in PROMPTS]
    assert all(isinstance(c, str) and len(c) <= 8 for c in batched)
    assert (tokenizer.padding_side, tokenizer.pad_token) == tokenizer_state  # the caller's tokenizer is untouched


def test_sampling_is_reproducible_by_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = PROMPTS * 4
    a = generate(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=0)
    assert a == generate(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=0)
    assert a != generate(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=1)


def test_decoding_stops_at_first_eos(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ids = tokenizer("85", add_special_tokens=False)["input_ids"]
    x = tokenizer("x", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert _decode_new(tokenizer, torch.tensor([ids + [eos] + x, ids + x + x])) == ["85", "85xx"]


def test_evaluate_task_reports_accuracy_reward_and_groups(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = get_task("arithmetic", partial_credit=True)
    rows = task.make_rows("eval", 40, seed=0)
    result = evaluate_task(model, tokenizer, task, rows, max_new_tokens=4, batch_size=16)
    completions = greedy_generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=4)
    assert result["n"] == 40
    assert result["accuracy"] == sum(task.is_correct(c, r) for c, r in zip(completions, rows)) / 40
    rewards = task.reward([r["prompt"] for r in rows], completions, answer=[r["answer"] for r in rows])
    assert result["mean_reward"] == pytest.approx(sum(rewards) / 40)
    assert set(result["accuracy_by_group"]) == {"carry", "no_carry"}
    assert [e["completion"] for e in result["examples"]] == completions[:5]
    assert result["examples"][0] == {
        "prompt": rows[0]["prompt"], "completion": completions[0], "answer": rows[0]["answer"],
        "correct": task.is_correct(completions[0], rows[0]),
    }


def test_bad_input(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = get_task("arithmetic")
    with pytest.raises(ValueError, match="at least one row"):
        evaluate_task(model, tokenizer, task, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="row 1"):
        evaluate_task(model, tokenizer, task, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}], max_new_tokens=4)
    with pytest.raises(TypeError, match="list"):
        greedy_generate(model, tokenizer, "1+1=", max_new_tokens=4)
