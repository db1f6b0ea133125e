import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tether.rewards.functions import RewardScorer
from tether.rewards.reward_model import RewardModelScorer
from tether.rewards.training import load_preference_data, train_reward_model
from tether.tasks.tiny_model import build_tiny_model

PROMPTS = ["1+1=", "12+30=", "a", "what is 7*6? ", "x", "99+99=", "hello"]
COMPLETIONS = ["2", "42", "bcdefghijk", "42!", "", "198 is the answer", "world"]


def save_random_rm(lm_dir, out_dir, *, seed=0, chat_template=None):
    """A randomly initialised 1-output sequence classifier on top of the tiny LM."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    if chat_template:
        tok.chat_template = chat_template
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("lm"), hidden_size=32, seed=0)


@pytest.fixture(scope="session")
def random_rm(tiny_lm, tmp_path_factory):
    return save_random_rm(tiny_lm, tmp_path_factory.mktemp("rm"))


@pytest.fixture(scope="session")
def random_rm_no_pad(tmp_path_factory):
    lm = build_tiny_model(tmp_path_factory.mktemp("lm_nopad"), hidden_size=32, with_pad_token=False)
    return save_random_rm(lm, tmp_path_factory.mktemp("rm_nopad"))


@pytest.fixture(scope="session")
def random_rm_gpt2(tmp_path_factory):
    # Absolute position embeddings: padding on the wrong side would change the scores.
    lm = build_tiny_model(tmp_path_factory.mktemp("lm_gpt2"), hidden_size=32, arch="gpt2")
    return save_random_rm(lm, tmp_path_factory.mktemp("rm_gpt2"))


# -- RewardModelScorer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rm_fixture", ["random_rm", "random_rm_no_pad", "random_rm_gpt2"])
def test_batched_scores_equal_one_by_one(rm_fixture, request):
    path = request.getfixturevalue(rm_fixture)
    batched = RewardModelScorer(path, batch_size=3)(PROMPTS, COMPLETIONS)
    single = RewardModelScorer(path, batch_size=1)
    one_by_one = [single([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert len(batched) == len(PROMPTS)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(one_by_one), atol=1e-5, rtol=1e-5)
    assert len({round(s, 4) for s in batched}) > 3  # a real model: different texts, different scores


def test_missing_pad_token_falls_back_to_eos(random_rm_no_pad):
    scorer = RewardModelScorer(random_rm_no_pad)
    assert scorer.tokenizer.pad_token == scorer.tokenizer.eos_token
    assert scorer.model.config.pad_token_id == scorer.tokenizer.eos_token_id


def test_causal_lm_is_rejected_with_num_labels_message(tiny_lm):
    with pytest.raises(ValueError, match="num_labels=2; a reward model needs exactly one output"):
        RewardModelScorer(tiny_lm)


def test_bad_path_and_options(random_rm, tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        RewardModelScorer(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no chat template"):
        RewardModelScorer(random_rm, chat_template=True)
    with pytest.raises(ValueError, match="clip"):
        RewardModelScorer(random_rm, clip=0)


def test_chat_template_formats_user_and_assistant_turns(tiny_lm, tmp_path):
    template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    path = save_random_rm(tiny_lm, tmp_path / "rm_chat", chat_template=template)
    with_template = RewardModelScorer(path, chat_template=True)(["hi", "2+2="], ["yo", "4"])
    plain = RewardModelScorer(path)(["u:hi\n", "u:2+2=\n"], ["a:yo\n", "a:4\n"])
    torch.testing.assert_close(torch.tensor(with_template), torch.tensor(plain))


def test_normalisation_uses_running_stats_and_clip(random_rm):
    raw_scorer = RewardModelScorer(random_rm)
    raw = torch.tensor(raw_scorer(PROMPTS, COMPLETIONS), dtype=torch.float64)

    scorer = RewardModelScorer(random_rm, normalize=True)
    first = torch.tensor(scorer(PROMPTS[:4], COMPLETIONS[:4]), dtype=torch.float64)
    expected_first = (raw[:4] - raw[:4].mean()) / raw[:4].std(unbiased=False)
    torch.testing.assert_close(first, expected_first, atol=1e-5, rtol=1e-5)
    # The second call is normalised with the statistics of everything seen so far (all 7 samples).
    second = torch.tensor(scorer(PROMPTS[4:], COMPLETIONS[4:]), dtype=torch.float64)
    expected_second = (raw[4:] - raw.mean()) / raw.std(unbiased=False)
    torch.testing.assert_close(second, expected_second, atol=1e-5, rtol=1e-5)
    assert scorer.count == 7

    clipped = RewardModelScorer(random_rm, normalize=True, clip=0.5)(PROMPTS, COMPLETIONS)
    normalised = (raw - raw.mean()) / raw.std(unbiased=False)
    torch.testing.assert_close(torch.tensor(clipped, dtype=torch.float64), normalised.clamp(-0.5, 0.5), atol=1e-5, rtol=1e-5)
    assert max(abs(c) for c in clipped) == pytest.approx(0.5)


def test_scorer_is_a_reward_function_named_reward_model(random_rm):
    scorer = RewardScorer([RewardModelScorer(random_rm)])
    assert scorer.names == ["reward_model"]
    res = scorer(PROMPTS[:2], COMPLETIONS[:2], {"answer": ["x", "y"]})
    assert res.valid.all() and "reward/reward_model/mean" in res.stats


# -- preference data and training ----------------------------------------------------------------------------

ROWS = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": f"{i + 1}xyz"} for i in range(48)]


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"prompt": "p", "chosen": "a"}, "row 2 is missing the key 'rejected'"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "row 2 has chosen=''; expected a non-empty string"),
        ({"prompt": "p", "chosen": "a", "rejected": 3}, "row 2 has rejected=3"),
        (["p", "a", "b"], "row 2 is a list"),
    ],
)
def test_bad_rows_are_named(bad_row, message):
    with pytest.raises(ValueError, match=message):
        load_preference_data(ROWS[:2] + [bad_row])


def test_jsonl_and_saved_dataset_load_the_same_rows(tmp_path):
    import datasets

    jsonl = tmp_path / "prefs.jsonl"
    jsonl.write_text("\n".join(json.dumps({**r, "extra": 1}) for r in ROWS[:5]) + "\n\n")
    datasets.Dataset.from_list(ROWS[:5]).save_to_disk(str(tmp_path / "ds"))
    assert load_preference_data(jsonl) == ROWS[:5]
    assert load_preference_data(tmp_path / "ds") == ROWS[:5]

    (tmp_path / "broken.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_preference_data(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="neither a JSONL file nor a dataset directory"):
        load_preference_data(tmp_path / "missing.jsonl")


def test_training_is_deterministic_and_saves_a_loadable_model(tiny_lm, tmp_path):
    kw = dict(epochs=1, lr=1e-3, batch_size=8, eval_fraction=0.25, max_length=32, seed=3, log=None)
    m1 = train_reward_model(tiny_lm, ROWS, tmp_path / "a", **kw)
    m2 = train_reward_model(tiny_lm, ROWS, tmp_path / "b", **kw)
    assert (m1["n_train"], m1["n_eval"]) == (36, 12)
    assert m1["train_loss"] == m2["train_loss"] and m1["eval_accuracy"] == m2["eval_accuracy"]
    w1 = load_file(tmp_path / "a" / "model.safetensors")
    w2 = load_file(tmp_path / "b" / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)

    m3 = train_reward_model(tiny_lm, ROWS, tmp_path / "c", **{**kw, "seed": 4})
    assert m3["train_loss"] != m1["train_loss"]

    scorer = RewardModelScorer(tmp_path / "a")
    assert scorer.model.config.num_labels == 1
    assert len(scorer(["1+1="], ["2"])) == 1


def test_training_rejects_bad_split(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="eval_fraction"):
        train_reward_model(tiny_lm, ROWS, tmp_path, eval_fraction=1.0, log=None)
