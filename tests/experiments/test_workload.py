"""The closed-loop workload generator, driving the real reference system."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gaia.experiments.reference import LocalLog
from gaia.workload import Load, WorkloadError, WorkloadTimeout, payload, run_closed_loop


def started(tmp_path: Path, durability: str) -> LocalLog:
    log = LocalLog(1, tmp_path, durability=durability)  # type: ignore[arg-type]
    log.start()
    return log


def test_counts_warmup_and_metrics(tmp_path: Path) -> None:
    log = started(tmp_path, "memory")
    progress: list[tuple[int, int]] = []
    load = Load(connections=7, requests=100, warmup=20, payload_bytes=64, timeout_s=30)
    recording = run_closed_loop(
        log.client, load, lambda done, total: progress.append((done, total))
    )
    log.stop()
    assert recording.count == 100  # warm-up requests are not in the recording ...
    assert log.describe()["entries"] == 120  # ... but they were sent
    assert sorted(set(recording.connection.tolist())) == list(range(7))
    assert (recording.end_ns >= recording.start_ns).all()
    metrics = recording.metrics()
    assert metrics.requests == 100
    assert 0 < metrics.median_us <= metrics.p99_us
    assert metrics.throughput_rps > 0
    assert progress[-1] == (120, 120)


def test_load_is_spread_over_connections() -> None:
    load = Load(connections=3, requests=10, warmup=4, payload_bytes=8, timeout_s=1)
    assert [load.share(10, c) for c in range(3)] == [4, 3, 3]
    assert [load.share(4, c) for c in range(3)] == [2, 1, 1]


def test_payloads_have_the_requested_size() -> None:
    assert len(payload(23, 123456, 64)) == 64
    assert payload(1, 2, 16) == b"1:2:............"
    assert len(payload(123, 456789, 4)) == 4


def test_a_slow_system_times_out_instead_of_hanging(tmp_path: Path) -> None:
    log = started(tmp_path, "fsync")
    load = Load(connections=2, requests=1_000_000, warmup=0, payload_bytes=64, timeout_s=0.3)
    began = time.monotonic()
    with pytest.raises(WorkloadTimeout, match=r"of 1000000 requests answered within 0.3 s"):
        run_closed_loop(log.client, load)
    assert time.monotonic() - began < 5
    log.stop()


def test_a_failing_system_fails_the_load_and_names_the_connection(tmp_path: Path) -> None:
    log = started(tmp_path, "memory")
    log.stop()  # every submit now raises
    load = Load(connections=4, requests=40, warmup=0, payload_bytes=64, timeout_s=30)
    with pytest.raises(WorkloadError, match=r"connection \d, request 0: RuntimeError"):
        run_closed_loop(log.client, load)
