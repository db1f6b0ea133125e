"""A stand-in for the `vllm` package that implements exactly the calls tether's vLLM backend makes, with the
names, signatures and semantics of vLLM 0.11.0's own source (entrypoints/llm.py, sampling_params.py,
outputs.py, worker/worker_base.py), on CPU, with a Hugging Face copy of the model as its engine:

- `LLM(model, *, dtype, seed, gpu_memory_utilization, **engine_args)`: only EngineArgs names that exist
  are accepted; `worker_extension_cls` (a qualified name) is mixed into the worker class as vLLM's
  WorkerWrapperBase.init_worker does, and its methods run with `self` the worker.
- `collective_rpc(method, timeout=None, args=(), kwargs=None) -> list` (one result per worker); the
  arguments must survive pickling, as they cross into the engine-core process.
- the worker's `model_runner.model.load_weights(weights)` takes Hugging Face checkpoint names only and
  returns the set of names loaded, as vLLM's models do.
- `generate(prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None)` with
  TokensPrompt dicts; `RequestOutput.prompt_token_ids / .outputs[k].token_ids / .logprobs (list of
  {token_id: Logprob}) / .finish_reason ("stop" | "length")`; with logprobs_mode="processed_logprobs" the
  log-probs are of the distribution sampled from (temperature, then top-k, then top-p; 0 or -1 turn top-k
  off).
- `sleep(level=1)` (resets the prefix cache first), `wake_up(tags=None)` with tags "weights", "kv_cache",
  `reset_prefix_cache(device=None) -> bool`. Generating or loading weights while the needed part sleeps
  is an error here (on a GPU it would read freed memory).

Every call is appended to `LLM.calls` so tests can check the sequence.
"""

from __future__ import annotations

import importlib
import pickle
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

__version__ = "0.11.0"

ENGINE_ARGS = {"max_model_len", "enable_prefix_caching", "logprobs_mode", "worker_extension_cls",
               "enable_sleep_mode", "max_num_batched_tokens", "distributed_executor_backend", "tensor_parallel_size"}
LOGPROBS_MODES = ("raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    logprobs: int | None = None
    seed: int | None = None
    stop: list | None = None
    stop_token_ids: list | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True

    def __post_init__(self):
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    outputs: list = field(default_factory=list)
    finished: bool = True


# models/llama.py and qwen2.py of vLLM 0.11.0: the checkpoint's q/k/v and gate/up projections load into fused
# parameters, each as a shard (LlamaModel.load_weights' stacked_params_mapping).
STACKED = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1))


def vllm_parameters(config) -> dict[str, set]:
    """The parameter names of vLLM 0.11.0's LlamaForCausalLM / Qwen2ForCausalLM for a Hugging Face config, each
    with the shards it is loaded from ({None}: loaded whole). Tied embeddings: no lm_head of its own."""
    if config.model_type in ("llama", "mistral"):  # LlamaAttention(bias=attention_bias, bias_o_proj=...)
        qkv_bias = o_bias = bool(getattr(config, "attention_bias", False) or getattr(config, "bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
    elif config.model_type == "qwen2":  # Qwen2Attention: qkv_proj bias=True, o_proj bias=False; MLP no bias
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        raise NotImplementedError(config.model_type)
    params = {"model.embed_tokens.weight": {None}, "model.norm.weight": {None}}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        fused = {"self_attn.qkv_proj": ({"q", "k", "v"}, qkv_bias), "self_attn.o_proj": ({None}, o_bias),
                 "mlp.gate_up_proj": ({0, 1}, mlp_bias), "mlp.down_proj": ({None}, mlp_bias)}
        for module, (shards, bias) in fused.items():
            params[f"{layer}{module}.weight"] = shards
            if bias:
                params[f"{layer}{module}.bias"] = shards
        params[f"{layer}input_layernorm.weight"] = params[f"{layer}post_attention_layernorm.weight"] = {None}
    if not config.tie_word_embeddings:
        params["lm_head.weight"] = {None}
    return params


class FakeModel:
    """vLLM's model as load_weights sees it: Hugging Face checkpoint names in, mapped onto vLLM's own (fused)
    parameter names as vLLM 0.11.0's Llama and Qwen2 do (a name with no parameter there is a KeyError, as
    `params_dict[name]` is; lm_head skipped when tied, as AutoWeightsLoader's skip_prefixes does); the set of
    vLLM names loaded out. `loads` records every (vLLM name, shard) loaded, so a test can check that one sync
    filled every parameter exactly once. The weights themselves go into the HF copy that generates."""

    def __init__(self, hf_model):
        self.hf = hf_model
        self.params = vllm_parameters(hf_model.config)
        self.loads: list[tuple[str, object]] = []

    def load_weights(self, weights) -> set[str]:
        hf_params = self.hf.state_dict(keep_vars=True)  # tied weights under each of their names
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                if "rotary_emb.inv_freq" in name or (self.hf.config.tie_word_embeddings
                                                     and name.startswith("lm_head.")):
                    continue
                target, shard = name, None
                for param_name, weight_name, shard_id in STACKED:
                    if weight_name in name:
                        target, shard = name.replace(weight_name, param_name), shard_id
                        break
                if target not in self.params:
                    raise KeyError(target)
                hf_params[name].copy_(tensor)
                self.loads.append((target, shard))
                loaded.add(target)
        return loaded

    def unfilled(self, loads: list[tuple[str, object]]) -> dict[str, object]:
        """What `loads` leaves wrong: each vLLM parameter's shards loaded, against the shards it has."""
        got: dict[str, list] = {}
        for name, shard in loads:
            got.setdefault(name, []).append(shard)
        return {name: sorted(map(str, got.get(name, []))) for name, shards in self.params.items()
                if sorted(map(str, got.get(name, []))) != sorted(map(str, shards))}


class WorkerBase:
    """vLLM's V1 worker as an extension sees it: `rank` (global), `device`, `vllm_config`, `model_runner`."""

    def __init__(self, hf_model, rank: int, logprobs_mode: str):
        self.rank, self.device = rank, torch.device("cpu")
        self.vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(logprobs_mode=logprobs_mode))
        model = FakeModel(hf_model)
        self.model_runner = types.SimpleNamespace(model=model, get_model=lambda: model.hf)


class LLM:
    def __init__(self, model: str, *, dtype="auto", seed=None, gpu_memory_utilization: float = 0.9, **kwargs):
        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {sorted(unknown)}")
        mode = kwargs.get("logprobs_mode", "raw_logprobs")
        if mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode {mode!r}")
        self.engine_args = dict(kwargs, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization)
        self.calls: list[tuple] = [("LLM", model)]
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.processed = mode.startswith("processed")
        bases = [WorkerBase]
        ext = kwargs.get("worker_extension_cls", "")
        if ext:
            module, _, name = ext.rpartition(".")
            bases.insert(0, getattr(importlib.import_module(module), name))
        worker_cls = type("Worker", tuple(bases), {})
        # Tensor parallelism: one worker per rank (here each holds the whole model; vLLM's load_weights
        # takes every rank's shard from the full tensors it is given).
        self.workers = [worker_cls(self.hf, rank, mode) for rank in range(kwargs.get("tensor_parallel_size", 1))]
        self.worker = self.workers[0]
        self.sleep_mode = kwargs.get("enable_sleep_mode", False)
        self.asleep: set[str] = set()

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        self.calls.append(("collective_rpc", method if isinstance(method, str) else method.__name__))
        if "weights" in self.asleep:
            raise RuntimeError("collective_rpc into sleeping weights: wake_up(tags=['weights']) first")
        args, kwargs = pickle.loads(pickle.dumps((args, kwargs or {})))  # what reaches the engine core
        fns = [getattr(w, method) if isinstance(method, str) else types.MethodType(method, w) for w in self.workers]
        if len(fns) == 1:
            return [fns[0](*args, **kwargs)]
        with ThreadPoolExecutor(len(fns)) as pool:  # each worker is a process of its own in vLLM
            return [f.result() for f in [pool.submit(fn, *args, **kwargs) for fn in fns]]

    def sleep(self, level: int = 1) -> None:
        if not self.sleep_mode:
            raise RuntimeError("sleep() needs LLM(enable_sleep_mode=True)")
        self.reset_prefix_cache()
        self.calls.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tuple(tags) if tags else None))
        for tag in tags or ("weights", "kv_cache"):
            if tag not in ("weights", "kv_cache"):
                raise ValueError(f"unknown tag {tag!r}")
            self.asleep.discard(tag)

    def reset_prefix_cache(self, device=None) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None):
        self.calls.append(("generate", len(prompts)))
        if self.asleep:
            raise RuntimeError(f"generate while {sorted(self.asleep)} sleep: wake_up() first")
        p = sampling_params or SamplingParams()
        g = torch.Generator().manual_seed(p.seed if p.seed is not None else 0)
        warpers = [TemperatureLogitsWarper(p.temperature)] if p.temperature != 1.0 else []
        if p.top_k > 0:
            warpers.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            warpers.append(TopPLogitsWarper(p.top_p))
        stops = set(p.stop_token_ids or []) | {self.hf.config.eos_token_id}
        results = []
        for r, prompt in enumerate(prompts):
            if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
                raise TypeError("this contract expects token-in prompts: {'prompt_token_ids': [...]}")
            outs = []
            for k in range(p.n):
                ids, lps, finish = list(prompt["prompt_token_ids"]), [], "length"
                for _ in range(p.max_tokens):
                    raw = self.hf(torch.tensor([ids])).logits[:, -1].float()
                    scores = raw
                    for w in warpers:
                        scores = w(None, scores)
                    logp = torch.log_softmax(scores, -1)
                    tok = int(torch.multinomial(logp.exp(), 1, generator=g))
                    ids.append(tok)
                    recorded = logp if self.processed else torch.log_softmax(raw, -1)
                    lps.append({tok: Logprob(recorded[0, tok].item(), rank=1)})
                    if tok in stops:
                        finish = "stop"
                        break
                gen = ids[len(prompt["prompt_token_ids"]):]
                outs.append(CompletionOutput(index=k, text="", token_ids=gen, cumulative_logprob=None,
                                             logprobs=lps if p.logprobs is not None else None,
                                             finish_reason=finish))
            results.append(RequestOutput(str(r), None, list(prompt["prompt_token_ids"]), outs))
        return results


# vllm.distributed.utils.StatelessProcessGroup and vllm.distributed.device_communicators.pynccl.PyNcclCommunicator,
# as the weight transfer of a `vllm serve` server uses them (0.11.0's signatures). vLLM's group is a TCPStore
# for metadata with NCCL for the tensors; here the store carries the tensors too, so that the trainer and the
# fake server's workers (threads) can broadcast on CPU.


class StatelessProcessGroup:
    def __init__(self, rank: int, world_size: int, store):
        self.rank, self.world_size, self.store = rank, world_size, store

    @staticmethod
    def create(host: str, port: int, rank: int, world_size: int, data_expiration_seconds: int = 3600,
               store_timeout: int = 300) -> "StatelessProcessGroup":
        from datetime import timedelta

        store = torch.distributed.TCPStore(host, port, world_size, is_master=rank == 0,
                                           timeout=timedelta(seconds=store_timeout))
        return StatelessProcessGroup(rank, world_size, store)


class PyNcclCommunicator:
    def __init__(self, group: StatelessProcessGroup, device, library_path: str | None = None):
        self.group, self.device, self.broadcasts = group, torch.device(device), 0

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        assert tensor.device == self.device, (tensor.device, self.device)
        key = f"broadcast/{self.broadcasts}"
        self.broadcasts += 1
        if self.group.rank == src:
            self.group.store.set(key, tensor.contiguous().view(torch.uint8).numpy().tobytes())
        else:
            data = bytearray(self.group.store.get(key))
            tensor.copy_(torch.frombuffer(data, dtype=torch.uint8).view(tensor.dtype).view(tensor.shape))
