"""vLLM backend: runs only where CUDA and vLLM are present."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="the vLLM backend needs a CUDA GPU and the vllm package (pip install 'tether[vllm]')",
)


def test_vllm_rollout_logprobs_match_trainer(tmp_path):
    from tether.config import resolve_config
    from tether.tasks.tiny_model import build_tiny_model

    path = str(build_tiny_model(tmp_path / "m", hidden_size=64, num_layers=2))
    cfg = resolve_config({"model": {"path": path}, "device": "cuda", "algorithm": {"name": "grpo"},
                          "rollout": {"backend": "vllm", "max_new_tokens": 8, "prompts_per_step": 4,
                                      "group_size": 2}})
    steps_then_sync_check(cfg)


def steps_then_sync_check(cfg) -> None:
    """Three GRPO steps, each batch from the weights synced after the update before, with the bf16 sampler's
    log-probs within bf16 tolerance of the fp32 trainer's; then weights scaled by 1.1 (squares x 1.21), a change
    only a sync can bring, must reach every vLLM worker."""
    from tether.rewards.functions import RewardScorer
    from tether.rollout.vllm import hf_weight_names
    from tether.train.loop import Trainer

    reward = RewardScorer([(lambda p, c, **_: [float(len(x)) for x in c], 1.0)])
    t = Trainer(cfg, rows=[{"prompt": "12+7="}] * 8, reward_fn=reward)
    for _ in range(3):
        assert t.step().metrics["rollout/logprob_mismatch_mean"] < 0.05
    with torch.no_grad():
        for p in t.policy.parameters():
            p.mul_(1.1)
    t.backend.sync_weights(t.policy)
    expected = sum(w.double().pow(2).sum().item() for _, w in hf_weight_names(t.policy))
    for served in t.backend.sum_of_squares():
        assert served == pytest.approx(expected, rel=1e-3)  # bf16 rounding of each weight


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="vllm-server needs a GPU for `vllm serve` and one for the "
                                                          "trainer (NCCL refuses two ranks on one GPU)")
def test_vllm_server_rollouts_and_weight_push(tmp_path):
    """`vllm serve` on the second GPU, started as rollout/vllm_server.py says; the trainer on the first."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from tether.config import resolve_config
    from tether.rollout.vllm_server import WORKER_EXTENSION
    from tether.tasks.tiny_model import build_tiny_model

    path = str(build_tiny_model(tmp_path / "m", hidden_size=64, num_layers=2))
    port = 18000 + os.getpid() % 1000
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", CUDA_VISIBLE_DEVICES="1")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
                               "--port", str(port), "--logprobs-mode", "processed_logprobs", "--dtype", "bfloat16",
                               "--gpu-memory-utilization", "0.3", "--worker-extension-cls", WORKER_EXTENSION],
                              env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)
        cfg = resolve_config({"model": {"path": path}, "device": "cuda:0", "algorithm": {"name": "grpo"},
                              "rollout": {"backend": "vllm-server", "vllm_server_url": url, "max_new_tokens": 8,
                                          "prompts_per_step": 4, "group_size": 2}})
        steps_then_sync_check(cfg)
    finally:
        server.terminate()
        server.wait(timeout=60)
