"""Across-trial statistics on data whose answers are known."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from gaia.stats import GROUP_BY, median_ci, summarize

SUMMARY_COLUMNS = [*GROUP_BY, "median", "low", "high", "n"]


def test_median_and_interval_of_known_data() -> None:
    estimate = median_ci([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert estimate.median == 5
    assert estimate.n == 9
    assert 1 <= estimate.low < 5 < estimate.high <= 9
    assert median_ci([1, 2, 3, 4, 5, 6, 7, 8, 9]) == estimate  # seeded: reports are stable


def test_interval_narrows_with_less_spread() -> None:
    wide = median_ci([10, 20, 30, 40, 50, 60])
    narrow = median_ci([34, 35, 35, 35, 36, 36])
    assert narrow.high - narrow.low < wide.high - wide.low


def test_degenerate_inputs() -> None:
    one = median_ci([42.0])
    assert one.median == 42 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)
    same = median_ci([7.0, 7.0, 7.0])
    assert (same.median, same.low, same.high, same.n) == (7, 7, 7, 3)
    assert median_ci([float("nan"), 3.0, 5.0]).n == 2
    assert median_ci([]).n == 0


def test_summarize_groups_ok_trials_only() -> None:
    rows = pd.DataFrame(
        {
            "series": ["a", "a", "a", "a", "b", "b"],
            "replicas": [3, 3, 3, 3, 3, 3],
            "connections": [1, 1, 1, 1, 1, 1],
            "client_rtt_us": [0, 0, 0, 0, 0, 0],
            "status": ["ok", "ok", "ok", "failed", "ok", "not-run-here"],
            "median_us": [10.0, 30.0, 20.0, None, 5.0, None],
        }
    )
    summary = summarize(rows).set_index("series")
    assert summary.loc["a", "median"] == 20
    assert summary.loc["a", "n"] == 3
    assert summary.loc["b", "median"] == 5 and summary.loc["b", "n"] == 1
    assert list(summary.columns) == SUMMARY_COLUMNS[1:]


def test_summarize_of_nothing_has_the_columns() -> None:
    columns = ["series", "replicas", "connections", "client_rtt_us", "status", "median_us"]
    empty = pd.DataFrame(columns=columns)
    assert list(summarize(empty).columns) == SUMMARY_COLUMNS


@pytest.mark.parametrize("confidence", [0.5, 0.95])
def test_confidence_level_is_honoured(confidence: float) -> None:
    estimate = median_ci(list(range(1, 30)), confidence=confidence)
    assert estimate.low <= 15 <= estimate.high
