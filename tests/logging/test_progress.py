import io

from tether.logging.progress import Progress, format_stats


def test_format_stats_picks_and_orders_keys():
    stats = {"kl": 0.0012345, "reward": 0.51234, "beta": 0.05, "ignored": 1.0}
    assert format_stats(stats, keys=["reward", "kl", "beta", "missing"]) == "reward 0.5123  kl 0.001234  beta 0.05"
    assert format_stats({"n": 3}) == "n 3"


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with Progress(25, print_every=10, file=out, description="grpo") as progress:
        assert not progress.interactive
        for step in range(1, 26):
            progress.update(step, {"reward": step / 10, "kl": 0.01})
    lines = out.getvalue().splitlines()
    # First step, every 10th, and the last one: readable in a CI log.
    assert [line.split()[2] for line in lines] == ["1/25", "10/25", "20/25", "25/25"]
    assert lines[1].startswith("grpo step 10/25 [") and "left]" in lines[1]
    assert lines[1].endswith("| reward 1  kl 0.01")
    assert "\x1b" not in out.getvalue()


def test_resumed_run_counts_from_initial_step():
    out = io.StringIO()
    with Progress(100, initial_step=40, print_every=50, file=out) as progress:
        for step in range(41, 101):
            progress.update(step, {})
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["41/100", "50/100", "100/100"]


def test_rich_bar_in_a_terminal():
    out = io.StringIO()
    with Progress(5, file=out, force_terminal=True, keys=["reward"]) as progress:
        assert progress.interactive
        for step in range(1, 6):
            progress.update(step, {"reward": 0.25, "other": 1.0})
    text = out.getvalue()
    assert "5/5" in text and "reward 0.25" in text and "other" not in text


def test_disabled_prints_nothing():
    out = io.StringIO()
    with Progress(5, enabled=False, file=out, force_terminal=True) as progress:
        for step in range(1, 6):
            progress.update(step, {"reward": 1.0})
    assert out.getvalue() == ""
