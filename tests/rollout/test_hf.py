"""HF generate backend: left padding, masks, stop strings, pad-less tokenizers, chat templates."""

import torch

from tether.models import load_causal_lm, load_tokenizer
from tether.rollout.hf import HFGenerateBackend, completion_mask
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
