"""Inverse transform sampling for one draw per row: exact frequencies, zero-probability entries never drawn,
invalid rows refused, and the swap of torch.multinomial confined to generate."""

import math

import pytest
import torch

from tether.models import load_causal_lm, load_tokenizer
from tether.rollout import categorical
from tether.rollout.categorical import installed, sample_categorical
from tether.rollout.hf import HFGenerateBackend
from tether.tasks.tiny_model import build_tiny_model


def test_one_hot_rows_and_empty_intervals():
    """A row with a single positive entry always gives that entry, wherever it sits among zeros (zero
    entries have empty intervals c_k = c_{k-1}, and `right=True` skips them)."""
    probs = torch.zeros(6, 5)
    for b, k in enumerate([0, 1, 4, 2, 3, 4]):
        probs[b, k] = 1e-30 if b == 3 else 0.7  # a tiny mass is still the only mass
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert sample_categorical(probs, g).squeeze(1).tolist() == [0, 1, 4, 2, 3, 4]


def test_frequencies_match_the_distribution():
    """200,000 draws from p = (0.5, 0.25, 0, 0.125, 0.125), given unnormalised (x 3): each count is within
    5 binomial standard deviations of n p_k, and the zero-probability entry is never drawn."""
    p = torch.tensor([0.5, 0.25, 0.0, 0.125, 0.125])
    n = 200_000
    draws = sample_categorical((3 * p).expand(n, 5), torch.Generator().manual_seed(1)).squeeze(1)
    assert draws.shape == (n,) and draws.dtype == torch.long
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[2] == 0
    sd = torch.sqrt(n * p.double() * (1 - p.double()))
    assert ((counts - n * p.double()).abs() <= 5 * sd + 1e-9).all(), counts


def test_a_long_tail_keeps_its_mass():
    """At a real vocabulary size (49,152 entries), the last 10,000 entries, 1e-7 each, are drawn with their
    total probability 1e-3 (within 5 binomial standard deviations)."""
    V, tail = 49_152, 10_000
    p = torch.full((V,), 0.999 / (V - tail))
    p[-tail:] = 1e-3 / tail
    n = 20_000
    draws = sample_categorical(p.expand(n, V), torch.Generator().manual_seed(2)).squeeze(1)
    hits = (draws >= V - tail).sum().item()
    assert abs(hits - n * 1e-3) <= 5 * math.sqrt(n * 1e-3) + 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_invalid_rows_are_refused(bad):
    probs = torch.tensor([[0.5, 0.5], [bad, 0.0 if bad == 0.0 else 1.0]])
    with pytest.raises(RuntimeError, match="inf, nan or a row that sums to zero"):
        sample_categorical(probs)


def test_installed_swaps_multinomial_only_inside_and_only_for_single_draws():
    probs = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    original = torch.multinomial
    with installed():
        a = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))
        two = torch.multinomial(probs, 2)  # without replacement: torch's own
        with installed():  # nested: still ours, and restored once at the outer exit
            assert torch.multinomial is not original
    assert torch.multinomial is original
    assert torch.equal(a, sample_categorical(probs, torch.Generator().manual_seed(3)))
    assert sorted(two[0].tolist()) == [0, 1]
    with installed(enabled=False):
        assert torch.multinomial is original


@pytest.mark.parametrize("enabled", [True, False])
def test_generate_draws_through_it_when_enabled(tmp_path, monkeypatch, enabled):
    """transformers' sampling loop calls torch.multinomial by name: the backend's draws go through
    `sample_categorical` once per decode step when enabled, never when not, and the recorded sampler
    log-probs are those of the drawn tokens either way."""
    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1)
    tok, model = load_tokenizer(str(path)), load_causal_lm(str(path))
    calls = []
    real = categorical.sample_categorical
    monkeypatch.setattr(categorical, "sample_categorical", lambda p, g=None: calls.append(p.shape) or real(p, g))
    backend = HFGenerateBackend(model, tok, max_new_tokens=5, inverse_cdf_sampling=enabled)
    torch.manual_seed(0)
    r = backend.generate([{}, {}], ["1+1=", "2+2="], group_size=3)
    assert (len(calls) > 0) == enabled
    if enabled:
        assert all(shape == (6, model.config.vocab_size) for shape in calls)
    with torch.no_grad():
        logits = model(input_ids=r.input_ids_BL, attention_mask=r.attention_mask_BL).logits.float()
    T = r.response_mask_BT.shape[1]
    lp = logits[:, -T - 1:-1].log_softmax(-1).gather(-1, r.input_ids_BL[:, -T:, None]).squeeze(-1)
    assert torch.allclose(lp * r.response_mask_BT, r.sampler_logprobs_BT, atol=1e-5)
