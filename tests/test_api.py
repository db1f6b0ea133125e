"""`tether.fit`, the README's Python entry point."""

import json

import pytest
import torch

import tether
from tether.config import ConfigError
from tether.tasks.tiny_model import build_tiny_model


def exact(prompts, completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def test_fit_trains_logs_and_checkpoints_and_leaves_the_process_alone(tmp_path):
    model = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1)
    threads = torch.get_num_threads()
    result = tether.fit(
        model=str(model), prompts=[{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)], reward=exact,
        algorithm="grpo", steps=2, run_dir=tmp_path / "run",
        overrides={"rollout.group_size": 2, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 3,
                   "optim.lr": 1e-3, "logging.progress": False, "logging.tensorboard": False, "threads": 2})
    assert result.steps == 2 and [m["reward/valid_frac"] for m in result.metrics] == [1.0, 1.0]
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step-000002"
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert result.trainer.cfg.rollout.group_size == 2 and result.trainer.cfg.optim.lr == 1e-3
    assert torch.get_num_threads() == threads  # threads=2 applies only with configure_process=True


def test_fit_overrides_are_validated_like_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'optim.lr'"):
        tether.fit(model="unused", prompts=[{"prompt": "a"}], reward=exact, overrides={"optim.lrr": 1e-3})
    with pytest.raises(ConfigError, match="conflicts"):
        tether.fit(model="unused", prompts=[{"prompt": "a"}], reward=exact,
                   overrides={"optim": 1, "optim.lr": 1e-3})
