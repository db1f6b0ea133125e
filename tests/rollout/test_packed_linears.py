"""Linear layers on oneDNN-packed weights while sampling: the same results as F.linear, fall-backs, restore."""

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tether.models import load_causal_lm, load_tokenizer
from tether.rollout import packed_linears
from tether.rollout.hf import HFGenerateBackend
from tether.rollout.packed_linears import installed, probe
from tether.tasks.tiny_model import build_tiny_model

pytestmark = pytest.mark.skipif(not packed_linears.supported(torch.float32),
                                reason="no oneDNN packed linears in this torch build or on this CPU")


class Net(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.with_bias = nn.Linear(16, 24).to(dtype)
        self.without_bias = nn.Linear(24, 8, bias=False).to(dtype)

    def forward(self, x):
        return self.without_bias(self.with_bias(x))


def plain(net, x):
    return F.linear(F.linear(x, net.with_bias.weight, net.with_bias.bias), net.without_bias.weight)


# Both sides accumulate in float32 and round each layer's output once to the weights' dtype; they differ in the
# order of summation only. Per layer: one rounding of the output each (2 units of 2^-p relative, p = 24 for
# float32, 8 for bf16) plus the float32 sums' reordering error (K = 16 or 24 terms: K * 2^-24 relative to
# sum |x w|, below one bf16 unit). The first layer's difference feeds the second: 4 units in all, relative
# to the output's scale (atol for outputs near 0, where a relative bound means nothing).
def _packing_tol(dtype: torch.dtype, want: torch.Tensor) -> dict:
    unit = 2.0 ** -(24 if dtype == torch.float32 else 8)
    if dtype == torch.float32:
        unit = 24 * unit  # float32: the reordering error of the sums dominates the final rounding
    return {"rtol": 4 * unit, "atol": 4 * unit * want.abs().max().item()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16)])
def test_packed_layers_compute_f_linear(dtype, shape):
    """Packed where this CPU runs packed weights in `dtype` (the probe), F.linear where it does not (bf16 on
    a CPU without AVX-512 BF16, say); the same results either way."""
    net = Net(dtype)
    x = torch.randn(*shape).to(dtype)
    expect_packed = packed_linears.supported(dtype)
    with torch.no_grad(), installed(net, rows=shape[0]) as n_packed:
        assert n_packed == (2 if expect_packed else 0)
        assert ("forward" in vars(net.with_bias)) is expect_packed
        out = net(x)
        transposed = net(x.transpose(0, -2).contiguous().transpose(0, -2))  # a non-contiguous input
    want = plain(net, x).detach()
    torch.testing.assert_close(out, want, **_packing_tol(dtype, want))
    torch.testing.assert_close(transposed, want, **_packing_tol(dtype, want))
    assert "forward" not in vars(net.with_bias) and "forward" not in vars(net.without_bias)


def test_bf16_falls_back_where_onednn_is_capped_below_avx512_bf16():
    """The fallback on every machine: with oneDNN capped to AVX2 (as on an AVX2-only CPU) the probe refuses
    bf16 packing, no layer is packed, and the results are F.linear's. In a fresh interpreter, since oneDNN
    reads its cap once."""
    code = (
        "import torch; from torch import nn; from tether.rollout import packed_linears as p\n"
        "net = nn.Linear(16, 8).bfloat16(); x = torch.randn(4, 16).bfloat16()\n"
        "with torch.no_grad(), p.installed(net, rows=4) as n: out = net(x)\n"
        "want = torch.nn.functional.linear(x, net.weight, net.bias)\n"
        "print(p.supported(torch.bfloat16), p.supported(torch.float32), n, bool(torch.equal(out, want)))\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    bf16, fp32, n_packed, same = res.stdout.split()
    assert (bf16, n_packed, same) == ("False", "0", "True")
    assert fp32 == "True"  # float32 packing needs only AVX2


def test_probe_refuses_operators_that_fail_or_disagree_with_f_linear():
    ops = torch.ops.mkldnn
    assert probe(torch.float32, ops._reorder_linear_weight, ops._linear_pointwise)

    def wrong(x, w, b, *args):
        return torch.zeros(*x.shape[:-1], 8)

    def raising(*args):
        raise RuntimeError("no oneDNN kernel for this CPU")

    assert not probe(torch.float32, ops._reorder_linear_weight, wrong)
    assert not probe(torch.float32, raising, ops._linear_pointwise)


def test_unsupported_dtypes_keep_f_linear(monkeypatch):
    monkeypatch.setattr(packed_linears, "supported", lambda dtype: dtype != torch.bfloat16)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).bfloat16())
    with installed(net, rows=2) as n_packed:
        assert n_packed == 1 and "forward" not in vars(net[1])


def test_gradients_and_autocast_fall_back_to_f_linear():
    net = Net(torch.float32)
    x = torch.randn(4, 16)
    with installed(net, rows=4):
        net(x).sum().backward()  # grad enabled, trainable weights: the packed op has no backward
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_out = net(x)
    assert net.with_bias.weight.grad is not None and net.without_bias.weight.grad.abs().sum() > 0
    assert autocast_out.dtype == torch.bfloat16  # autocast's cast, as F.linear does it


def test_restores_on_exception_and_skips_layers_it_does_not_own():
    class Quantised(nn.Linear):
        pass

    net = nn.Sequential(nn.Linear(4, 4), Quantised(4, 4), nn.Linear(4, 4), nn.Linear(4, 4).half())
    hooked = net[2]
    hooked.forward = lambda x: x  # an offload hook, say: someone else's forward
    with pytest.raises(RuntimeError, match="interrupted"):
        with installed(net, rows=2) as n_packed:
            assert n_packed == 1  # only the plain float32 layer: the subclass, the hooked and fp16 are skipped
            raise RuntimeError("interrupted")
    assert "forward" not in vars(net[0]) and vars(hooked)["forward"] is not None
    with installed(net, rows=2, enabled=False) as n_packed:
        assert n_packed == 0


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_sampling_on_packed_weights_matches_plain_linears(tmp_path, arch, monkeypatch, assert_same_samples):
    """Same tokens and log-probs (float32) with and without packing; the layers were packed while sampling."""
    path = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2)
    tok = load_tokenizer(str(path))
    policy = load_causal_lm(str(path))
    packed_counts = []
    original = packed_linears.installed

    @contextmanager
    def counting(model, rows, enabled=True):
        with original(model, rows, enabled) as n_packed:
            packed_counts.append(n_packed)
            yield n_packed

    monkeypatch.setattr("tether.rollout.hf.packed_linears_installed", counting)
    assert_same_samples(policy, tok, {"packed_linears": False}, {"packed_linears": True})
    n_linears = sum(type(m) is nn.Linear for m in policy.modules())
    assert packed_counts == [0, n_linears] and n_linears >= 2 * 7
    assert not any("forward" in vars(m) for m in policy.modules())


def test_backend_keeps_f_linear_under_autocast_and_compile(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1)
    tok, policy = load_tokenizer(str(path)), load_causal_lm(str(path))
    assert HFGenerateBackend(policy, tok, max_new_tokens=2).packed_linears
    assert not HFGenerateBackend(policy, tok, max_new_tokens=2, autocast_dtype=torch.bfloat16).packed_linears
    assert not HFGenerateBackend(policy, tok, max_new_tokens=2, compile_backend="eager").packed_linears
