"""Rollouts with vLLM (GPU, optional extra: `pip install "tether[vllm]"`), colocated with the trainer, on
vLLM's V1 engine. A separate `vllm serve` on GPUs of its own is `vllm_server.py`, which shares the weight
naming, the buckets and the batch assembly below.

Written against vLLM 0.10.2 - 0.11.x (the extra's range, `SUPPORTED`), read from its source:

- Weights. V1 runs the model in an engine-core process: the `llm.llm_engine.model_executor.driver_worker`
  path that older trainers reach into exists only with VLLM_ENABLE_V1_MULTIPROCESSING=0 (vLLM #9318,
  #16434; TRL #3859). The documented way in is `LLM.collective_rpc`: `WeightLoader` is given to vLLM as
  `worker_extension_cls`, vLLM mixes it into its worker class, and `sync_weights` calls its
  `tether_load_weights` on every worker with one bucket of (name, tensor) pairs at a time
  (`rollout.vllm_sync_bucket_mb`), which the worker hands to `model.load_weights`. One call per parameter
  took minutes per sync for large models in other trainers (TRL #6386). The tensors travel as CPU tensors,
  which any transport between processes can carry; names are the Hugging Face checkpoint's (vLLM maps them
  onto its fused layers), LoRA adapters merged in for the copy.
- Token in, token out. Prompts go to vLLM as `{"prompt_token_ids": [...]}`, the very ids the trainer
  trains on (the chat template rendered once, by tether), and the sampled `token_ids` are used as they are;
  nothing is decoded and re-encoded. `logprobs_mode="processed_logprobs"` makes the recorded log-probs
  those of the distribution the tokens were drawn from (after temperature, top-k and top-p); vLLM keeps
  its top-k / top-p sets by the same rule as transformers' warpers, which is the set the trainer evaluates
  (core/logprobs.py), so the sampler/trainer mismatch check holds there too, up to vLLM's bf16.
- Sleep mode (`rollout.vllm_sleep`): after generating, `sleep(level=1)` moves vLLM's weights to host
  memory and frees its KV cache for the update; `sync_weights` wakes the weights, loads the new ones, then
  wakes the KV cache (level 1, not 2: level 2 then needs a reload of the weights first, vLLM #29341).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tether.rollout.batch import Rollout
from tether.rollout.hf import completion_mask, encode_prompts, eos_ids

SUPPORTED = ((0, 10, 2), (0, 12, 0))  # [lowest, first unsupported)
WORKER_EXTENSION = f"{__name__}.WeightLoader"


class VLLMVersionError(ImportError):
    """The installed vLLM is outside the range this backend was written against."""


def check_version(version: str) -> None:
    """A clear error for a vLLM outside SUPPORTED (older ones have no V1 worker extensions or logprobs_mode)."""
    parts = tuple(int(x) for x in re.findall(r"\d+", version)[:3])
    lo, hi = SUPPORTED
    if not lo <= parts < hi:
        raise VLLMVersionError(
            f"vLLM {version} is installed; tether's vLLM backend supports >= {'.'.join(map(str, lo))}, "
            f"< {'.'.join(map(str, hi))} (pip install \"tether[vllm]\")")


def require_cuda(backend: str = "vllm") -> None:
    if not torch.cuda.is_available():
        why = " (the weights go to the server over NCCL)" if backend == "vllm-server" else ""
        raise RuntimeError(f"rollout.backend='{backend}' needs a CUDA GPU{why}; use rollout.backend=hf on CPU")


class WeightLoader:
    """Mixed into vLLM's worker class (`worker_extension_cls`): methods that `collective_rpc` runs on every
    worker, with `self` the worker."""

    def tether_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        # model_runner.model may be a CUDA-graph wrapper; load_weights reaches the model through it.
        self.model_runner.model.load_weights(weights=weights)
        return len(weights)

    def tether_sum_of_squares(self) -> float:
        """Sum of the squares of the served model's parameters (float64): whatever vLLM fuses or pads (with
        zeros), it equals the trainer's over its checkpoint weights, up to vLLM's dtype. A check that a sync
        arrived."""
        params = self.model_runner.get_model().parameters()  # get_model: the model out of its CUDA-graph wrapper
        return float(sum(p.detach().double().pow(2).sum().item() for p in params))


def hf_weight_names(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under its Hugging Face checkpoint names, as TRL's colocated sync names them; a
    tied weight once, under its first name (vLLM's models skip lm_head.weight when the embeddings are tied).

    A LoRA policy's layers come merged, W + delta W of the active adapters (peft's get_delta_weight), computed
    for the copy only: peft's merge_adapter / unmerge_adapter would add and subtract delta W in place, and
    leave the trained base weights off by rounding after every sync. Under FSDP2 every weight (and delta W)
    is a sharded DTensor and comes gathered whole: a collective, so every rank runs the sync."""
    from torch.distributed.tensor import DTensor

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    modules = dict(policy.named_modules())
    tied = ({n for n, _ in policy.named_parameters(remove_duplicate=False)}
            - {n for n, _ in policy.named_parameters()})  # the later names of a shared parameter
    for name, tensor in policy.state_dict().items():
        if "lora_" in name or "original_module" in name or name in tied:
            continue
        tensor = whole(tensor)
        layer = modules.get(name.removesuffix(".base_layer.weight")) if name.endswith(".base_layer.weight") else None
        if layer is not None and hasattr(layer, "get_delta_weight") and not getattr(layer, "merged", False):
            with torch.no_grad():
                for adapter in layer.active_adapters:
                    if adapter in getattr(layer, "lora_A", {}):
                        tensor = tensor + whole(layer.get_delta_weight(adapter)).to(tensor.dtype)
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        name = name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", "")
        yield name, tensor


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int, *, to_cpu: bool = True,
            one_dtype: bool = False) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive (name, tensor) lists of at most `max_bytes` each (a larger tensor goes alone): CPU copies
    (`to_cpu`, for a transport between processes) or the tensors where they are; with `one_dtype` a bucket
    also ends where the dtype changes (it travels as one flat tensor)."""
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > max_bytes or (one_dtype and tensor.dtype != bucket[0][1].dtype)):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.detach().to("cpu", copy=True).contiguous() if to_cpu else tensor.detach()))
        size += nbytes
    if bucket:
        yield bucket


class VLLMBackend:
    """Sample with a colocated vLLM engine; `sync_weights` after every optimiser step."""

    def __init__(self, policy: nn.Module, tokenizer, model_path: str, rollout_cfg, *, chat_template: bool = False,
                 system_prompt: str | None = None, seed: int = 0):
        try:
            vllm = importlib.import_module("vllm")
        except ImportError as e:  # depends on the optional extra
            raise ImportError("rollout.backend='vllm' needs vLLM: pip install 'tether[vllm]' (CUDA only)") from e
        check_version(getattr(vllm, "__version__", "0"))
        require_cuda()
        self.tokenizer = tokenizer
        self.cfg = rollout_cfg
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.eos = eos_ids(tokenizer, policy)
        self.policy = policy
        self.SamplingParams = vllm.SamplingParams
        self.sleeping = False
        from tether.model_sources import resolve_model_source

        # A .gguf file or builtin: name is imported once into a plain HF directory, as for the trainer.
        self.llm = vllm.LLM(model=resolve_model_source(model_path), dtype="bfloat16", seed=seed,
                            gpu_memory_utilization=rollout_cfg.vllm_gpu_memory_utilization,
                            enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                            worker_extension_cls=WORKER_EXTENSION, enable_sleep_mode=rollout_cfg.vllm_sleep)

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens

    def sync_weights(self, policy: nn.Module) -> None:
        """Push the policy's weights into every vLLM worker, bucket by bucket (LoRA merged for the copy)."""
        self.policy = policy
        if self.sleeping:
            self.llm.wake_up(tags=["weights"])
        max_bytes = int(self.cfg.vllm_sync_bucket_mb * 2**20)
        for bucket in buckets(hf_weight_names(policy), max_bytes):
            self.llm.collective_rpc("tether_load_weights", args=(bucket,))
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = False
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    def sum_of_squares(self) -> list[float]:
        """`WeightLoader.tether_sum_of_squares` of each worker."""
        return [float(x) for x in self.llm.collective_rpc("tether_sum_of_squares")]

    @torch.no_grad()
    def generate(self, rows: list[dict], prompts: list, *, group_size: int) -> Rollout:
        c = self.cfg
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False
        device = next(self.policy.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, chat_template=self.chat_template,
                                                 system_prompt=self.system_prompt, device=torch.device("cpu"))
        token_prompts = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(prompt_ids, prompt_mask)]
        params = self.SamplingParams(n=group_size, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                     max_tokens=c.max_new_tokens, logprobs=0, stop_token_ids=list(self.eos),
                                     seed=int(torch.randint(0, 2**31 - 1, ()).item()), detokenize=False)
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        if c.vllm_sleep:
            self.llm.sleep(level=1)
            self.sleeping = True
        samples = [Sample(i, list(o.token_ids), [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs or [])],
                          o.finish_reason) for i, out in enumerate(outputs) for o in out.outputs]
        return rollout_from_samples(samples, self.tokenizer, self.eos, prompt_ids, prompt_mask, rows, prompts,
                                    group_size=group_size, device=device)


@dataclass
class Sample:
    """One completion as a vLLM engine returns it: the prompt it answers (an index into the prompts sent), the
    sampled token ids and their recorded log-probs, and why it ended ('stop' or 'length')."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


def rollout_from_samples(samples: list[Sample], tokenizer, eos: list[int], prompt_ids_PL: torch.Tensor,
                         prompt_mask_PL: torch.Tensor, rows: list[dict], prompts: list, *, group_size: int,
                         device: torch.device) -> Rollout:
    """The training batch from vLLM's samples, token out: each completion's ids exactly as sampled, after the
    prompt ids that were sent (left-padded, as the trainer lays prompts out), masked through the first end
    token; the text is decoded once, for the rewards."""
    T = max(max((len(s.token_ids) for s in samples), default=1), 1)
    B = len(samples)
    comp = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
    lps = torch.zeros(B, T)
    gen_len = torch.zeros(B, dtype=torch.long)
    for b, s in enumerate(samples):
        if len(s.logprobs) != len(s.token_ids):
            raise RuntimeError(f"vLLM returned {len(s.logprobs)} log-probs for {len(s.token_ids)} sampled tokens "
                               "(sampling parameters must ask for logprobs=0)")
        comp[b, :len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.long)
        lps[b, :len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
        gen_len[b] = len(s.token_ids)
    mask, _ = completion_mask(comp, eos, gen_len)
    truncated = torch.tensor([s.finish_reason == "length" for s in samples])
    src = torch.tensor([s.prompt_index for s in samples])
    comp = torch.where(mask.bool(), comp, tokenizer.pad_token_id)
    return Rollout(
        input_ids_BL=torch.cat([prompt_ids_PL[src], comp], 1).to(device),
        attention_mask_BL=torch.cat([prompt_mask_PL[src], mask.long()], 1).to(device),
        prompt_len=prompt_ids_PL.shape[1], response_mask_BT=mask.to(device),
        sampler_logprobs_BT=torch.where(mask.bool(), lps, 0.0).to(device), truncated_B=truncated.to(device),
        prompts=[prompts[s.prompt_index] for s in samples],
        completions=tokenizer.batch_decode(comp, skip_special_tokens=True),
        rows=[rows[s.prompt_index] for s in samples], group_size=group_size,
    )
