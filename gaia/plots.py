"""Figures from results files only: latency vs replica count, one panel per client mode.

Everything drawn comes from a run directory (experiment.yaml, env.json, results.csv), so a
figure can be redrawn, restyled or regenerated on another machine without rerunning anything.
Each curve is one SystemSpec (system + durability, the label says both) at the median over
trials with its bootstrap 95% interval (gaia.stats); a curve measured at a single replica count
(the local-fsync floor) is a horizontal reference line. The paper's values are dashed, hollow
markers, in the colour of the curve they are compared with, on the paper's client mode only.
"""

from __future__ import annotations

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
    figure = latency_figure(experiment, run.results(), caption(run))
    paths.figures.mkdir(parents=True, exist_ok=True)
    written = [paths.figure(experiment.name, suffix) for suffix in FORMATS]
    for path in written:
        figure.savefig(path, dpi=160, bbox_inches="tight")
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
