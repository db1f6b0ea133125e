"""threads=auto: as many torch threads as the cores other processes leave idle, re-measured between steps."""

import pytest
import torch

from tether.config import ConfigError, resolve_config
from tether.train import threads
from tether.train.threads import AutoThreads, apply_threads, parse_threads


@pytest.fixture(autouse=True)
def keep_thread_count():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    threads._active = None


def scripted(policy: AutoThreads, samples: list[tuple[float, float, float]]) -> None:
    """Feed (wall s, all processes' busy CPU s, this process's CPU s) samples instead of the system's."""
    it = iter(samples)
    policy._sample = lambda: next(it)
    policy._last = next(it)


def test_auto_uses_the_cores_other_processes_leave_idle():
    policy = AutoThreads()
    policy.cores = [0, 1]
    # 1 s windows: others use 1.0 core (busy 1.9, ours 0.9) -> 1 thread; then 0.05 -> 2; too short a window
    # (0.1 s) keeps the count; others use both cores -> still at least one thread.
    scripted(policy, [(0.0, 0.0, 0.0), (1.0, 1.9, 0.9), (2.0, 3.85, 2.8), (2.1, 3.9, 2.9), (3.1, 5.9, 2.9)])
    assert policy.adjust() == 1
    assert policy.adjust() == 2
    assert policy.adjust() == 2
    assert policy.adjust() == 1


def test_threads_values(monkeypatch):
    assert parse_threads("auto") is None and parse_threads(None) is None and parse_threads("3") == 3
    assert resolve_config({}).threads == "auto"  # the default, from benchmarks/threads.py's table
    assert resolve_config({"threads": 1}).threads == "1"
    with pytest.raises(ConfigError, match="threads: 'many' is not allowed"):
        resolve_config({"threads": "many"})
    with pytest.raises(ConfigError, match="threads: '0' is not allowed"):
        resolve_config({"threads": 0})
    assert apply_threads("1") is None and torch.get_num_threads() == 1 and threads._active is None
    assert isinstance(apply_threads("auto"), AutoThreads) and threads._active is not None


def test_constructing_a_trainer_leaves_the_process_settings_alone(tmp_path, monkeypatch):
    """Threads and malloc policy are the command's (or fit(configure_process=True)'s), not the Trainer's."""
    from tether.rewards.functions import RewardScorer
    from tether.tasks.tiny_model import build_tiny_model
    from tether.train import loop
    from tether.train.loop import Trainer

    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append("malloc"))
    torch.set_num_threads(1)
    model = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1)
    cfg = resolve_config({"model": {"path": str(model)}, "threads": 2, "steps": 1,
                          "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 2}})
    Trainer(cfg, rows=[{"prompt": "a"}, {"prompt": "b"}], reward_fn=RewardScorer([lambda p, c, **_: [0.0] * len(c)]))
    assert torch.get_num_threads() == 1 and calls == []
