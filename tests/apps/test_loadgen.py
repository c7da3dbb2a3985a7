"""The load tools' command builders and output parsers (outputs as the real tools print them)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gaia.apps import loadgen
from gaia.apps.loadgen import ToolLoad
from gaia.apus.systems import leader_counters
from gaia.workload import InputBreakdown, WorkloadError

DATA = Path(__file__).parent / "data"
LOAD = ToolLoad(connections=8, requests=4000, payload_bytes=64, operations=(), timeout_s=60)

REDIS_CSV = """\
"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","50000.00","0.100","0.016","0.079","0.127","0.300","0.375"
"GET","100000.00","0.060","0.016","0.063","0.111","0.200","1.231"
"""

YCSB_OUT = """\
[OVERALL], RunTime(ms), 2000
[OVERALL], Throughput(ops/sec), 500.0
[READ], Operations, 600
[READ], AverageLatency(us), 400.0
[READ], 99thPercentileLatency(us), 900
[READ], Return=OK, 600
[UPDATE], Operations, 400
[UPDATE], AverageLatency(us), 900.0
[UPDATE], 99thPercentileLatency(us), 1500
[CLEANUP], Operations, 8
[CLEANUP], AverageLatency(us), 10.0
"""


def test_redis_benchmark_runs_each_operation_as_half_of_the_requests(tmp_path: Path) -> None:
    argv = loadgen.redis_benchmark_command(("127.0.0.1", 7000), LOAD, tmp_path).argv
    assert argv[:5] == ("redis-benchmark", "-h", "127.0.0.1", "-p", "7000")
    text = " ".join(argv)
    assert "-t set,get -d 64 -n 2000 -c 8 --csv" in text


def test_redis_benchmark_output_becomes_one_trial_of_the_mix() -> None:
    metrics = loadgen.parse_redis_benchmark(REDIS_CSV, LOAD)
    assert metrics.requests == 4000
    # 2000 SETs in 40 ms and 2000 GETs in 20 ms: 4000 in 60 ms
    assert metrics.throughput_rps == pytest.approx(66_666.7, abs=0.1)
    assert metrics.duration_s == pytest.approx(0.06)
    assert metrics.mean_us == pytest.approx(80.0)  # equal counts: the mean of the means
    assert metrics.p99_us == pytest.approx(300.0)  # the larger p99: an upper bound of the mix
    assert metrics.median_us is None
    with pytest.raises(WorkloadError, match="no results"):
        loadgen.parse_redis_benchmark("Could not connect to Redis\n", LOAD)
    too_fast = REDIS_CSV.replace('"50000.00"', '"inf"')
    with pytest.raises(WorkloadError, match="too few requests"):
        loadgen.parse_redis_benchmark(too_fast, LOAD)


def test_memcaslap_gets_a_config_file_with_the_mix(tmp_path: Path) -> None:
    command = loadgen.memcaslap_command(("127.0.0.1", 7001), LOAD, tmp_path)
    text = " ".join(command.argv)
    assert "-s 127.0.0.1:7001 -T 2 -c 8 -x 4000 -F" in text
    assert command.files["memcaslap.cfg"].split("\n") == [
        "key",
        "16 16 1",
        "value",
        "64 64 1",
        "cmd",
        "0 0.5",
        "1 0.5",
        "",
    ]
    single = ToolLoad(1, 100, 64, (), 60)
    assert "-T 1 -c 1" in " ".join(loadgen.memcaslap_command(("h", 1), single, tmp_path).argv)
    with pytest.raises(ValueError, match="memcaslap runs set, get"):
        loadgen.memcaslap_command(("h", 1), ToolLoad(1, 100, 64, ("scan",), 60), tmp_path)


def test_memcaslap_output_gives_tps_mean_and_an_interpolated_p99() -> None:
    metrics = loadgen.parse_memcaslap((DATA / "memcaslap.out").read_text(), LOAD)
    assert metrics.requests == 4000 and metrics.throughput_rps == 100_326
    assert metrics.mean_us == 74
    # Total: 3943 of 4000 at or below 256 µs, 23 in (256, 512]: the 3960th is 17/23 in
    assert metrics.p99_us == pytest.approx(256 * 2 ** (17 / 23), rel=1e-6)


def test_log2_percentile_interpolates_inside_a_bucket() -> None:
    assert loadgen.log2_percentile({4: 50, 5: 50}, 0.5) == pytest.approx(16)
    assert loadgen.log2_percentile({5: 100}, 0.5) == pytest.approx(16 * math.sqrt(2))
    assert math.isnan(loadgen.log2_percentile({}, 0.5))


def test_ycsb_summary_is_weighted_by_operation(tmp_path: Path) -> None:
    metrics = loadgen.parse_ycsb(YCSB_OUT, LOAD)
    assert metrics.requests == 1000
    assert metrics.throughput_rps == 500.0 and metrics.duration_s == 2.0
    assert metrics.mean_us == pytest.approx(600.0)
    assert metrics.p99_us == 1500
    run = loadgen.DRIVERS["ycsb"].command(("10.0.0.2", 27017), LOAD, tmp_path)
    assert run.argv[:3] == ("ycsb", "run", "mongodb")
    assert "mongodb.url=mongodb://10.0.0.2:27017/ycsb?w=1" in run.argv
    props = run.files["ycsb.properties"]
    assert "readproportion=0.5" in props and "updateproportion=0.5" in props
    assert "insertproportion=0" in props and "operationcount=4000" in props


def test_tools_say_where_they_come_from() -> None:
    assert loadgen.driver("redis-benchmark").role == "redis"
    assert loadgen.driver("memcaslap").package == "libmemcached-tools"
    with pytest.raises(ValueError, match="unknown load tool 'memtier'"):
        loadgen.driver("memtier")


def test_the_breakdown_is_the_difference_of_two_leader_snapshots() -> None:
    def status(
        calls: int, bytes_: int, data: int, timed: int, quorum_s: float
    ) -> dict[str, object]:
        return {
            "timing_totals": {
                "count": timed,
                "storage_s": timed * 100e-6,
                "first_ack_s": timed * 300e-6,
                "quorum_s": quorum_s,
            },
            "app": {
                "shim": {"calls": calls, "input_bytes": bytes_},
                "proposed": {"connect": 9, "data": data, "close": 9, "output": 150},
            },
        }

    before = leader_counters(status(100, 7000, 100, 118, 0.05))
    after = leader_counters(status(10_100, 7000 + 720_000, 10_100, 10_134, 0.05 + 10_016 * 5e-4))
    breakdown = InputBreakdown.between(before, after)
    assert breakdown.input_calls == 10_000
    assert breakdown.consensus_inputs == 10_000  # accepts and closes did not change
    assert breakdown.consensus_rounds == 10_016
    assert breakdown.input_bytes_per_call == pytest.approx(72.0)
    assert breakdown.quorum_mean_us == pytest.approx(500.0)
    assert breakdown.storage_mean_us == pytest.approx(100.0)
    assert InputBreakdown.between({}, {}) == InputBreakdown()
