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
    from tether.rewards.functions import RewardScorer
    from tether.tasks.tiny_model import build_tiny_model
    from tether.train.loop import Trainer

    path = str(build_tiny_model(tmp_path / "m", hidden_size=64, num_layers=2))
    cfg = resolve_config({"model": {"path": path}, "device": "cuda", "algorithm": {"name": "ppo"},
                          "rollout": {"backend": "vllm", "max_new_tokens": 8, "prompts_per_step": 4,
                                      "group_size": 2}})
    reward = RewardScorer([(lambda p, c, **_: [float(len(x)) for x in c], 1.0)])
    t = Trainer(cfg, rows=[{"prompt": "12+7="}] * 8, reward_fn=reward)
    m = t.step().metrics
    # vLLM samples in bf16: log-probs agree with the fp32 trainer only to bf16 tolerance.
    assert m["rollout/logprob_mismatch_mean"] < 0.05
    m2 = t.step().metrics  # after sync_weights the sampler is the updated policy
    assert m2["rollout/logprob_mismatch_mean"] < 0.05
