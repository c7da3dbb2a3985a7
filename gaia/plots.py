"""Figures from results files only, one kind per experiment (its `figure`):

- latency-vs-replicas: latency vs replica count, one panel per client mode. Each curve is one
  SystemSpec (system + durability, the label says both); a curve measured at a single replica
  count (the local-fsync floor) is a horizontal reference line. The paper's values are dashed,
  hollow markers, in the colour of the curve they are compared with, on the paper's client
  mode only.
- load-vs-connections (the app overheads): throughput, mean and p99 response time vs the
  number of client connections, one row per added client round trip, and the throughput each
  curve loses against the unreplicated baseline, with the paper's overhead as a dashed line.
- breakdown (the leader's view of one load): socket calls, bytes per call and the times of one
  consensus, measured beside the paper's values.

Everything drawn comes from a run directory (experiment.yaml, env.json, results.csv), so a
figure can be redrawn, restyled or regenerated on another machine without rerunning anything.
Measured points are medians over trials with bootstrap 95% intervals (gaia.stats).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from gaia import stats
from gaia.experiments.definition import ClientMode, Experiment
from gaia.results import Paths, RunDir

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">")
PAPER_MARKERS = ("D", "s", "^", "v", "P", "X")
PAPER_GREY = "0.35"
FORMATS = ("png", "pdf")


def plot_run(run_path: Path, paths: Paths | None = None) -> list[Path]:
    """Draw `run_path`'s figure into paper_figures/<experiment>.{png,pdf}; return the files."""
    paths = paths or Paths()
    run = RunDir(run_path)
    experiment = run.definition()
    draw = {
        "latency-vs-replicas": latency_figure,
        "load-vs-connections": load_figure,
        "breakdown": breakdown_figure,
    }[experiment.figure]
    rows = run.results()
    if not (rows["status"] == "ok").any():
        draw = nothing_measured_figure
    figure = draw(experiment, rows, caption(run))
    paths.figures.mkdir(parents=True, exist_ok=True)
    written = [paths.figure(experiment.name, suffix) for suffix in FORMATS]
    for path in written:
        # no creation date in the PDF: the same results give the same bytes
        metadata = {"CreationDate": None} if path.suffix == ".pdf" else None
        figure.savefig(path, dpi=160, bbox_inches="tight", metadata=metadata)
    return written


def caption(run: RunDir) -> str:
    """Which run a figure shows: directory, target, profile, commit (and whether it was dirty)."""
    env = run.env()
    git = env.get("git", {})
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
    profile = env.get("parameters", {}).get("profile", "?")
    return f"run {run.path.name} · target {env.get('target')} · {profile} · commit {commit}"


def latency_figure(experiment: Experiment, rows: pd.DataFrame, subtitle: str) -> Figure:
    summary = stats.summarize(rows)
    measured = [s.series for s in experiment.systems if s.series in set(summary["series"])]
    # colour-blind safe while it has enough colours (10), evenly spaced hues beyond
    colours = sns.color_palette("colorblind" if len(measured) <= 10 else "husl", len(measured))
    palette = dict(zip(measured, colours, strict=True))
    absent = sorted(set(rows.loc[rows["status"] != "ok", "series"]) - set(measured))
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = Figure(figsize=(5.2 * len(experiment.client_modes), 6.4), layout="constrained")
        axes = figure.subplots(
            1, len(experiment.client_modes), sharex=True, sharey=True, squeeze=False
        )[0]
        for ax, mode in zip(axes, experiment.client_modes, strict=True):
            _panel(
                ax, experiment, mode, summary[summary["connections"] == mode.connections], palette
            )
        axes[0].set_ylabel("consensus latency (µs)\nmedian over trials, 95% CI")
        handles: dict[str, Any] = {}
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        figure.legend(
            handles.values(), handles.keys(), loc="outside lower center", ncols=2, fontsize="small"
        )
        note = f"\nno data: {', '.join(absent)} (see REPORT.md)" if absent else ""
        figure.suptitle(f"{experiment.title}\n{subtitle}{note}", fontsize="medium")
    return figure


def _panel(
    ax: Any,
    experiment: Experiment,
    mode: ClientMode,
    summary: pd.DataFrame,
    palette: dict[str, Any],
) -> None:
    for index, (series, colour) in enumerate(palette.items()):
        points = summary[summary["series"] == series].sort_values("replicas")
        if points.empty:
            continue
        label = experiment.spec(series).label
        low = (points["median"] - points["low"]).fillna(0).to_numpy()
        high = (points["high"] - points["median"]).fillna(0).to_numpy()
        if len(points) == 1:
            (replicas,) = points["replicas"]
            (median,) = points["median"]
            ax.axhline(median, color=colour, linestyle=":", label=f"{label} ({replicas} replica)")
            ax.axhspan(median - low[0], median + high[0], color=colour, alpha=0.12, linewidth=0)
            continue
        ax.errorbar(
            points["replicas"],
            points["median"],
            yerr=np.vstack([low, high]),
            color=colour,
            marker=MARKERS[index % len(MARKERS)],
            capsize=3,
            label=label,
        )
    if mode.connections == experiment.paper.connections:
        for index, paper in enumerate(experiment.paper.series):
            replicas = sorted(paper.latency_us)
            ax.plot(
                replicas,
                [paper.latency_us[r] for r in replicas],
                linestyle="--",
                marker=PAPER_MARKERS[index % len(PAPER_MARKERS)],
                markerfacecolor="none",
                color=palette.get(paper.compare_with, PAPER_GREY),
                label=f"paper: {paper.name}",
            )
    ax.set_yscale("log")
    ticks = sorted(
        {*experiment.replicas, *(r for p in experiment.paper.series for r in p.latency_us)}
    )
    ax.set_xticks(ticks)
    ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
    ax.set_xlabel("replicas")
    paper_note = (
        " (with the paper's values)" if mode.connections == experiment.paper.connections else ""
    )
    ax.set_title(f"{mode.label}{paper_note}")


LOAD_PANELS: tuple[tuple[str, str], ...] = (
    ("throughput_rps", "throughput (req/s)"),
    ("mean_us", "mean response time (µs)"),
    ("p99_us", "p99 response time (µs)"),
)


def _curves(experiment: Experiment, rows: pd.DataFrame) -> list[tuple[str, int, str]]:
    """(series, replicas, label) of every curve with an ok trial, in definition order."""
    ok = rows[rows["status"] == "ok"]
    have = set(zip(ok["series"], ok["replicas"], strict=True))
    return [
        (s.series, r, f"{s.label}, {r} replica{'s' if r != 1 else ''}")
        for s in experiment.systems
        for r in s.replicas or experiment.replicas
        if (s.series, r) in have
    ]


def _overhead_claims(experiment: Experiment) -> list[tuple[int, float]]:
    """(round trip, paper %) of the throughput-overhead claims, for the dashed lines."""
    return sorted(
        {
            (c.client_rtt_us, c.paper)
            for c in experiment.claims
            if c.form == "overhead_pct" and c.metric == "throughput_rps"
        }
    )


def load_figure(experiment: Experiment, rows: pd.DataFrame, subtitle: str) -> Figure:
    curves = _curves(experiment, rows)
    colours = dict(
        zip(curves, sns.color_palette("colorblind", max(len(curves), 1)), strict=False)
    )
    rtts = experiment.client_rtt_us
    modes = [m.connections for m in experiment.client_modes]
    summaries = {metric: stats.summarize(rows, value=metric) for metric, _ in LOAD_PANELS}
    base = next((c for c in curves if c[0] == experiment.baseline), None)
    columns = len(LOAD_PANELS) + (base is not None)
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = Figure(figsize=(4.2 * columns, 3.4 * len(rtts) + 1.4), layout="constrained")
        axes = figure.subplots(len(rtts), columns, squeeze=False, sharex=True)
        for row_axes, rtt in zip(axes, rtts, strict=True):
            where = "client direct" if rtt == 0 else f"client +{rtt} µs RTT (relay)"
            for ax, (metric, title) in zip(row_axes, LOAD_PANELS, strict=False):
                summary = summaries[metric]
                for index, curve in enumerate(curves):
                    points = _points(summary, curve, rtt)
                    if points.empty:
                        continue
                    _errorbar(ax, points, colours[curve], MARKERS[index % len(MARKERS)], curve[2])
                ax.set_yscale("log")
                ax.set_title(f"{title}\n{where}", fontsize="small")
            if base is not None:
                _overhead_panel(
                    row_axes[-1],
                    experiment,
                    throughput=summaries["throughput_rps"],
                    curves=curves,
                    base=base,
                    rtt=rtt,
                    colours=colours,
                )
                row_axes[-1].set_title(
                    f"throughput lost vs {base[0]} (%)\n{where}", fontsize="small"
                )
        for ax in axes[-1]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(modes, [str(m) for m in modes])
            ax.set_xlabel("client connections")
        _legend(figure, axes)
        figure.suptitle(f"{experiment.title}\n{subtitle}", fontsize="medium")
    return figure


def _points(summary: pd.DataFrame, curve: tuple[str, int, str], rtt: int) -> pd.DataFrame:
    series, replicas, _ = curve
    mine = summary[
        (summary["series"] == series)
        & (summary["replicas"] == replicas)
        & (summary["client_rtt_us"] == rtt)
    ]
    return mine.sort_values("connections")


def _errorbar(ax: Any, points: pd.DataFrame, colour: Any, marker: str, label: str) -> None:
    low = (points["median"] - points["low"]).fillna(0).to_numpy()
    high = (points["high"] - points["median"]).fillna(0).to_numpy()
    ax.errorbar(
        points["connections"],
        points["median"],
        yerr=np.vstack([low, high]),
        color=colour,
        marker=marker,
        capsize=3,
        label=label,
    )


def _overhead_panel(
    ax: Any,
    experiment: Experiment,
    *,
    throughput: pd.DataFrame,
    curves: list[tuple[str, int, str]],
    base: tuple[str, int, str],
    rtt: int,
    colours: dict[tuple[str, int, str], Any],
) -> None:
    """Per connection count, (1 - curve / baseline) x 100 of the median throughputs."""
    baseline = _points(throughput, base, rtt).set_index("connections")["median"]
    for index, curve in enumerate(curves):
        if curve == base:
            continue
        mine = _points(throughput, curve, rtt).set_index("connections")["median"]
        both = mine.index.intersection(baseline.index)
        if both.empty:
            continue
        lost = (1 - mine[both] / baseline[both]) * 100
        ax.plot(both, lost, color=colours[curve], marker=MARKERS[index % len(MARKERS)])
    for claim_rtt, paper in _overhead_claims(experiment):
        if claim_rtt == rtt:
            ax.axhline(paper, color=PAPER_GREY, linestyle="--", label=f"paper: {paper:g}% lost")
    ax.set_ylim(-5, 105)


def _legend(figure: Figure, axes: Any) -> None:
    handles: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    figure.legend(
        handles.values(), handles.keys(), loc="outside lower center", ncols=2, fontsize="small"
    )


BREAKDOWN_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "socket calls agreed per run",
        (
            ("consensus_inputs", "accept + read + close"),
            ("input_calls", "reads with data"),
            ("consensus_rounds", "consensus rounds"),
        ),
    ),
    ("received bytes per read", (("input_bytes_per_call", "bytes per read"),)),
    (
        "time per consensus round (µs)",
        (
            ("storage_mean_us", "storage (L2 + L3)"),
            ("first_ack_mean_us", "first ack"),
            ("quorum_mean_us", "majority ack (consensus)"),
        ),
    ),
)


def _figure(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"


def breakdown_figure(experiment: Experiment, rows: pd.DataFrame, subtitle: str) -> Figure:
    """Bars: each measured quantity (median over trials, 95% CI) per curve, and the paper's."""
    curves = _curves(experiment, rows)
    paper = {c.metric: c.paper for c in experiment.claims if c.form == "value"}
    colours = sns.color_palette("colorblind", max(len(curves), 1))
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figure = Figure(figsize=(4.4 * len(BREAKDOWN_PANELS), 4.6), layout="constrained")
        axes = figure.subplots(1, len(BREAKDOWN_PANELS), squeeze=False)[0]
        for ax, (title, metrics) in zip(axes, BREAKDOWN_PANELS, strict=True):
            names: list[str] = []
            width = 0.8 / (len(curves) + 1)
            for m_index, (metric, name) in enumerate(metrics):
                names.append(name)
                summary = stats.summarize(rows, value=metric)
                for c_index, (series, replicas, label) in enumerate(curves):
                    mine = summary[
                        (summary["series"] == series) & (summary["replicas"] == replicas)
                    ]
                    if mine.empty:
                        continue
                    point = mine.iloc[0]
                    low = np.nan_to_num(point["median"] - point["low"])
                    high = np.nan_to_num(point["high"] - point["median"])
                    bars = ax.bar(
                        m_index + c_index * width,
                        point["median"],
                        width,
                        yerr=[[low], [high]],
                        capsize=3,
                        color=colours[c_index],
                        label=f"measured: {label}",
                    )
                    ax.bar_label(bars, [_figure(point["median"])], fontsize="x-small", padding=2)
                if metric in paper:
                    bars = ax.bar(
                        m_index + len(curves) * width,
                        paper[metric],
                        width,
                        color="none",
                        edgecolor=PAPER_GREY,
                        hatch="//",
                        label="paper",
                    )
                    ax.bar_label(bars, [_figure(paper[metric])], fontsize="x-small", padding=2)
            centres = [i + len(curves) * width / 2 for i in range(len(names))]
            ax.set_xticks(centres, [textwrap.fill(n, 14) for n in names], fontsize="small")
            if title.startswith("time"):
                ax.set_yscale("log")
                ax.set_ylim(bottom=1)
            ax.margins(y=0.12)
            ax.set_title(title)
        _legend(figure, axes)
        figure.suptitle(f"{experiment.title}\n{subtitle}", fontsize="medium")
    return figure


def nothing_measured_figure(experiment: Experiment, rows: pd.DataFrame, subtitle: str) -> Figure:
    """A run without a single measurement (every system unavailable here) says why, in place
    of empty axes."""
    reasons = sorted(set(rows.loc[rows["status"] != "ok", "reason"])) or ["no trials ran"]
    with sns.axes_style("white"), sns.plotting_context("paper"):
        figure = Figure(figsize=(8, 1.6 + 0.5 * len(reasons)), layout="constrained")
        ax = figure.subplots()
        ax.axis("off")
        text = "Nothing measured on this target:\n\n" + "\n".join(
            textwrap.fill(f"- {r}", 110) for r in reasons
        )
        ax.text(0, 1, text, va="top", ha="left", fontsize="small", transform=ax.transAxes)
        figure.suptitle(f"{experiment.title}\n{subtitle}", fontsize="medium")
    return figure
