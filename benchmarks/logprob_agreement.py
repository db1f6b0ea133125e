"""Sampler against trainer log-probs on the real model: how close token in / token out gets in float32.

    .venv/bin/python benchmarks/logprob_agreement.py        # about two minutes on 2 cores

SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`), 4 chat prompts x 2 completions of up to 48 sampled
tokens. For each sampled token: |log pi_sampler - log pi_trainer|, where the sampler's is recorded while
`generate` runs (one cached decode step per token) and the trainer's comes from tether's forward over the
whole sequence. Three ways:
- float32 with the sampler's CPU speed-ups (packed linears, matmul decode attention where they are on): the
  two forwards sum in other orders, and the gap is their rounding through 30 layers;
- float32 with `model.batch_invariant` (core/batch_invariant.py) in both: the gap should be exactly 0;
- float64 weights: what is left that is not the forward's rounding (the record is kept in float32).
The times are of `generate` and of the trainer's no-grad forward over the batch.
"""

from __future__ import annotations

import time

import torch

from tether.core.batch_invariant import batch_invariant
from tether.model_sources import resolve_model_source
from tether.models import load_causal_lm, load_tokenizer
from tether.rollout.hf import HFGenerateBackend
from tether.train.forward import make_micro_batch, policy_logprobs_and_values

QUESTIONS = ((12, 30), (59, 63), (7, 88), (41, 41))


def main() -> None:
    torch.set_num_threads(2)
    path = resolve_model_source("builtin:smollm2-135m-instruct")
    tok = load_tokenizer(str(path))
    prompts = [[{"role": "user", "content": f"What is {a} + {b}? Reply with just the number."}] for a, b in QUESTIONS]
    policy = load_causal_lm(str(path))
    for name, dtype, invariant in (("float32", torch.float32, False), ("float32 batch-invariant", torch.float32, True),
                                   ("float64", torch.float64, False)):
        policy = policy.to(dtype)
        for share in (False, True):
            # Packed linears are a float32/bf16 speed-up (oneDNN); float64 runs F.linear.
            backend = HFGenerateBackend(policy, tok, max_new_tokens=48, chat_template=True, share_prompts=share,
                                        packed_linears=dtype != torch.float64, batch_invariant=invariant)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            rollout = backend.generate([{"prompt": p} for p in prompts], prompts, group_size=2)
            t1 = time.perf_counter()
            mb = make_micro_batch(rollout, torch.arange(len(rollout)))
            with torch.no_grad(), batch_invariant(invariant):
                lp = policy_logprobs_and_values(policy, None, mb, temperature=1.0, with_entropy=False,
                                                share_prompts=share).logprobs
            t2 = time.perf_counter()
            mask = rollout.loss_mask_BT[:, :mb.width].bool()
            diff = (lp.double() - rollout.sampler_logprobs_BT[:, :mb.width].double()).abs()[mask]
            print(f"{name:24s} share_prompts={str(share):5s}  max {diff.max().item():.2e}  "
                  f"mean {diff.mean().item():.2e}  equal {(diff == 0).float().mean().item():6.1%}  over "
                  f"{int(mask.sum())} tokens  generate {t1 - t0:5.1f} s  forward {t2 - t1:4.1f} s", flush=True)


if __name__ == "__main__":
    main()
