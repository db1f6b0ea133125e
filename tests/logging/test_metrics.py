import json
import math
import sys
import types

import pytest
import torch

from tether.logging.metrics import MetricsLogger, read_jsonl


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_writes_jsonl_lines_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"reward/mean": 0.5, "kl/beta": torch.tensor(0.1), "completion/length_max": 12})
        logger.log(2, {"reward/mean": 0.75})
        # Flushed as it goes: readable while the logger is still open.
        assert lines(tmp_path / "metrics.jsonl")[-1] == {"step": 2, "reward/mean": 0.75}
    records = lines(tmp_path / "metrics.jsonl")
    assert records[0]["step"] == 1 and records[0]["completion/length_max"] == 12
    assert records[0]["kl/beta"] == pytest.approx(0.1)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]


def test_non_finite_values_become_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss/total": float("nan"), "kl/ref_per_token": float("inf"), "reward/mean": 1.0})
        logger.log_samples(1, [{"prompt": "p", "completion": "c", "reward": float("-inf")}])
    raw = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    assert json.loads(raw) == {"step": 1, "loss/total": None, "kl/ref_per_token": None, "reward/mean": 1.0}
    assert read_jsonl(tmp_path / "samples.jsonl") == [{"step": 1, "prompt": "p", "completion": "c", "reward": None}]


def test_bad_metrics_are_rejected(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="metric 'note' must be a number"):
            logger.log(1, {"note": "hello"})
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(1, {"step": 3})


def test_log_samples(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log_samples(3, [{"prompt": "a", "completion": "b", "reward": 1.0}, {"prompt": "c", "completion": "d"}])
    assert read_jsonl(tmp_path / "samples.jsonl") == [
        {"step": 3, "prompt": "a", "completion": "b", "reward": 1.0},
        {"step": 3, "prompt": "c", "completion": "d"},
    ]


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, wandb=True, enabled=False)  # wandb=True must not even be looked at
    logger.log(1, {"reward/mean": 1.0})
    logger.log_samples(1, [{"prompt": "p"}])
    logger.truncate_after(0)
    logger.close()
    assert not run_dir.exists()


def test_truncate_after_resume_never_duplicates_or_skips_steps(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 8):
        logger.log(step, {"reward/mean": float(step)})
        logger.log_samples(step, [{"prompt": f"p{step}", "completion": "c"}])
    logger.close()
    # The run crashed after step 7 in the middle of writing a line; the last checkpoint is step 5.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "rew')

    resumed = MetricsLogger(tmp_path)
    resumed.truncate_after(5)
    for step in range(6, 10):
        resumed.log(step, {"reward/mean": float(step)})
        resumed.log_samples(step, [{"prompt": f"p{step}", "completion": "c"}])
    resumed.close()
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == list(range(1, 10))
    assert [r["step"] for r in lines(tmp_path / "samples.jsonl")] == list(range(1, 10))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    # TensorBoard hides the pre-crash events after the checkpoint step (purge_step), so each step shows once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == list(range(1, 10))


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 1.0}\n{"step": 2, "rew')
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, {"reward/mean": 2.0})
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records == [{"step": 1, "reward/mean": 1.0}, {"step": 2, "reward/mean": 2.0}]


def test_read_jsonl_of_missing_file_is_empty(tmp_path):
    assert read_jsonl(tmp_path / "nope.jsonl") == []


def test_wandb_missing_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(RuntimeError, match="wandb package is not installed"):
        MetricsLogger(tmp_path, wandb=True)


def test_wandb_logs_and_keeps_one_run_id_across_resumes(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):
        with MetricsLogger(tmp_path, tensorboard=False, wandb=True, wandb_project="proj", wandb_config={"lr": 1e-5}) as lg:
            lg.log(1, {"reward/mean": math.pi})
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["project"] == "proj" and inits[0]["config"] == {"lr": 1e-5} and inits[0]["resume"] == "allow"
    assert inits[0]["id"] == inits[1]["id"]
    assert ("log", 1, {"reward/mean": math.pi}) in calls and calls[-1] == ("finish",)
