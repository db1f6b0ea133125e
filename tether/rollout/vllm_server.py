"""Rollouts from a separate `vllm serve` (`rollout.backend=vllm-server`): generation runs on the server's GPUs,
the update on the trainer's, and the new weights are pushed to the server after every optimiser step.

Written against vLLM 0.10.2 - 0.11.x (`vllm.SUPPORTED`), read from its source (entrypoints/openai/
api_server.py, protocol.py, serving_completion.py; distributed/utils.py, device_communicators/pynccl.py).
Start the server on GPUs the trainer does not use, from the model the trainer starts from:

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL_DIR --logprobs-mode processed_logprobs \\
        --worker-extension-cls tether.rollout.vllm_server.WeightReceiver

- Generation: `POST /v1/completions` with token-id prompts (`"prompt": [[ids], ...]`: the chat template is
  rendered once, by tether), `n` = the group size, `logprobs: 0` and `return_token_ids: true`. Each choice
  carries the prompt ids the server saw (checked against the ids sent: token in) and its sampled `token_ids`
  (used as they are: token out), with `logprobs.token_logprobs` one per sampled token, of the distribution
  sampled from (`--logprobs-mode processed_logprobs`, checked at connection). Choices come prompt-major.
- Weights: `POST /collective_rpc` (a development endpoint, hence VLLM_SERVER_DEV_MODE=1) runs
  `WeightReceiver`'s methods on every worker of the server. The tensors go over NCCL, not HTTP: at the first
  sync the trainer (rank 0) and the server's workers (ranks 1..) form a `StatelessProcessGroup` with a
  `PyNcclCommunicator`, as vLLM's RLHF example and TRL's vLLM client do. Then, bucket by bucket (one dtype, at
  most `rollout.vllm_sync_bucket_mb`), the trainer posts the names and shapes and broadcasts one flat tensor;
  each worker splits it and hands the pieces, under Hugging Face checkpoint names (LoRA merged for the copy),
  to its model's `load_weights`. The HTTP call returns once the workers have loaded the bucket, so it runs in a
  thread while the trainer broadcasts. One call per parameter took minutes per sync for large models in other
  trainers (TRL #6386).
- The first generate pushes the trainer's weights before sampling, so a resumed or fine-tuned policy is what
  the server samples from whatever checkpoint it loaded. The prefix cache is reset after every push.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import socket
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from tether.rollout.batch import Rollout
from tether.rollout.hf import encode_prompts, eos_ids
from tether.rollout.vllm import (Sample, WeightLoader, buckets, check_version, hf_weight_names, require_cuda,
                                 rollout_from_samples)

log = logging.getLogger("tether")

WORKER_EXTENSION = f"{__name__}.WeightReceiver"
SERVE_COMMAND = ("VLLM_SERVER_DEV_MODE=1 vllm serve MODEL_DIR --logprobs-mode processed_logprobs "
                 f"--worker-extension-cls {WORKER_EXTENSION}")


class VLLMServerError(RuntimeError):
    """The vLLM server cannot be reached, or was not started the way tether needs it."""


class WeightReceiver(WeightLoader):
    """Mixed into the server's worker class (`--worker-extension-cls`): methods that `/collective_rpc` runs on
    every worker, with `self` the worker (its `rank`, `device` and `model_runner` are vLLM's). Arguments arrive
    as JSON values."""

    def tether_server_info(self) -> dict:
        model_config = getattr(getattr(self, "vllm_config", None), "model_config", None)
        return {"rank": int(self.rank), "logprobs_mode": str(getattr(model_config, "logprobs_mode", "unknown"))}

    def tether_init_weight_transfer(self, host: str, port: int, world_size: int) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=int(port), rank=int(self.rank) + 1,
                                             world_size=int(world_size))
        self.tether_comm = PyNcclCommunicator(group, device=self.device)

    def tether_receive_bucket(self, meta: str) -> int:
        """`meta`: JSON {"dtype": "bfloat16", "names": [...], "shapes": [[...], ...]} of the flat tensor that the
        trainer broadcasts next."""
        m = json.loads(meta)
        numels = [math.prod(shape) for shape in m["shapes"]]
        flat = torch.empty(sum(numels), dtype=getattr(torch, m["dtype"]), device=self.device)
        self.tether_comm.broadcast(flat, src=0, stream=torch.cuda.current_stream() if flat.is_cuda else None)
        pieces = [piece.view(shape) for piece, shape in zip(flat.split(numels), m["shapes"])]
        self.model_runner.model.load_weights(weights=list(zip(m["names"], pieces)))
        return len(pieces)


class ServerClient:
    """The HTTP calls tether makes to `vllm serve`, with errors that say what to change."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url.rstrip("/"), timeout

    def call(self, path: str, body: dict | None = None, *, method: str = "POST") -> dict | None:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            if e.code == 404 and path in ("/collective_rpc", "/sleep", "/wake_up", "/reset_prefix_cache"):
                raise VLLMServerError(f"the vLLM server at {self.url} has no {path}: it is a development endpoint; "
                                      f"start the server with VLLM_SERVER_DEV_MODE=1 ({SERVE_COMMAND})") from e
            raise VLLMServerError(f"vLLM server {self.url}{path}: HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise VLLMServerError(f"no vLLM server answers at {self.url} ({getattr(e, 'reason', e)}); start one "
                                  f"with: {SERVE_COMMAND}, and set rollout.vllm_server_url") from e
        return json.loads(text) if text else None

    def collective_rpc(self, method: str, *args) -> list:
        """One result per worker of the server."""
        return self.call("/collective_rpc", {"method": method, "args": list(args)})["results"]


def local_address_towards(url: str) -> str:
    """This machine's address on the route to the server (where the server's workers reach the trainer)."""
    host = urllib.parse.urlsplit(url).hostname or "localhost"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP: no packet is sent; the kernel picks the outgoing interface
        return s.getsockname()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class VLLMServerBackend:
    """Sample from a `vllm serve` server; `sync_weights` pushes the policy to it after every optimiser step."""

    def __init__(self, policy: nn.Module, tokenizer, rollout_cfg, *, chat_template: bool = False,
                 system_prompt: str | None = None):
        self.tokenizer, self.cfg, self.policy = tokenizer, rollout_cfg, policy
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.eos = eos_ids(tokenizer, policy)
        try:  # the trainer's side of the weight transfer is vLLM's too
            vllm = importlib.import_module("vllm")
        except ImportError as e:  # depends on the optional extra
            raise ImportError("rollout.backend='vllm-server' needs vLLM on the trainer's machine too (its NCCL "
                              "weight transfer): pip install 'tether[vllm]'") from e
        check_version(getattr(vllm, "__version__", "0"))
        require_cuda("vllm-server")
        self.server = ServerClient(rollout_cfg.vllm_server_url, rollout_cfg.vllm_server_timeout)
        check_version(self.server.call("/version", method="GET")["version"])
        try:
            info = self.server.collective_rpc("tether_server_info")
        except VLLMServerError as e:
            if "HTTP 500" not in str(e):
                raise
            raise VLLMServerError(f"the vLLM server at {self.server.url} runs without tether's worker extension: "
                                  f"start it with --worker-extension-cls {WORKER_EXTENSION} ({SERVE_COMMAND})") from e
        modes = {w["logprobs_mode"] for w in info}
        if modes != {"processed_logprobs"}:
            raise VLLMServerError(f"the vLLM server records {', '.join(sorted(modes))} log-probs: start it with "
                                  "--logprobs-mode processed_logprobs, the log-probs of the distribution it "
                                  "samples from, which the trainer's importance ratios compare against")
        self.workers = len(info)
        self.comm = None  # NCCL group with the server's workers, formed at the first sync
        self.synced = False

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens

    def _connect(self, device: torch.device) -> None:
        """Form the weight-transfer group: the server's workers join it in an HTTP call that returns only when
        the group stands, so that call runs in a thread while this process joins as rank 0."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        host, port, world = local_address_towards(self.server.url), free_port(), 1 + self.workers
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(self.server.collective_rpc, "tether_init_weight_transfer", host, port, world)
            group = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world)
            self.comm = PyNcclCommunicator(group, device=device)
            joined.result()
        log.info("vLLM server %s: weight transfer group of %d ranks on %s:%d", self.server.url, world, host, port)

    def sync_weights(self, policy: nn.Module) -> None:
        """Push the policy's weights to every worker of the server, one flat tensor per bucket."""
        self.policy = policy
        device = next(policy.parameters()).device
        if self.comm is None:
            self._connect(device)
        max_bytes = int(self.cfg.vllm_sync_bucket_mb * 2**20)
        with ThreadPoolExecutor(1) as pool:
            for bucket in buckets(hf_weight_names(policy), max_bytes, to_cpu=False, one_dtype=True):
                meta = {"dtype": str(bucket[0][1].dtype).removeprefix("torch."), "names": [n for n, _ in bucket],
                        "shapes": [list(t.shape) for _, t in bucket]}
                loaded = pool.submit(self.server.collective_rpc, "tether_receive_bucket", json.dumps(meta))
                flat = torch.cat([t.reshape(-1) for _, t in bucket]).to(device)
                self.comm.broadcast(flat, src=0, stream=torch.cuda.current_stream() if flat.is_cuda else None)
                counts = [int(c) for c in loaded.result()]  # the endpoint returns an int as its str
                if counts != [len(bucket)] * self.workers:
                    raise VLLMServerError(f"the server's workers loaded {counts} of {len(bucket)} weights")
        self.server.call("/reset_prefix_cache")  # cached KV was computed with the old weights
        self.synced = True

    def sum_of_squares(self) -> list[float]:
        """`WeightReceiver.tether_sum_of_squares` of each worker: a check that a push reached the server."""
        return [float(x) for x in self.server.collective_rpc("tether_sum_of_squares")]

    @torch.no_grad()
    def generate(self, rows: list[dict], prompts: list, *, group_size: int) -> Rollout:
        c = self.cfg
        if not self.synced:
            self.sync_weights(self.policy)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, chat_template=self.chat_template,
                                                 system_prompt=self.system_prompt, device=torch.device("cpu"))
        sent = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
        response = self.server.call("/v1/completions", {
            "prompt": sent, "n": group_size, "max_tokens": c.max_new_tokens, "temperature": c.temperature,
            "top_p": c.top_p, "top_k": c.top_k, "logprobs": 0, "return_token_ids": True,
            "stop_token_ids": list(self.eos), "seed": int(torch.randint(0, 2**31 - 1, ()).item())})
        choices = sorted(response["choices"], key=lambda ch: ch["index"])
        if len(choices) != len(sent) * group_size:
            raise VLLMServerError(f"the server returned {len(choices)} completions for {len(sent)} prompts x "
                                  f"{group_size}")
        samples = []
        for ch in choices:
            i = ch["index"] // group_size  # prompt-major, as serving_completion.py numbers them
            if ch["prompt_token_ids"] != sent[i]:
                raise VLLMServerError(f"prompt {i}: the server sampled from other token ids than were sent "
                                      f"({len(ch['prompt_token_ids'])} vs {len(sent[i])} tokens)")
            samples.append(Sample(i, ch["token_ids"], ch["logprobs"]["token_logprobs"], ch["finish_reason"]))
        return rollout_from_samples(samples, self.tokenizer, self.eos, prompt_ids, prompt_mask, rows, prompts,
                                    group_size=group_size, device=next(self.policy.parameters()).device)
