"""What a user meets when something is wrong: resume and run directories that never lose or mix runs, damaged
checkpoints survived, and one clear line (exit 2) for each bad input, naming the problem and the path."""

import json
import logging
from pathlib import Path

import pytest

from tether.cli import main
from tether.tasks.tiny_model import build_tiny_model

REWARD = ("def exact(prompts, completions, answer, **_):\n"
          "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n"
          "def nothing(prompts, completions, **_):\n"
          "    return [None] * len(completions)\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    model = build_tiny_model(root / "model", hidden_size=32)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8)))
    (root / "r.py").write_text(REWARD)
    return {"model": model, "prompts": prompts, "reward": root / "r.py"}


def base(files, fn="exact", steps=3):
    return [f"model.path={files['model']}", f"data.source={files['prompts']}",
            f"reward.functions=[{files['reward']}:{fn}]", f"steps={steps}", "rollout.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=3", "logging.progress=false",
            "logging.tensorboard=false", "logging.report=false", "checkpoint.every=1", "checkpoint.keep_last=3"]


def steps_logged(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- resume and run directories ---------------------------------------------------------------------------


def test_resume_falls_back_past_a_damaged_newest_checkpoint(files, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    assert main(["train", *base(files), f"--run-dir={run}"]) == 0
    newest = run / "checkpoints" / "step-000003"
    weights = newest / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="tether"):
        # Overrides after --resume are overrides too.
        assert main(["train", *base(files, steps=4), "--resume", f"--run-dir={run}", "steps=4"]) == 0
    assert "skipped damaged checkpoint step-000003: policy/model.safetensors is 100 bytes" in caplog.text
    assert "falling back to" in caplog.text and "step-000002" in caplog.text
    assert steps_logged(run) == [1, 2, 3, 4]  # steps 3 and 4 run again from step 2: none lost or repeated

    for ck in (run / "checkpoints").glob("step-*"):
        (ck / "optimizers.pt").write_bytes(b"")
    capsys.readouterr()
    assert main(["train", *base(files, steps=5), "--resume", f"--run-dir={run}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "no checkpoint of" in line and "every one is damaged" in line and "optimizers.pt is 0 bytes" in line


def test_resume_with_nothing_to_resume_is_an_error(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ of this test alone
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *base(files), "--resume", f"--run-dir={empty}"]) == 2
    assert "has no checkpoint to continue from" in one_line(capsys.readouterr().err)
    assert main(["train", *base(files), "--resume"]) == 2
    assert "no run of this config with a checkpoint under runs/" in one_line(capsys.readouterr().err)
    assert not any(empty.iterdir()) and not (tmp_path / "runs").exists()  # nothing was written


def test_resume_without_a_run_dir_continues_the_newest_run_of_the_same_config(files, tmp_path, monkeypatch,
                                                                             caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *base(files, steps=2)]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert main(["train", *base(files, steps=2), "optim.lr=0.5"]) == 0  # another config: never resumed below
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert main(["train", *base(files, steps=3), "--resume"]) == 0
    assert f"resuming {Path('runs') / run.name}: the newest run of this config" in caplog.text
    assert steps_logged(run) == [1, 2, 3]


def test_a_run_directory_that_holds_a_run_is_refused_unless_overwritten(files, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *base(files), f"--run-dir={run}"]) == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["train", *base(files, steps=1), f"--run-dir={run}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{run} already holds a run (3 checkpoint(s), the newest step-000003)" in line and "--resume" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before and steps_logged(run) == [1, 2, 3]
    assert main(["train", *base(files, steps=1), f"--run-dir={run}", "--overwrite"]) == 0
    assert steps_logged(run) == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")) == ["step-000001"]


def test_resume_auto_on_an_empty_directory_starts_fresh_and_says_so(files, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert main(["train", *base(files, steps=1), f"--run-dir={tmp_path / 'run'}", "checkpoint.resume=auto"]) == 0
    assert "no checkpoint in" in caplog.text and "starting a new run" in caplog.text


def test_a_failed_checkpoint_write_stops_with_one_line(files, tmp_path, capsys, monkeypatch):
    from tether.train import checkpoint

    real_save = checkpoint.torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("optimizers.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint's write hits a full disk
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4736 vs 4624")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    run = tmp_path / "run"
    assert main(["train", *base(files), f"--run-dir={run}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("checkpoint error: could not write checkpoint") and "step-000002" in line
    assert "the disk is full" in line and "earlier checkpoints intact: step-000001" in line
    calls["n"] = 0
    assert main(["train", *base(files), f"--run-dir={tmp_path / 'run2'}", "checkpoint.on_write_error=continue"]) == 0
    assert steps_logged(tmp_path / "run2") == [1, 2, 3]


# --- rewards that score nothing -----------------------------------------------------------------------------


def test_a_step_where_every_reward_is_none_is_a_warning_with_no_reward_figures(files, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert main(["train", *base(files, fn="nothing", steps=2), f"--run-dir={run}"]) == 0
    assert "the reward scored none of the 4 samples" in caplog.text
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        assert "reward/mean" not in m and "reward/std" not in m and m["reward/valid_frac"] == 0.0
        assert m["update/unscored"] == 1.0 and m["update/optimizer_steps"] == 0
    capsys.readouterr()
    assert main(["train", *base(files, fn="nothing", steps=5), f"--run-dir={tmp_path / 'run2'}"]) == 1
    assert "the reward scored no sample in 3 consecutive steps" in one_line(capsys.readouterr().err)


# --- one line for each bad input ----------------------------------------------------------------------------


def test_model_loading_errors_name_the_path_and_the_remedy(files, tmp_path, capsys):
    def error(path, *extra):
        assert main(["train", *base(files), f"model.path={path}", f"--run-dir={tmp_path / 'r'}", *extra]) == 2
        return one_line(capsys.readouterr().err)

    missing = tmp_path / "no" / "such" / "model"
    assert f"model error: model.path: {missing} does not exist" in error(missing)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert f"{bare} has no config.json, so it is not a Hugging Face model directory" in error(bare)

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in Path(files["model"]).iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert f"{weights} is damaged or truncated" in error(damaged)

    remote = tmp_path / "remote"
    remote.mkdir()
    for f in Path(files["model"]).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (remote / f.name).write_bytes(f.read_bytes())
    (remote / "config.json").write_text(json.dumps({
        "model_type": "my_custom_lm", "architectures": ["MyLM"],
        "auto_map": {"AutoConfig": "modeling.MyConfig", "AutoModelForCausalLM": "modeling.MyLM"}}))
    line = error(remote)
    assert "needs code from its repository" in line and "model.trust_remote_code=true" in line

    assert main(["eval", str(tmp_path / "runs" / "x" / "checkpoints" / "step-000009")]) == 2
    assert "does not exist" in one_line(capsys.readouterr().err)
    ck_like = tmp_path / "ck"
    (ck_like / "policy").mkdir(parents=True)
    (ck_like / "policy" / "config.json").write_text("{}")
    assert main(["train", *base(files), f"model.path={ck_like}", f"--run-dir={tmp_path / 'r'}"]) == 2
    assert "the model of a checkpoint is its policy/ folder" in one_line(capsys.readouterr().err)


def test_data_and_reward_file_errors_name_the_file(files, tmp_path, capsys):
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("prompt,answer\ncaf\xe9 1+1=,2\n".encode("latin-1"))
    assert main(["train", *base(files), f"data.source={csv}", f"--run-dir={tmp_path / 'r'}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"data error: {csv}: not UTF-8 text (byte 0xe9") and "iconv" in line

    bad = tmp_path / "bad.py"
    bad.write_text("def exact(prompts, completions, **_)\n    return [0.0] * len(completions)\n")
    assert main(["train", *base(files), f"reward.functions=[{bad}:exact]", f"--run-dir={tmp_path / 'r'}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{bad}, line 1: syntax error" in line


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    assert main(["report", str(other)]) == 2
    assert "is not a run directory" in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in other.iterdir()) == ["cat.jpg"]  # nothing written into it
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in one_line(capsys.readouterr().err)


def test_max_prompt_tokens_with_a_data_file_skips_long_prompts(files, tmp_path, caplog):
    """rollout.max_prompt_tokens is checked on the sampler's tokens when the trainer is built (it used to need
    a tokenizer the data loader never had, and raised)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": "2"}) + "\n" for p in ["1+1=", "1+1=" * 20] * 2))
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert main(["train", *base(files, steps=1), f"data.source={prompts}", "rollout.max_prompt_tokens=10",
                     f"--run-dir={tmp_path / 'run'}"]) == 0
    assert "skipped 2 of 4 prompts" in caplog.text and "rollout.max_prompt_tokens=10" in caplog.text
