"""report.html: one self-contained page per run with the training curves and sample completions.

The plots are PNG files under ``run_dir/plots/`` referenced by relative links, so the run directory can be copied or
zipped and the page still works. Plots are drawn with matplotlib's object API (``Figure`` + Agg canvas) rather than
pyplot, so writing a report never changes the caller's matplotlib backend or global figure state.
"""

from __future__ import annotations

import html
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.logging.metrics import METRICS_FILE, SAMPLES_FILE, read_jsonl

SAMPLES_PER_STAGE = 4  # sample completions shown for each of the start, middle and end of the run
MAX_CONFIG_ROWS = 40
STAGE_KEYS = ("time/generate", "time/score", "time/logprobs", "time/update")


@dataclass
class PlotSpec:
    name: str  # file name stem under plots/
    title: str
    left: Sequence[str]  # metrics drawn on the left axis
    right: Sequence[str] = field(default_factory=tuple)  # metrics drawn on a second y axis (different scale)
    ylabel: str = ""
    right_ylabel: str = ""
    markers: bool = False  # for sparse metrics (eval) where single points must stay visible


# The reward and stage-timing plots are drawn by their own functions; everything else is one of these line plots.
LINE_PLOTS = [
    PlotSpec("kl", "KL to reference", ["kl/ref_per_token"], ["kl/beta"], "KL per token", "beta"),
    PlotSpec("entropy", "Policy entropy", ["policy/entropy"], ylabel="nats per token"),
    PlotSpec("clip_frac", "Clip fraction", ["policy/clip_frac_low", "policy/clip_frac_high"], ylabel="fraction"),
    PlotSpec("approx_kl", "Approx. KL, old to new policy", ["policy/approx_kl"]),
    PlotSpec("loss", "Losses", ["loss/policy", "loss/value", "loss/total"]),
    PlotSpec("explained_variance", "Value explained variance", ["value/explained_variance"]),
    PlotSpec(
        "lengths", "Completion length", ["completion/length_mean", "completion/length_max"],
        ["completion/truncated_frac"], "tokens", "truncated fraction",
    ),
    PlotSpec("logprob_mismatch", "Rollout vs. trainer logprob mismatch", ["rollout/logprob_mismatch"]),
    PlotSpec("throughput", "Throughput", ["throughput/tokens_per_s"], ylabel="tokens / s"),
    PlotSpec("eval_accuracy", "Eval accuracy", ["eval/accuracy"], ylabel="accuracy", markers=True),
]


# ------------------------------------------------------------------------------------------------------------- data


def _series(by_step: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) for one metric, skipping steps where it's absent or null (a non-finite value)."""
    steps, values = [], []
    for step in sorted(by_step):
        value = by_step[step].get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(step)
            values.append(float(value))
    return steps, values


def _metrics_by_step(records: list[dict]) -> dict[int, dict]:
    # Several lines may share a step (e.g. eval metrics logged separately); merge them, later lines winning.
    by_step: dict[int, dict] = {}
    for record in records:
        step = record.get("step")
        if isinstance(step, int):
            by_step.setdefault(step, {}).update(record)
    return by_step


# ------------------------------------------------------------------------------------------------------------ plots


def _new_figure():
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers; no "step 2.5" ticks
    return fig, ax


def _save(fig, plots_dir: Path, name: str) -> str:
    # Write then rename, so a browser refreshing the report never sees half a PNG.
    path = plots_dir / f"{name}.png"
    tmp = plots_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return f"plots/{name}.png"


def _plot_reward(by_step: dict[int, dict], plots_dir: Path) -> str | None:
    steps, mean = _series(by_step, "reward/mean")
    if not steps:
        return None
    fig, ax = _new_figure()
    band_lo, band_hi = _series(by_step, "reward/min"), _series(by_step, "reward/max")
    if band_lo[1] and band_hi[1] and band_lo[0] == band_hi[0]:
        ax.fill_between(band_lo[0], band_lo[1], band_hi[1], alpha=0.15, color="C0", label="min-max")
    std_steps, std = _series(by_step, "reward/std")
    if std_steps == steps:
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        alpha=0.25, color="C0", label="mean ± std")
    ax.plot(steps, mean, color="C0", label="mean")
    ax.set_title("Reward")
    ax.set_xlabel("step")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, plots_dir, "reward")


def _plot_lines(by_step: dict[int, dict], spec: PlotSpec, plots_dir: Path) -> str | None:
    left = [(k, *_series(by_step, k)) for k in spec.left]
    right = [(k, *_series(by_step, k)) for k in spec.right]
    left = [s for s in left if s[1]]
    right = [s for s in right if s[1]]
    if not left and not right:
        return None
    fig, ax = _new_figure()
    style = {"marker": "o", "markersize": 4} if spec.markers else {}
    color = 0
    lines = []
    for key, steps, values in left:
        lines += ax.plot(steps, values, color=f"C{color}", label=key, **style)
        color += 1
    if right:
        ax2 = ax.twinx() if left else ax
        for key, steps, values in right:
            lines += ax2.plot(steps, values, color=f"C{color}", label=key, linestyle="--", **style)
            color += 1
        if left:
            ax2.set_ylabel(spec.right_ylabel)
    ax.set_title(spec.title)
    ax.set_xlabel("step")
    ax.set_ylabel(spec.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize="small")
    return _save(fig, plots_dir, spec.name)


def _plot_timings(by_step: dict[int, dict], plots_dir: Path) -> str | None:
    present = [k for k in STAGE_KEYS if _series(by_step, k)[0]]
    if not present:
        return None
    steps = sorted(s for s, m in by_step.items() if any(k in m for k in present))
    # A stage missing at some step took no time there (e.g. no critic update); stacking needs a value everywhere.
    stacks = [[_num(by_step[s].get(k)) for s in steps] for k in present]
    fig, ax = _new_figure()
    ax.stackplot(steps, stacks, labels=[k.removeprefix("time/") for k in present], alpha=0.8)
    total_steps, total = _series(by_step, "time/step")
    if total_steps:
        ax.plot(total_steps, total, color="black", linestyle="--", linewidth=1, label="step total")
    ax.set_title("Time per step, by stage")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, plots_dir, "timings")


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def make_plots(run_dir: str | Path) -> list[tuple[str, str]]:
    """Draw every plot the logged metrics allow; returns (title, relative PNG path) pairs in page order."""
    run_dir = Path(run_dir)
    by_step = _metrics_by_step(read_jsonl(run_dir / METRICS_FILE))
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    made = []
    reward = _plot_reward(by_step, plots_dir)
    if reward:
        made.append(("Reward", reward))
    for spec in LINE_PLOTS:
        if spec.name == "throughput":  # timings belong next to throughput
            timings = _plot_timings(by_step, plots_dir)
            if timings:
                made.append(("Time per step, by stage", timings))
        path = _plot_lines(by_step, spec, plots_dir)
        if path:
            made.append((spec.title, path))
    # A plot from an earlier report whose metric is gone now (e.g. a truncated resume) would be misleading.
    ours = {"reward", "timings"} | {s.name for s in LINE_PLOTS}
    made_names = {Path(p).stem for _, p in made}
    for stale in ours - made_names:
        (plots_dir / f"{stale}.png").unlink(missing_ok=True)
    return made


# ------------------------------------------------------------------------------------------------------------- page

CSS = """
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1f2328;
       background: #f6f8fa; }
main { max-width: 1200px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 32px 0 12px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.path { font-family: ui-monospace, Menlo, monospace; color: #57606a; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: white; border: 1px solid #d0d7de; border-radius: 6px; padding: 10px 14px; min-width: 120px; }
.card .label { color: #57606a; font-size: 0.85em; }
.card .value { font-size: 1.3em; font-weight: 600; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
figure { background: white; border: 1px solid #d0d7de; border-radius: 6px; margin: 0; padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
table { border-collapse: collapse; width: 100%; background: white; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f4; }
td.text { white-space: pre-wrap; font-family: ui-monospace, Menlo, monospace; font-size: 0.85em; }
td.text div { max-height: 240px; overflow: auto; }
td.text .role { font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.stage td { background: #eef1f4; font-weight: 600; }
details pre { background: white; border: 1px solid #d0d7de; padding: 8px; overflow: auto; }
.empty { color: #57606a; font-style: italic; }
"""

# Lets a headless browser check (chromium --dump-dom) confirm every plot actually loaded and decoded.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(function (img) {
    return img.complete && img.naturalWidth > 0;
  }).length;
});
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "n/a"
    return str(value)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _load_config(run_dir: Path) -> tuple[dict, str]:
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}, ""
    text = path.read_text(encoding="utf-8")
    try:
        import yaml

        config = yaml.safe_load(text)
    except Exception:  # a broken config must not stop the report; the raw text is still shown
        config = None
    return (config if isinstance(config, dict) else {}), text


def _load_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {"summary.json": "unreadable"}
    return _flatten(summary) if isinstance(summary, dict) else {}


def _header(run_dir: Path, by_step: dict[int, dict], summary: dict) -> str:
    cards = []
    if by_step:
        steps = sorted(by_step)
        cards.append(("steps logged", f"{len(steps)} (last {steps[-1]})"))
        _, reward = _series(by_step, "reward/mean")
        if reward:
            cards.append(("reward/mean first → last", f"{reward[0]:.4g} → {reward[-1]:.4g}"))
    cards += [(k, _format_value(v)) for k, v in summary.items()]
    card_html = "".join(
        f'<div class="card"><div class="label">{_esc(label)}</div><div class="value">{_esc(value)}</div></div>'
        for label, value in cards
    )
    return (
        f"<h1>tether run report</h1>\n<div class=\"path\">{_esc(run_dir.resolve())}</div>\n"
        f'<h2>Summary</h2>\n<div class="cards">{card_html or "<span class=empty>nothing logged yet</span>"}</div>\n'
    )


def _config_section(config: dict, raw: str) -> str:
    if not raw:
        return ""
    flat = list(_flatten(config).items())
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_format_value(v))}</td></tr>" for k, v in flat[:MAX_CONFIG_ROWS])
    more = ""
    if len(flat) > MAX_CONFIG_ROWS:
        more = f"<p class=empty>{len(flat) - MAX_CONFIG_ROWS} more settings in the full config below.</p>"
    table = f'<table class="config">{rows}</table>{more}' if rows else ""
    return (
        f"<h2>Config</h2>\n{table}\n"
        f"<details><summary>config.yaml</summary><pre>{_esc(raw)}</pre></details>\n"
    )


def _pick_sample_steps(steps: list[int]) -> list[tuple[str, int]]:
    if not steps:
        return []
    picks = [("start", steps[0]), ("middle", steps[len(steps) // 2]), ("end", steps[-1])]
    seen, unique = set(), []
    for label, step in picks:
        if step not in seen:
            seen.add(step)
            unique.append((label, step))
    return unique


def _completion_html(row: dict) -> str:
    """The completion; for an episode, every turn of its conversation with the role that wrote it."""
    conversation = row.get("conversation")
    if not isinstance(conversation, list):
        return _esc(row.get("completion", ""))
    turns = [f'<span class="role">{_esc(m.get("role", "?"))}:</span> {_esc(m.get("content", ""))}'
             for m in conversation if isinstance(m, dict)]
    return "\n".join(turns)  # td.text keeps newlines (pre-wrap)


def _samples_section(samples: list[dict]) -> str:
    by_step: dict[int, list[dict]] = {}
    for row in samples:
        if isinstance(row.get("step"), int):
            by_step.setdefault(row["step"], []).append(row)
    picks = _pick_sample_steps(sorted(by_step))
    if not picks:
        return '<h2>Sample completions</h2>\n<p class="empty">No samples logged.</p>\n'
    body = []
    for label, step in picks:
        body.append(f'<tr class="stage"><td colspan="4">{_esc(label)} of run: step {step}</td></tr>')
        for row in by_step[step][:SAMPLES_PER_STAGE]:
            body.append(
                "<tr>"
                f'<td class="num">{step}</td>'
                f'<td class="text"><div>{_esc(row.get("prompt", ""))}</div></td>'
                f'<td class="text"><div>{_completion_html(row)}</div></td>'
                f'<td class="num">{_esc(_format_value(row.get("reward")))}</td>'
                "</tr>"
            )
    return (
        '<h2>Sample completions</h2>\n<table id="samples">\n'
        "<thead><tr><th>step</th><th>prompt</th><th>completion</th><th>reward</th></tr></thead>\n"
        f"<tbody>{''.join(body)}</tbody>\n</table>\n"
    )


class NotARunError(ValueError):
    """`tether report` was pointed at a directory that no training run wrote."""


def write_report(run_dir: str | Path, *, must_be_run: bool = False) -> Path:
    """Write ``run_dir/report.html`` (and its plots under ``run_dir/plots/``) from the run's logs; returns its path.

    ``must_be_run``: refuse, writing nothing, a directory without the logs of a run (metrics.jsonl or
    config.yaml), where a report would only litter someone else's folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if must_be_run:
            raise NotARunError(f"{run_dir}: no such run directory")
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    if must_be_run and not ((run_dir / METRICS_FILE).is_file() or (run_dir / "config.yaml").is_file()):
        raise NotARunError(f"{run_dir} is not a run directory (no {METRICS_FILE} or config.yaml): give the "
                           "directory a training run wrote, e.g. runs/<time>-<algorithm>")
    by_step = _metrics_by_step(read_jsonl(run_dir / METRICS_FILE))
    samples = read_jsonl(run_dir / SAMPLES_FILE)
    config, raw_config = _load_config(run_dir)
    summary = _load_summary(run_dir)
    plots = make_plots(run_dir)

    if plots:
        figures = "".join(
            f'<figure><img src="{_esc(src)}" alt="{_esc(title)}"></figure>\n' for title, src in plots
        )
        plots_html = f'<h2>Training curves</h2>\n<div class="plots">\n{figures}</div>\n'
    else:
        plots_html = '<h2>Training curves</h2>\n<p class="empty">No metrics logged.</p>\n'

    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>tether report: {_esc(run_dir.resolve().name)}</title>\n"
        f"<style>{CSS}</style>\n<script>{SCRIPT}</script>\n</head>\n<body>\n<main>\n"
        + _header(run_dir, by_step, summary)
        + _config_section(config, raw_config)
        + plots_html
        + _samples_section(samples)
        + "</main>\n</body>\n</html>\n"
    )
    out = run_dir / "report.html"
    tmp = run_dir / f".report.html.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
