"""Fixtures shared by the rollout tests."""

from collections.abc import Callable

import pytest
import torch

from tether.rollout.hf import HFGenerateBackend


@pytest.fixture
def assert_same_samples() -> Callable:
    """`check(policy, tokenizer, first, second, after=None)`: sample three left-padded prompts, two completions
    each, from seed 0 with each of two `HFGenerateBackend` settings (dicts of keyword arguments) on one policy,
    and assert both drew the same tokens with the same log-probs (1e-5). `after` runs after each generate."""
    def check(policy, tokenizer, first: dict, second: dict, after: Callable[[], None] | None = None) -> None:
        prompts = ["1+1=", "12+34=", "9="]
        rows = [{"prompt": p} for p in prompts]
        results = []
        for settings in (first, second):
            backend = HFGenerateBackend(policy, tokenizer, max_new_tokens=8, share_prompts=True, **settings)
            torch.manual_seed(0)
            results.append(backend.generate(rows, prompts, group_size=2))
            if after is not None:
                after()
        a, b = results
        assert torch.equal(a.input_ids_BL, b.input_ids_BL)
        torch.testing.assert_close(a.sampler_logprobs_BT, b.sampler_logprobs_BT, atol=1e-5, rtol=1e-5)
    return check
