"""Across-trial statistics: the median of per-trial medians with a bootstrap confidence interval.

A trial's own median says how fast one run was; repeating trials says how much that varies from
run to run (JIT warm-up, page cache, scheduler), which is the uncertainty a figure should show.
The interval is scipy's percentile bootstrap with a fixed seed, so a report regenerated from the
same results files shows the same numbers. With a handful of trials it is wide, as it should be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
GROUP_BY: tuple[str, ...] = ("series", "replicas", "connections", "client_rtt_us")


@dataclass(frozen=True)
class Estimate:
    """A median with its confidence interval (NaN bounds when one value cannot give one)."""

    median: float
    low: float
    high: float
    n: int


def median_ci(values: ArrayLike, confidence: float = CONFIDENCE) -> Estimate:
    data = np.asarray(values, dtype=float)
    data = data[~np.isnan(data)]
    if data.size == 0:
        return Estimate(np.nan, np.nan, np.nan, 0)
    median = float(np.median(data))
    if data.size == 1:
        return Estimate(median, np.nan, np.nan, 1)
    if np.ptp(data) == 0:  # bootstrap is degenerate, and the interval is exactly the value
        return Estimate(median, median, median, int(data.size))
    result = stats.bootstrap(
        (data,),
        np.median,
        confidence_level=confidence,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )
    interval = result.confidence_interval
    return Estimate(median, float(interval.low), float(interval.high), int(data.size))


def summarize(
    rows: pd.DataFrame, value: str = "median_us", by: Sequence[str] = GROUP_BY
) -> pd.DataFrame:
    """One row per (curve, replicas, connections, added round trip) over the ok trials with a
    value: median, low, high, n."""
    ok = rows[(rows["status"] == "ok") & rows[value].notna()]
    records = [
        {**dict(zip(by, key, strict=True)), **vars(median_ci(group[value]))}
        for key, group in ok.groupby(list(by), sort=True)
    ]
    return pd.DataFrame(records, columns=[*by, "median", "low", "high", "n"])
