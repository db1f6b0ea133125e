"""The default job end to end at a reduced size: tiny model -> SFT -> eval -> PPO -> eval -> report."""

import json

import pytest

from tether.cli import main


@pytest.mark.slow
def test_default_pipeline_raises_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    # Reduced: a shorter SFT (it still plateaus on the carry problems) and 20 PPO steps.
    assert main(["train", "task.sft_steps=700", "steps=20", "task.eval_size=100", "logging.eval_every=null",
                 f"logging.run_dir={run}", "logging.progress=false"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"] + 0.1, summary
    assert "Held-out greedy accuracy" in out and str(run) in out
    assert (run / "report.html").exists() and (run / "metrics.jsonl").exists()
    assert any((run / "checkpoints").glob("step-000020/COMPLETE"))

    # A second run reuses the cached tiny model and SFT checkpoint.
    assert main(["train", "task.sft_steps=700", "steps=1", "task.eval_size=20", "logging.eval_every=null",
                 f"logging.run_dir={tmp_path / 'run2'}", "logging.progress=false", "logging.report=false"]) == 0
    assert "Using cached model" in capsys.readouterr().out
