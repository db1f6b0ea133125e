"""The linear layers of one GRPO step alone, timed at the shapes they run at: a floor no trainer beats.

run.py's FLOP floor divides the step's FLOPs by the rate of one 2048³ matmul. The step's matmuls are smaller
(32 rows per decode step, a micro-batch's rows in the update, transposed operands in backward) and run
slower than that. This script times exactly those matmuls, in bf16 on the model's weight shapes, with
nothing else: no attention, no norms or activations, no optimiser, no sampling, no Python model code. Any
trainer running the same workload in bf16 on this machine does at least these multiplications.

Workload (run.py's, with prompts shared within a group, as tether runs them): U prompts of P tokens, G
completions each of T tokens, B = U·G rows.
- generate: one prefill of U·(P-1) rows, then T decode steps of B rows (the prompt's last token and T-1
  sampled ones), LM head included; on plain weights (`F.linear`) and on oneDNN-packed ones (tether's
  rollout.packed_linears).
- reference pass (no grad): U·P prompt rows and B·T completion rows; LM head on the completion rows.
- update: per micro-batch of m rows, the same forward on its m/G prompts, then backward's two matmuls per
  layer (grad_input = grad·W, grad_weight = gradᵀ·X, as autograd calls them).

    .venv/bin/python benchmarks/matmul_floor.py                  # medium model, 8x4 rows, P=24, T=64, mb 8
    .venv/bin/python benchmarks/matmul_floor.py --size small --micro-batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from common import SIZES, matmul_rate
from run import ensure_model


def linear_shapes(size: str) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(out, in) of every decoder linear of run.py's benchmark model of this size, and of its LM head: the
    model's own modules, built on the meta device from its saved config."""
    path = ensure_model(size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    head = model.get_output_embeddings()
    block = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return block, tuple(head.weight.shape)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="medium", choices=sorted(SIZES))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per update forward/backward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes, head = linear_shapes(args.size)
    bf16 = torch.bfloat16
    weights = [torch.randn(o, i, dtype=bf16) * 0.02 for o, i in shapes]
    head_w = torch.randn(*head, dtype=bf16) * 0.02
    U, G, P, T, mb = args.prompts, args.group, args.prompt_len, args.new_tokens, args.micro_batch
    B = U * G
    if mb % G or B % mb:
        raise SystemExit("--micro-batch must be a multiple of --group that divides the batch")

    buffers: dict[tuple[int, int], torch.Tensor] = {}

    def activations(rows: int, width: int) -> torch.Tensor:  # made once, outside the timed calls
        if (rows, width) not in buffers:
            buffers[rows, width] = torch.randn(rows, width, dtype=bf16)
        return buffers[rows, width]

    def forward(rows: int, head_rows: int, ws=weights, hw=head_w, linear=F.linear):
        for w, (_, width) in zip(ws, shapes):
            linear(activations(rows, width), w)
        if head_rows:
            linear(activations(head_rows, head[1]), hw)

    def backward(rows: int, head_rows: int):
        for w, (out, width) in [*zip(weights, shapes), (head_w, head)]:
            n = head_rows if w is head_w else rows
            grad, x = activations(n, out), activations(n, width)
            torch.mm(grad, w)        # grad_input
            torch.mm(grad.t(), x)    # grad_weight

    # oneDNN-packed copies, as rollout.packed_linears makes them for sampling (refreshed every generate).
    def packed_linear(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    t0 = time.perf_counter()
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, B) for w in weights]
    packed_head = torch.ops.mkldnn._reorder_linear_weight(head_w, B)
    pack_s = time.perf_counter() - t0

    def generate(linear=F.linear, ws=weights, hw=head_w):
        forward(U * (P - 1), 0, ws, hw, linear)
        for _ in range(T):
            forward(B, B, ws, hw, linear)

    phases = {
        "generate (F.linear)": timed(generate, args.repeats),
        "generate (packed)": timed(lambda: generate(packed_linear, packed, packed_head), args.repeats) + pack_s,
        "reference pass": timed(lambda: forward(U * P + B * T, B * T), args.repeats),
    }
    rows_mb, head_mb = mb // G * P + mb * T, mb * T
    fwd = timed(lambda: forward(rows_mb, head_mb), args.repeats)
    bwd = timed(lambda: backward(rows_mb, head_mb), args.repeats)
    phases["update (forward + backward)"] = (fwd + bwd) * (B // mb)

    def flops(rows: int, head_rows: int) -> int:  # what forward(rows, head_rows) multiplies
        return 2 * (rows * sum(o * i for o, i in shapes) + head_rows * head[0] * head[1])

    generate_flops = flops(U * (P - 1), 0) + T * flops(B, B)
    reference_flops = flops(U * P + B * T, B * T)
    at_rate = {"generate (F.linear)": generate_flops, "generate (packed)": generate_flops,
               "reference pass": reference_flops, "update (forward + backward)": 3 * reference_flops}
    rate = matmul_rate("bfloat16", threads=args.threads)["gflops_median"] * 1e9
    print(f"{args.size} model, bf16, {args.threads} threads: {U} prompts x {G} completions, P={P}, T={T}, "
          f"update micro-batch {mb}; 2048^3 bf16 matmul {rate / 1e9:.0f} GFLOP/s")
    print(f"{'phase':32s} {'linears s':>10s} {'at 2048^3 rate s':>17s}")
    for name, sec in phases.items():
        print(f"{name:32s} {sec:10.2f} {at_rate[name] / rate:17.2f}")
    best = phases["generate (packed)"] + phases["reference pass"] + phases["update (forward + backward)"]
    step_flops = generate_flops + 4 * reference_flops
    print(f"{'step (packed generate)':32s} {best:10.2f} {step_flops / rate:17.2f}")


if __name__ == "__main__":
    main()
