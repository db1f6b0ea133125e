"""The full RLHF pipeline through the CLI on the tiny model: SFT -> reward model -> PPO against it with KL."""

import json

import pytest

from tether.cli import main
from tether.tasks.tiny_model import build_tiny_model


@pytest.mark.slow
def test_sft_reward_model_ppo_from_the_cli(tmp_path, capsys):
    base = build_tiny_model(tmp_path / "base", hidden_size=64, num_layers=2)
    sft, rm, run = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    assert main(["sft", "--model", str(base), "--data", "task:arithmetic", "--out", str(sft), "--steps", "60",
                 "--lr", "3e-3", "--batch-size", "64", "--n", "5000"]) == 0
    assert main(["reward-model", "--model", str(sft), "--data", "builtin:preference", "--out", str(rm),
                 "--n", "1000", "--epochs", "2", "--lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("preference accuracy")[1].split("->")[1].split("%")[0]) / 100
    assert accuracy >= 0.9, out
    target = 0.05
    assert main(["train", f"model.path={sft}", "data.source=task:arithmetic", "reward.task_reward=false",
                 f"reward.reward_model={rm}", "algorithm.name=ppo", "algorithm.beta=0.1",
                 f"algorithm.kl_target={target}", "algorithm.kl_horizon=50", "rollout.max_new_tokens=6",
                 "rollout.prompts_per_step=16", "rollout.group_size=2", "optim.lr=1.5e-4", "optim.critic_lr=1e-3",
                 "steps=40", f"logging.run_dir={run}", "logging.progress=false", "logging.report=false"]) == 0
    ms = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = sum(m["reward/reward_model/mean"] for m in ms[:5]) / 5
    last = sum(m["reward/reward_model/mean"] for m in ms[-10:]) / 10
    # The controller's horizon (50) is short enough to pull the KL back within 40 steps. With horizon 200 the
    # run depended on the CPU: KL per token over the last 20 steps 0.09-0.13 on one machine, 0.45 on another
    # (where the reward model's score rose 1.59 -> 2.28). With 50 on the latter: score 1.59 -> 2.03, KL 0.076
    # (0.059 at horizon 25).
    assert last > first + 0.15, (first, last)
    kl = sum(m["kl/ref_per_token"] for m in ms[-20:]) / 20
    assert kl < 3 * target, kl
    assert ms[-1]["kl/beta"] > ms[0]["kl/beta"]  # KL above target: the controller tightened the tether
