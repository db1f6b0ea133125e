"""Sampler against trainer log-probs on the real model: how close token in / token out gets in float32.

    .venv/bin/python benchmarks/logprob_agreement.py        # about a minute on 2 cores

SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`), 4 chat prompts x 2 completions of up to 48 sampled
tokens. For each sampled token: |log pi_sampler - log pi_trainer|, where the sampler's is recorded while
`generate` runs (one cached decode step per token) and the trainer's comes from tether's forward over the
whole sequence. In float32 the two differ by the forward's own rounding (sums in another order); with the
weights in float64 the same code shows what is left that is not the forward's rounding: transformers'
generate hands each step's logits on in float32, and the record is kept in float32.
"""

from __future__ import annotations

import torch

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
    for dtype in (torch.float32, torch.float64):
        policy = load_causal_lm(str(path)).to(dtype)
        for share in (False, True):
            # Packed linears are a float32/bf16 speed-up (oneDNN); float64 runs F.linear.
            backend = HFGenerateBackend(policy, tok, max_new_tokens=48, chat_template=True, share_prompts=share,
                                        packed_linears=dtype != torch.float64)
            torch.manual_seed(0)
            rollout = backend.generate([{"prompt": p} for p in prompts], prompts, group_size=2)
            mb = make_micro_batch(rollout, torch.arange(len(rollout)))
            with torch.no_grad():
                lp = policy_logprobs_and_values(policy, None, mb, temperature=1.0, with_entropy=False,
                                                share_prompts=share).logprobs
            mask = rollout.loss_mask_BT[:, :mb.width].bool()
            diff = (lp.double() - rollout.sampler_logprobs_BT[:, :mb.width].double()).abs()[mask]
            print(f"{str(dtype):14s} share_prompts={str(share):5s}  max {diff.max().item():.2e}  "
                  f"mean {diff.mean().item():.2e}  over {int(mask.sum())} tokens", flush=True)


if __name__ == "__main__":
    main()
