"""The vllm-server backend against a fake `vllm serve` (fake_vllm_server.py: vLLM 0.11.0's HTTP endpoints and
JSON, a tensor-parallel pair of fake workers behind them) on CPU: token-in prompts and token-out completions,
the weight push in one-dtype buckets over the transfer group, the server's weights equal to the trainer's after
every push, and a clear error for each way a server can be started wrong. The real server runs only where CUDA
and vLLM are (test_vllm.py)."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

from tether.config import ConfigError, resolve_config
from tether.rewards.functions import RewardScorer
from tether.tasks.tiny_model import build_tiny_model
from tether.train.loop import Trainer

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("llama"), hidden_size=32, num_layers=2, seed=0))


@pytest.fixture
def fake_vllm(monkeypatch):
    spec = importlib.util.spec_from_file_location("vllm", HERE / "fake_vllm.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vllm", module)  # before exec: its dataclasses look their module up
    spec.loader.exec_module(module)
    # The two classes of vllm.distributed that the weight transfer uses, under their own module paths.
    for name, attrs in (("vllm.distributed", {}), ("vllm.distributed.device_communicators", {}),
                        ("vllm.distributed.utils", {"StatelessProcessGroup": module.StatelessProcessGroup}),
                        ("vllm.distributed.device_communicators.pynccl",
                         {"PyNcclCommunicator": module.PyNcclCommunicator})):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__name__=name, **attrs))
    monkeypatch.setattr("tether.rollout.vllm_server.require_cuda", lambda backend: None)  # NCCL; a TCP store here
    return module


@pytest.fixture
def serve(fake_vllm, llama):
    spec = importlib.util.spec_from_file_location("fake_vllm_server", HERE / "fake_vllm_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    servers = []

    def start(**kwargs):
        servers.append(module.FakeVLLMServer(fake_vllm, llama, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def length_reward(prompts, completions, **_):
    return [len(c) / 8 for c in completions]


def trainer(path, url, **over) -> Trainer:
    raw = {"model": {"path": path}, "algorithm": {"name": "grpo", "minibatches": 1}, "seed": 0, "steps": 3,
           "rollout": {"backend": "vllm-server", "vllm_server_url": url, "max_new_tokens": 6,
                       "prompts_per_step": 3, "group_size": 2, "vllm_server_timeout": 60},
           "optim": {"lr": 1e-2}, "logging": {"progress": False}}
    cfg = resolve_config(raw, [f"{k}={v}" for k, v in over.items()])
    rows = [{"prompt": p} for p in ("1+1=", "12+34=", "9=", "7*8=", "100-1=", "3+3=")]
    return Trainer(cfg, rows=rows, reward_fn=RewardScorer([(length_reward, 1.0)]))


def rpcs(server, method=None):
    return [b for p, b in server.requests if p == "/collective_rpc" and (method is None or b["method"] == method)]


def assert_server_holds(server, policy):
    from tether.rollout.vllm import hf_weight_names

    engine = server.llm.hf.state_dict()
    for name, tensor in hf_weight_names(policy):
        torch.testing.assert_close(engine[name], tensor, rtol=0, atol=0, msg=name)


def test_token_in_token_out_and_the_server_holds_the_trainers_weights(serve, llama):
    server = serve()
    t = trainer(llama, server.url)
    assert server.requests[0] == ("/version", None)
    assert rpcs(server)[0] == {"method": "tether_server_info", "args": []}
    for step in range(2):
        res = t.step()
        r, m = res.rollout, res.metrics
        # The fp32 fake samples from the trainer's very weights (pushed before the first batch, then after
        # every update): the gap is float order only, as for HF generate.
        assert m["rollout/logprob_mismatch_max"] < 1e-4, (step, m["rollout/logprob_mismatch_max"])
        assert_server_holds(server, t.policy)
        # Token in: the prompts went as the trainer's own ids, left padding stripped; the server echoed them.
        body = [b for p, b in server.requests if p == "/v1/completions"][-1]
        assert body["return_token_ids"] is True and body["logprobs"] == 0 and body["n"] == 2
        ids, mask = r.input_ids_BL[:, :r.prompt_len], r.attention_mask_BL[:, :r.prompt_len].bool()
        assert [ids[b][mask[b]].tolist() for b in range(0, len(r), 2)] == body["prompt"]
    # Order: info; the transfer group; buckets; cache reset; then the first batch.
    paths = [p if p != "/collective_rpc" else b["method"] for p, b in server.requests]
    first = paths.index("/v1/completions")
    assert paths[1:3] == ["tether_server_info", "tether_init_weight_transfer"]
    assert set(paths[3:first - 1]) == {"tether_receive_bucket"} and paths[first - 1] == "/reset_prefix_cache"
    host, port, world = rpcs(server, "tether_init_weight_transfer")[0]["args"]
    assert host == "127.0.0.1" and world == 3  # the trainer and the server's two tensor-parallel workers
    assert len(rpcs(server, "tether_init_weight_transfer")) == 1  # the group is formed once


def test_weights_go_once_each_in_one_dtype_buckets(serve, llama):
    from tether.rollout.vllm import hf_weight_names

    server = serve()
    t = trainer(llama, server.url, **{"rollout.vllm_sync_bucket_mb": 0.01})  # ~10 KB: many buckets
    with torch.no_grad():
        t.policy.model.embed_tokens.weight.add_(0.5)  # a change that only a push can bring to the server
    t.backend.sync_weights(t.policy)
    metas = [json.loads(b["args"][0]) for b in rpcs(server, "tether_receive_bucket")]
    names = [n for n, _ in hf_weight_names(t.policy)]
    flat = [n for m in metas for n in m["names"]]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: sent once
    assert len(metas) > 2 and sorted(flat) == sorted(names) == sorted(set(flat))
    shapes = {n: list(p.shape) for n, p in hf_weight_names(t.policy)}
    for m in metas:
        assert m["dtype"] == "float32" and [shapes[n] for n in m["names"]] == m["shapes"]
        if len(m["names"]) > 1:
            assert sum(torch.Size(s).numel() * 4 for s in m["shapes"]) <= 0.01 * 2**20
    assert_server_holds(server, t.policy)
    expected = sum(w.double().pow(2).sum().item() for _, w in hf_weight_names(t.policy))
    assert t.backend.sum_of_squares() == [pytest.approx(expected, rel=1e-12)] * 2  # each worker's copy


def test_lora_is_merged_for_the_push(serve, llama):
    server = serve()
    t = trainer(llama, server.url, **{"model.lora.r": 4, "model.lora.alpha": 8})
    with torch.no_grad():  # a non-zero adapter, so merging changes the weights
        for name, p in t.policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    t.backend.sync_weights(t.policy)
    t.policy.merge_adapter()
    merged = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v.clone()
              for k, v in t.policy.state_dict().items() if "lora_" not in k}
    t.policy.unmerge_adapter()
    engine = server.llm.hf.state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(engine[k], v, rtol=0, atol=1e-6)
    assert t.step().metrics["rollout/logprob_mismatch_max"] < 1e-4


def test_a_server_started_wrong_is_a_clear_error(serve, llama, fake_vllm, monkeypatch):
    from tether.rollout.vllm import VLLMVersionError
    from tether.rollout.vllm_server import VLLMServerError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(VLLMServerError, match="no vLLM server answers at .*VLLM_SERVER_DEV_MODE=1 vllm serve"):
        trainer(llama, closed)
    with pytest.raises(VLLMServerError, match="has no /collective_rpc: .*start the server with VLLM_SERVER_DEV_MODE=1"):
        trainer(llama, serve(dev_mode=False).url)
    with pytest.raises(VLLMServerError, match="without tether's worker extension: start it with "
                                              "--worker-extension-cls tether.rollout.vllm_server.WeightReceiver"):
        trainer(llama, serve(worker_extension_cls="").url)
    with pytest.raises(VLLMServerError, match="records raw_logprobs log-probs: start it with --logprobs-mode "
                                              "processed_logprobs"):
        trainer(llama, serve(logprobs_mode="raw_logprobs").url)
    server = serve()
    monkeypatch.setattr(fake_vllm, "__version__", "0.9.2")  # the server's /version and the local package
    with pytest.raises(VLLMVersionError, match=r"vLLM 0.9.2 is installed; .* supports >= 0.10.2, < 0.12.0"):
        trainer(llama, server.url)


def test_config_refuses_sleep_mode_and_several_ranks_with_a_server():
    from tether.config import validate_for_world

    with pytest.raises(ConfigError, match="a vllm-server samples on GPUs of its own: drop rollout.vllm_sleep"):
        resolve_config({"rollout": {"backend": "vllm-server", "vllm_sleep": True}})
    cfg = resolve_config({"rollout": {"backend": "vllm-server", "prompts_per_step": 4}})
    with pytest.raises(ConfigError, match="vllm-server trains on one process for now"):
        validate_for_world(cfg, 2)


def test_truncated_sampling_is_exact_through_the_server_too(serve, llama):
    """top_k / top_p go to the server as its own fields; with processed log-probs the trainer's truncated
    log-probs are the server's."""
    server = serve()
    m = trainer(llama, server.url, **{"rollout.top_p": 0.9, "rollout.top_k": 20}).step().metrics
    body = [b for p, b in server.requests if p == "/v1/completions"][-1]
    assert (body["top_p"], body["top_k"]) == (0.9, 20)
    assert m["rollout/logprob_mismatch_max"] < 1e-4, m["rollout/logprob_mismatch_max"]


def test_async_rollouts_one_step_off_through_the_server(serve, llama):
    """rollout.max_staleness=1 with a server: batch n+1 is sampled while the trainer updates on batch n, each
    weight push lands between two batches (a batch is one version whole), the data order is the synchronous
    loop's, and the server ends holding the trainer's last weights."""
    sync = trainer(llama, serve().url)
    want = [prompts for _ in range(3) for prompts in [sync.step().rollout.prompts[::2]]]
    server = serve()
    t = trainer(llama, server.url, **{"rollout.max_staleness": 1, "algorithm.tis_cap": 2.0})
    try:
        results = [t.step() for _ in range(3)]
        assert t.async_generator.scores_in_worker
    finally:
        t.close()
    ms = [r.metrics for r in results]
    assert [m["rollout/staleness"] for m in ms] == [0.0, 1.0, 1.0]
    assert ms[0]["rollout/logprob_mismatch_max"] < 1e-4  # version 0 on both sides
    assert ms[1]["rollout/logprob_mismatch_mean"] > 1e-3  # sampled one update ago: the IS weights correct it
    assert [r.rollout.prompts[::2] for r in results] == want
    calls = ["gen" if p == "/v1/completions" else "push" for p, b in server.requests
             if p == "/v1/completions" or (p == "/collective_rpc" and b["method"] == "tether_receive_bucket")]
    # the first push before any batch; batches 1 and 2 asked for at step 1; then a push after every update
    assert calls == ["push", "gen", "gen", "push", "gen", "push", "gen", "push"], calls
    assert_server_holds(server, t.policy)
