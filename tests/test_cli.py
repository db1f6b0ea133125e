"""The `tether` command: help, config listing, eval and report on a run, and clear config errors."""

import json

import pytest

from tether.cli import main
from tether.tasks.tiny_model import build_tiny_model


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sft", "reward-model", "eval", "report", "config", "merge-lora"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "key=value" in capsys.readouterr().out


def test_config_lists_every_key(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "algorithm.kl_target = null" in out and "Target KL per token" in out


def test_config_error_exit_code_and_message(capsys):
    assert main(["train", "model.path=x", "algorithm.bet=0.1"]) == 2
    assert "Did you mean 'algorithm.beta'" in capsys.readouterr().err


def test_train_eval_report_on_a_tiny_run(tmp_path, capsys):
    model = build_tiny_model(tmp_path / "m", hidden_size=32)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    assert main(["train", f"model.path={model}", f"data.source={prompts}", "reward.functions=[builtin:length_penalty]",
                 "steps=2", "rollout.prompts_per_step=2", "rollout.max_new_tokens=3", f"logging.run_dir={run}",
                 "logging.progress=false"]) == 2  # a factory needs its kwargs: a clear error, not a crash
    assert "length_penalty" in capsys.readouterr().err
    reward = tmp_path / "r.py"
    reward.write_text("def exact(prompts, completions, answer, **_):\n"
                      "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n")
    assert main(["train", f"model.path={model}", f"data.source={prompts}", f"reward.functions=[{reward}:exact]",
                 "steps=2", "rollout.prompts_per_step=2", "rollout.max_new_tokens=3", f"logging.run_dir={run}",
                 "logging.progress=false"]) == 0
    assert (run / "report.html").exists() and (run / "config.yaml").exists()
    ck = run / "checkpoints" / "step-000002"
    assert main(["eval", str(ck), "--task", "arithmetic", "--n", "5", "--max-new-tokens", "3"]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists()
