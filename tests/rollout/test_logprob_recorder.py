"""The sampler's log-prob record: log p(token) from each step's scores, kept as a [B] gather."""

import torch

from tether.rollout.logprob_recorder import SampledLogprobs


def peaked_scores(generator, B=8, V=49152):
    """A real vocabulary's shape of distribution: one likely token over a long tail of unlikely ones."""
    z = torch.randn(B, V, generator=generator) * 2
    z[:, 0] += 12
    return z


def test_recorded_logprobs_are_accurate_over_a_large_vocabulary():
    """log p = z_tok - logsumexp(z) per step, within float32's rounding of the two (values of magnitude < 32:
    spacing <= 2^-18 = 3.8e-6, so <= 4e-6 together). torch's CPU log_softmax, which sums the exponentials lane
    by lane in float32, was off by 1.1e-5 on these scores (1.3e-5 on SmolLM2's own)."""
    g = torch.Generator().manual_seed(0)
    steps = [peaked_scores(g) for _ in range(3)]
    tokens = torch.stack([torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]) * (i + 1) for i in range(3)], 1)  # [B, 3]
    rec = SampledLogprobs()
    ids = torch.zeros(8, 5, dtype=torch.long)  # a prompt of 5 tokens
    for t, scores in enumerate(steps):
        rec(ids, scores)
        ids = torch.cat([ids, tokens[:, t:t + 1]], 1)  # generate appends the token drawn at this step
    got = rec.finish(tokens)
    want = torch.stack([torch.log_softmax(s.double(), -1).gather(1, tokens[:, t:t + 1]).squeeze(1)
                        for t, s in enumerate(steps)], 1)
    assert got.dtype == torch.float32 and got.shape == (8, 3)
    assert (got.double() - want).abs().max() < 4e-6
    assert (torch.log_softmax(steps[0], -1).double() - torch.log_softmax(steps[0].double(), -1)).abs().max() > 4e-6


def test_scores_changed_after_the_recorder_do_not_change_the_record():
    rec = SampledLogprobs()
    scores = torch.zeros(2, 5)
    out = rec(torch.zeros(2, 1, dtype=torch.long), scores)
    assert out is scores
    scores.fill_(-1e9)  # a later step writing into the same buffer
    got = rec.finish(torch.tensor([[3], [4]]))
    assert torch.allclose(got, torch.full((2, 1), -torch.log(torch.tensor(5.0))))
