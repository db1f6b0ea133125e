"""Rollouts with vLLM (GPU, optional extra: `pip install tether[vllm]`), colocated with the trainer.

vLLM keeps its own copy of the weights; after every update `sync_weights` pushes the policy's parameters
into it. The log-probs vLLM reports for each sampled token are kept as the sampler's log-probs, so the
trainer can log (and optionally correct, `algorithm.tis_cap`) the sampler/trainer mismatch.
Written against vLLM's documented `LLM` / `SamplingParams` API; its test runs only where CUDA and vLLM are.
"""

from __future__ import annotations

import torch
from torch import nn

from tether.rollout.batch import Rollout
from tether.rollout.hf import completion_mask, eos_ids


class VLLMBackend:
    def __init__(self, policy: nn.Module, tokenizer, model_path: str, rollout_cfg):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError("rollout.backend='vllm' needs vLLM: pip install 'tether[vllm]' (CUDA only)") from e
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.backend='vllm' needs a CUDA GPU; use rollout.backend=hf on CPU")
        self.tokenizer = tokenizer
        self.cfg = rollout_cfg
        self.eos = eos_ids(tokenizer, policy)
        kwargs = dict(model=model_path, gpu_memory_utilization=rollout_cfg.vllm_gpu_memory_utilization,
                      dtype="bfloat16", enable_prefix_caching=True)
        try:
            # Log-probs after temperature / top-k / top-p: the distribution tokens were drawn from.
            self.llm = LLM(logprobs_mode="processed_logprobs", **kwargs)
        except TypeError:
            self.llm = LLM(**kwargs)
        self.SamplingParams = SamplingParams
        self.policy = policy

    def sync_weights(self, policy: nn.Module) -> None:
        """Push the current policy weights into vLLM's model (LoRA adapters merged in for the copy)."""
        self.policy = policy
        lora = hasattr(policy, "merge_adapter")
        if lora:
            policy.merge_adapter()
        try:
            state = [(name.replace("base_model.model.", "").replace(".base_layer", ""), p.detach())
                     for name, p in policy.state_dict().items() if "lora_" not in name]
            runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            runner_model.load_weights(state)
        finally:
            if lora:
                policy.unmerge_adapter()
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    @torch.no_grad()
    def generate(self, rows: list[dict], prompts: list[str], *, group_size: int) -> Rollout:
        c = self.cfg
        params = self.SamplingParams(n=1, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k or -1,
                                     max_tokens=c.max_new_tokens, logprobs=0, stop=c.stop_strings or None,
                                     seed=int(torch.randint(0, 2**31 - 1, ()).item()))
        rep_prompts = [p for p in prompts for _ in range(group_size)]
        rep_rows = [r for r in rows for _ in range(group_size)]
        outputs = self.llm.generate(rep_prompts, params, use_tqdm=False)
        enc = self.tokenizer(rep_prompts, padding=True, return_tensors="pt")
        device = next(self.policy.parameters()).device
        T = max(max(len(o.outputs[0].token_ids) for o in outputs), 1)
        pad = self.tokenizer.pad_token_id
        comp = torch.full((len(outputs), T), pad, dtype=torch.long)
        lps = torch.zeros(len(outputs), T)
        gen_len = torch.zeros(len(outputs), dtype=torch.long)
        for i, o in enumerate(outputs):
            ids = list(o.outputs[0].token_ids)
            comp[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            gen_len[i] = len(ids)
            for t, (tok, lp) in enumerate(zip(ids, o.outputs[0].logprobs or [])):
                lps[i, t] = lp[tok].logprob
        mask, truncated = completion_mask(comp, self.eos, gen_len)
        truncated = truncated & (gen_len >= c.max_new_tokens)
        return Rollout(
            input_ids_BL=torch.cat([enc.input_ids, comp], 1).to(device),
            attention_mask_BL=torch.cat([enc.attention_mask, mask.long()], 1).to(device),
            prompt_len=enc.input_ids.shape[1], response_mask_BT=mask.to(device),
            sampler_logprobs_BT=(lps * mask).to(device), truncated_B=truncated.to(device),
            prompts=rep_prompts, completions=[o.outputs[0].text for o in outputs], rows=rep_rows,
            group_size=group_size,
        )
