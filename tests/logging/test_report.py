import json
import math
import re
import shutil
import subprocess

import pytest

from tether.logging.metrics import MetricsLogger
from tether.logging.report import write_report


def fake_run(run_dir, steps=20, samples=True):
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for step in range(1, steps + 1):
            t = step / steps
            logger.log(step, {
                "reward/mean": t, "reward/std": 0.1, "reward/min": t - 0.3, "reward/max": t + 0.3,
                "kl/ref_per_token": 0.01 * t, "kl/beta": 0.05, "policy/approx_kl": 0.001,
                "policy/clip_frac_low": 0.02, "policy/clip_frac_high": 0.03, "policy/entropy": 1.0 - 0.5 * t,
                "loss/policy": -0.1, "loss/total": float("nan") if step == 7 else -0.1,
                "completion/length_mean": 50 + step, "completion/length_max": 80, "completion/truncated_frac": 0.1,
                "time/generate": 1.0, "time/score": 0.1, "time/logprobs": 0.3, "time/update": 0.6, "time/step": 2.0,
                "throughput/tokens_per_s": 900.0 + math.sin(step),
            })
            if step % 10 == 0:
                logger.log(step, {"eval/accuracy": 0.3 + t / 2})
            if samples:
                logger.log_samples(step, [
                    {"prompt": f"Question {step}.{i}", "completion": f"Answer {step}.{i}", "reward": t} for i in range(6)
                ])
    (run_dir / "config.yaml").write_text("algo: grpo\nmodel:\n  name: tiny-llama\n  lr: 1.0e-06\n")
    (run_dir / "summary.json").write_text(json.dumps({"accuracy_before": 0.25, "accuracy_after": 0.6}))


def test_report_contents(tmp_path):
    fake_run(tmp_path)
    page = write_report(tmp_path).read_text()
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == sorted([
        "reward.png", "kl.png", "entropy.png", "clip_frac.png", "approx_kl.png", "loss.png", "lengths.png",
        "timings.png", "throughput.png", "eval_accuracy.png",
    ])  # no value / logprob-mismatch metrics were logged, so no such plots
    for name in plots:
        assert f'<img src="plots/{name}"' in page
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG")
    assert "accuracy_after" in page and "0.6" in page
    assert "model.name" in page and "tiny-llama" in page
    # Samples from the start, middle and end of the run, at most 4 per stage.
    assert "start of run: step 1" in page and "middle of run: step 11" in page and "end of run: step 20" in page
    assert page.count("Question 20.") == 4


def test_completions_are_html_escaped(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log_samples(1, [{"prompt": "<b>bold</b> & co", "completion": "<script>alert('x')</script>", "reward": 1}])
    page = write_report(tmp_path).read_text()
    assert "<script>alert" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page


def test_empty_run_dir_still_makes_a_page(tmp_path):
    page = write_report(tmp_path).read_text()
    assert "No metrics logged" in page and "No samples logged" in page


def test_stale_plots_are_removed(tmp_path):
    fake_run(tmp_path, steps=3, samples=False)
    write_report(tmp_path)
    assert (tmp_path / "plots" / "kl.png").exists()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    write_report(tmp_path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["reward.png"]


def find_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not find_chromium(), reason="needs Debian's chromium for a headless browser check (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fake_run(run_dir)
    report = write_report(run_dir)
    base = [
        find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--virtual-time-budget=5000",
    ]

    def chromium(*args, profile):
        # A fresh profile per launch: two chromiums can't share one, and an old one could hold cached state.
        cmd = base + [f"--user-data-dir={tmp_path / profile}", *args, report.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=90)

    result = chromium("--dump-dom", profile="profile-dom")
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, f"the load script did not run; stderr: {result.stderr[-2000:]}"
    assert int(total.group(1)) == 10
    assert loaded.group(1) == total.group(1), "some plots failed to load in the browser"
    assert 'id="samples"' in dom and "Answer 20.0" in dom

    shot = tmp_path / "report.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1280,2000", profile="profile-shot")
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 2000)
    assert len(data) > 50_000  # a blank page compresses to a few KB; plots and text make it far larger


def test_episode_samples_show_the_whole_conversation_with_roles(tmp_path):
    conversation = [{"role": "user", "content": "482*37="},
                    {"role": "assistant", "content": '<tool_call>calc("482*37")</tool_call>'},
                    {"role": "tool", "content": "17834"}, {"role": "assistant", "content": "17834 <x>"}]
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log_samples(1, [{"prompt": "482*37=", "completion": "17834", "reward": 1.0,
                                "conversation": conversation}])
    page = write_report(tmp_path).read_text()
    cell = page[page.index('<table id="samples">'):]
    for role in ("user:", "assistant:", "tool:"):
        assert f'<span class="role">{role}</span>' in cell
    assert "&lt;tool_call&gt;calc(&quot;482*37&quot;)&lt;/tool_call&gt;" in cell and "17834 &lt;x&gt;" in cell
    assert cell.index("tool:") < cell.index("17834 &lt;x&gt;")  # turns in order
