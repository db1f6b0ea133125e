"""Helpers shared by the training tests (importable as `helpers`: tests/conftest.py puts this folder on the path)."""

PROMPTS = [{"prompt": c} for c in "abcdefghijklmnop"]


def digit_fraction(prompts, completions, **_):
    """A dense reward a random tiny model can climb: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def episode_learning_run(tmp_path, monkeypatch, task: str, *overrides: str) -> tuple[dict, list[dict]]:
    """The built-in job on an episodic task at a reduced size (SFT on the task's imperfect demonstrations,
    then GRPO on 8 rows x 8 episodes a step): its summary and per-step metrics."""
    import json

    from tether.cli import main

    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", f"task.name={task}", "algorithm.name=grpo", "optim.lr=3e-4", "rollout.prompts_per_step=8",
                 "rollout.group_size=8", *overrides, "logging.eval_every=null", f"logging.run_dir={run}",
                 "logging.progress=false", "logging.report=false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["episode/turns_mean"] >= 1 for m in metrics)
    return summary, metrics
