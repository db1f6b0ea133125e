"""One draw per row from a categorical distribution, by inverse transform sampling, for HF `generate` on CPU.

`torch.multinomial(probs_BV, 1)` on CPU draws an exponential variate for every entry of the vocabulary and
takes argmax(p / q) (the exponential race). At a real vocabulary that is 32 x 49,152 draws of the CPU's
scalar generator per decode step: 54 ms of the ~230 ms a SmolLM2-135M decode step took (bf16, 2 threads,
32 rows; `benchmarks/README.md`), more than the attention of its 30 layers. Inverse transform sampling needs
one uniform per row: with the cumulative sums c_k = sum_{j<=k} p_j and u ~ U[0, c_V), the draw is the first
k with c_k > u, so P(k) = c_k - c_{k-1} = p_k exactly (3 ms for the same batch). Zero-probability entries
(cut by top-k / top-p) have empty intervals and are never drawn.

The sums run in float64. Each interval c_k - c_{k-1} is p_k up to the rounding of one addition at the
size of c_k: half an ulp, 3e-8 in float32 near 1, which is more than the whole probability of many rare
tokens of a 49k vocabulary; in float64 it is 6e-17.
The draws are exact in distribution but not the same numbers torch's exponential race would give for a
seed, so `rollout.inverse_cdf_sampling=false` restores torch's own sampling (and its random stream).

`installed(enabled)` swaps `torch.multinomial` for the duration of a `generate` call: transformers' sampling
loop calls it by that name. Calls it does not cover (more than one sample, other devices, integer weights)
go to torch's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_torch_multinomial = torch.multinomial


def sample_categorical(probs_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row, drawn with probability probs_BV[b, k] / sum_k probs_BV[b, k]; shape [B, 1] (long).

    Rows need not be normalised (as for `torch.multinomial`); a row whose sum is not a positive finite number
    raises, naming the problem, instead of returning an arbitrary index."""
    cdf_BV = probs_BV.to(torch.float64).cumsum(-1)
    total_B1 = cdf_BV[:, -1:]
    if not bool(torch.isfinite(total_B1).all() and (total_B1 > 0).all()):
        raise RuntimeError("categorical sampling: probability tensor contains either inf, nan or a row that "
                           "sums to zero or less")
    u_B1 = torch.rand(total_B1.shape, dtype=torch.float64, device=probs_BV.device, generator=generator) * total_B1
    # u < total: rand is in [0, 1), and the product rounds down to at most the largest double below total.
    u_B1 = torch.minimum(u_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1)))
    return torch.searchsorted(cdf_BV, u_B1, right=True)


def _multinomial(input, num_samples, replacement=False, *, generator=None, out=None):
    if (num_samples == 1 and out is None and input.dim() == 2 and input.device.type == "cpu"
            and input.is_floating_point()):
        return sample_categorical(input, generator)
    kwargs = {"generator": generator} if out is None else {"generator": generator, "out": out}
    return _torch_multinomial(input, num_samples, replacement, **kwargs)


@contextmanager
def installed(enabled: bool = True) -> Iterator[None]:
    """`torch.multinomial` draws single samples on CPU by inverse transform sampling inside this block."""
    if not enabled or torch.multinomial is _multinomial:
        yield
        return
    torch.multinomial = _multinomial
    try:
        yield
    finally:
        torch.multinomial = _torch_multinomial
