"""Peak memory of chunked `logprobs_and_entropy` vs the naive float32 log-softmax, on CPU.

    python benchmarks/logprob_memory.py [--B 8 --T 1024 --V 32000 --chunk-size N] [--backward]

--backward adds a forward+backward (training) comparison; it roughly doubles the run time.

Each variant runs in a fresh subprocess. The child allocates the bf16 inputs, records its resident set
size (RSS), runs the variant once, and reports the peak RSS (the kernel's high-water mark: VmHWM, which is
getrusage's ru_maxrss) minus that baseline: the *extra* memory the computation needed. Large CPU
allocations are mmap'ed and returned to the OS when freed, so the high-water mark is an honest peak. The
high-water mark is reset after setup where Linux allows it (/proc/self/clear_refs), and any setup spike
that remains is printed, so setup can't hide inside the number.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable from a checkout without installing

from tether.core.logprobs import logprobs_and_entropy  # noqa: E402

MiB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    try:  # VmHWM honours a clear_refs reset; ru_maxrss does not
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(variant: str, backward: bool, B: int, T: int, V: int, temperature: float, chunk_size: int) -> None:
    import torch

    def naive(logits, tokens):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        logp_tok = logp.gather(-1, tokens[..., None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp_tok, entropy

    def chunked(logits, tokens):
        return logprobs_and_entropy(logits, tokens, temperature=temperature, chunk_size=chunk_size)

    fn = {"naive": naive, "chunked": chunked}[variant]
    # Warm up on a tiny input so one-off allocations (kernels, thread pools) are part of the baseline.
    small = torch.randn(2, 3, 7, dtype=torch.bfloat16, requires_grad=backward)
    out = fn(small, torch.zeros(2, 3, dtype=torch.long))
    if backward:
        (out[0].sum() + out[1].sum()).backward()
    del small, out

    torch.manual_seed(0)
    logits = torch.empty(B, T, V, dtype=torch.bfloat16).normal_(0.0, 2.0)  # in place: no float32 temporary
    tokens = torch.randint(V, (B, T))
    if backward:
        logits.requires_grad_()
    baseline = _rss_bytes()
    reset = _reset_peak()
    setup_peak = _peak_bytes() - baseline  # should be ~0 if nothing spiked or the reset worked

    start = time.perf_counter()
    logp, entropy = fn(logits, tokens)
    if backward:
        (logp.sum() + 0.1 * entropy.sum()).backward()
    seconds = time.perf_counter() - start
    extra = _peak_bytes() - baseline
    print(json.dumps({"extra": extra, "seconds": seconds, "setup_peak": setup_peak, "reset": reset}))


def run(variant: str, backward: bool, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant]
    cmd += ["--B", str(args.B), "--T", str(args.T), "--V", str(args.V)]
    cmd += ["--temperature", str(args.temperature), "--chunk-size", str(args.chunk_size)]
    if backward:
        cmd.append("--backward")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--V", type=int, default=32000)
    parser.add_argument("--temperature", type=float, default=0.7)
    default_chunk = inspect.signature(logprobs_and_entropy).parameters["chunk_size"].default
    parser.add_argument("--chunk-size", type=int, default=default_chunk, help="rows per chunk (library default)")
    parser.add_argument("--child", choices=["naive", "chunked"])
    parser.add_argument("--backward", action="store_true", help="also compare forward+backward")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.backward, args.B, args.T, args.V, args.temperature, args.chunk_size)
        return

    B, T, V = args.B, args.T, args.V
    print(f"B={B} T={T} V={V} bf16 logits, temperature={args.temperature}, chunk_size={args.chunk_size} rows")
    print(f"logits themselves: {B * T * V * 2 / MiB:.0f} MiB (bf16); "
          f"one float32 [B,T,V] copy would be {B * T * V * 4 / MiB:.0f} MiB")
    print(f"{'mode':<18}{'variant':<10}{'extra peak RSS':>16}{'wall':>9}")
    ok = True
    for backward in (False, True) if args.backward else (False,):
        mode = "forward+backward" if backward else "forward"
        res = {v: run(v, backward, args) for v in ("naive", "chunked")}
        for v, r in res.items():
            note = "" if r["setup_peak"] < 16 * MiB else f"  (setup peak {r['setup_peak'] / MiB:.0f} MiB)"
            print(f"{mode:<18}{v:<10}{r['extra'] / MiB:>12.0f} MiB{r['seconds']:>8.2f}s{note}")
        ratio = res["chunked"]["extra"] / res["naive"]["extra"]
        print(f"{mode:<18}chunked / naive extra memory = {ratio:.3f}")
        ok &= ratio < 1 / 3
    print("PASS: chunked < 1/3 of naive" if ok else "FAIL: chunked >= 1/3 of naive")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
