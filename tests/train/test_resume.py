"""Runs survive being killed: SIGKILL mid-run (also inside a checkpoint write), resume, identical metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tether.tasks.tiny_model import build_tiny_model
from tether.train.checkpoint import complete_checkpoints, latest_checkpoint

STEPS = 6
REWARD = '''
def digits(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # Big enough that a checkpoint write takes a while (so the test can kill inside one), small enough to be quick.
    model = build_tiny_model(root / "model", hidden_size=192, num_layers=4, seed=0)
    (root / "reward.py").write_text(REWARD)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": c}) + "\n" for c in "abcdefgh"))
    cfg = {
        "seed": 0, "steps": STEPS, "threads": 1,
        "model": {"path": str(model)},
        "algorithm": {"name": "ppo", "kl_target": 0.05},
        "rollout": {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 4},
        "optim": {"lr": 1e-3, "critic_lr": 1e-3},
        "reward": {"functions": [f"{root / 'reward.py'}:digits"]},
        "data": {"source": str(root / "prompts.jsonl")},
        "logging": {"tensorboard": False, "report": False, "progress": False, "samples_every": 1},
        "checkpoint": {"every": 1, "keep_last": 2, "resume": "auto"},
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


def tether_train(config: Path, run_dir: Path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tether", "train", str(config), f"logging.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def comparable(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))} for m in lines]


def finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    return out


@pytest.mark.slow
def test_kill_and_resume_matches_straight_run(job):
    root, config = job
    straight = root / "straight"
    finish(tether_train(config, straight))
    expected = comparable(straight)
    assert [m["step"] for m in expected] == list(range(1, STEPS + 1))

    # Kill 1: SIGKILL while a checkpoint is being written (a .tmp- directory exists), after step >= 2.
    killed = root / "killed"
    p = tether_train(config, killed)
    ck_root = killed / "checkpoints"
    caught_mid_write = False
    deadline = time.time() + 240
    while p.poll() is None and time.time() < deadline:
        tmp = list(ck_root.glob(".tmp-step-*")) if ck_root.exists() else []
        if tmp and int(tmp[0].name.split("-")[2]) >= 2:
            p.send_signal(signal.SIGKILL)
            caught_mid_write = True
            break
        time.sleep(0.001)
    p.wait()
    assert caught_mid_write, "the run finished before a checkpoint write could be interrupted"
    # The half-written checkpoint never counts: the newest complete one loads.
    latest = latest_checkpoint(killed, clean=False)
    assert latest is not None and (latest / "COMPLETE").exists()
    assert all((c / "COMPLETE").exists() for c in complete_checkpoints(killed))

    # Kill 2: resume, then SIGKILL again in the middle of a step (between checkpoint writes).
    p = tether_train(config, killed)
    start = time.time()
    while p.poll() is None and time.time() - start < 240:
        lines = (killed / "metrics.jsonl").read_text().splitlines() if (killed / "metrics.jsonl").exists() else []
        if len(lines) >= 4:
            time.sleep(0.05)
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    p.wait()

    # Resume to the end: the metrics equal the straight run's exactly, no step lost or repeated.
    out = finish(tether_train(config, killed))
    assert "Trained to step 6" in out
    assert comparable(killed) == expected
    samples = [json.loads(x)["step"] for x in (killed / "samples.jsonl").read_text().splitlines()]
    assert Counter(samples) == {s: 4 for s in range(1, STEPS + 1)}  # logging.samples_per_step rows each


def test_sigterm_saves_and_exits_cleanly(job):
    root, config = job
    run_dir = root / "sigterm"
    p = tether_train(config, run_dir)
    start = time.time()
    while time.time() - start < 240:
        m = run_dir / "metrics.jsonl"
        if m.exists() and m.read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    last = latest_checkpoint(run_dir)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert last is not None and last.name == f"step-{steps[-1]:06d}"
    assert steps[-1] < STEPS
