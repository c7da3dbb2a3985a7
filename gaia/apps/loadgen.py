"""The apps' own load tools, as the app experiments run them: pure command builders and output
parsers, and one function that runs a tool with its process logged like every other.

- redis-benchmark (Redis): each operation (`-t set,get`) is its own test of n / 2 requests;
  it reports per test rps, mean, p50 and p99 (ms).
- memcaslap (memcached): n operations mixed by its config file's `cmd` proportions; it reports
  TPS, and per operation and in total a mean and a log2 histogram (µs).
- ycsb (MongoDB, testbed only): `load` puts the records in, then `run` does n operations; it
  reports [OVERALL] throughput and per operation a mean and a p99 (µs).

Every run becomes one `Metrics` for its trial, over all of its operations together:
throughput is requests over the time they took; the mean response time is exact (weighted by
each operation's count); the p99 of the mix is given as the largest per-operation p99 where a
tool reports only those (redis-benchmark, YCSB: an upper bound of the mix's p99), and read off
the combined log2 histogram by interpolation within its bucket for memcaslap (whose buckets are
a factor of two wide). No tool gives the mix's median exactly, so it is left out (None).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from gaia.apps.relay import DelayRelay, RelayStats
from gaia.cluster.procs import ProcessGroup, ProcessSpec
from gaia.systems import CountsInputs, ServesApp, SystemUnavailable
from gaia.workload import InputBreakdown, Metrics, WorkloadError, WorkloadTimeout

Address = tuple[str, int]


@dataclass(frozen=True)
class ToolLoad:
    """One run of a load tool: totals over its connections and operations."""

    connections: int
    requests: int
    payload_bytes: int
    operations: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True)
class Command:
    """What to run: the argv, and files it reads (name -> text, written beside its logs)."""

    argv: tuple[str, ...]
    files: Mapping[str, str] = field(default_factory=dict)


Builder = Callable[[Address, ToolLoad, Path], Command]


@dataclass(frozen=True)
class Driver:
    """A load tool: its binary, which provisioning role installs it here ("" for none: the
    tool then exists only on a testbed, and its trials are not run here), how to build its
    commands and read its output. `prepare` runs once per system before the first run."""

    tool: str
    binary: str
    role: str
    package: str
    default_operations: tuple[str, ...]
    command: Builder
    parse: Callable[[str, ToolLoad], Metrics]
    prepare: Builder | None = None
    where: str = ""

    def installed(self) -> bool:
        return shutil.which(self.binary) is not None

    def require(self) -> None:
        """SystemUnavailable unless the tool can run here (for tools no local role installs)."""
        if not self.installed():
            raise SystemUnavailable(f"{self.tool}: {self.binary} is not installed: {self.where}")

    def operations(self, load: ToolLoad) -> tuple[str, ...]:
        return load.operations or self.default_operations


# -- redis-benchmark


def redis_benchmark_command(address: Address, load: ToolLoad, workdir: Path) -> Command:
    """Each operation is one of redis-benchmark's tests, n / (number of operations) each."""
    tests = DRIVERS["redis-benchmark"].operations(load)
    per_test = max(1, load.requests // len(tests))
    argv = (
        "redis-benchmark", "-h", address[0], "-p", str(address[1]),
        "-t", ",".join(tests), "-d", str(load.payload_bytes), "-n", str(per_test),
        "-c", str(load.connections), "--csv", "--precision", "3",
    )  # fmt: skip
    return Command(argv)


def parse_redis_benchmark(text: str, load: ToolLoad) -> Metrics:
    """The --csv output: one line per test, latencies in milliseconds."""
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r.get("rps")]
    if not rows:
        raise WorkloadError(f"redis-benchmark printed no results: {text.strip()[-300:]!r}")
    # every test ran the same number of requests: the times add up, the means average
    if any(not math.isfinite(float(r["rps"])) or float(r["rps"]) <= 0 for r in rows):
        raise WorkloadError(
            "redis-benchmark's millisecond clock saw a test end within 0 ms: too few requests "
            f"({load.requests}) to measure a throughput"
        )
    tests = len(rows)
    requests = max(1, load.requests // tests) * tests
    seconds = sum(requests / tests / float(r["rps"]) for r in rows)
    return Metrics(
        requests=requests,
        median_us=None,
        mean_us=round(1000 * sum(float(r["avg_latency_ms"]) for r in rows) / tests, 3),
        p99_us=round(1000 * max(float(r["p99_latency_ms"]) for r in rows), 3),
        throughput_rps=round(requests / seconds, 1),
        duration_s=round(seconds, 6),
    )


# -- memcaslap (memaslap)

_MEMCASLAP_OPS = {"set": 0, "get": 1}
MEMCASLAP_KEY_BYTES = 16  # as redis-benchmark's "key:__rand_int__"


def memcaslap_command(address: Address, load: ToolLoad, workdir: Path) -> Command:
    """`-x n` operations over `-c` connections, in at most two threads (it needs at least one
    connection per thread), mixed by its config file; `-S` longer than the run, so that it
    prints its statistics once, at the end."""
    ops = DRIVERS["memcaslap"].operations(load)
    unknown = [op for op in ops if op not in _MEMCASLAP_OPS]
    if unknown:
        raise ValueError(f"memcaslap runs {', '.join(_MEMCASLAP_OPS)}, not {', '.join(unknown)}")
    share = 1 / len(ops)
    config = "\n".join(
        [
            "key",
            f"{MEMCASLAP_KEY_BYTES} {MEMCASLAP_KEY_BYTES} 1",
            "value",
            f"{load.payload_bytes} {load.payload_bytes} 1",
            "cmd",
            *(f"{_MEMCASLAP_OPS[op]} {share:g}" for op in ops),
            "",
        ]
    )
    cfg = workdir / "memcaslap.cfg"
    report_after = max(1, math.ceil(load.timeout_s) + 60)
    argv = (
        "memcaslap", "-s", f"{address[0]}:{address[1]}", "-T", str(min(2, load.connections)),
        "-c", str(load.connections), "-x", str(load.requests), "-F", str(cfg),
        "-S", f"{report_after}s",
    )  # fmt: skip
    return Command(argv, {cfg.name: config})


_STATS = re.compile(r"^(\w+) Statistics \((\d+) events\)$")
_TPS = re.compile(r"Run time: ([\d.]+)s Ops: (\d+) TPS: (\d+)")


def parse_memcaslap(text: str, load: ToolLoad) -> Metrics:
    """Its final statistics: TPS, and the Total section's mean and log2 histogram (bucket k
    holds the response times in (2^(k-1), 2^k] µs)."""
    lines = text.splitlines()
    tps = _TPS.search(text)
    starts = [
        i for i, line in enumerate(lines) if (m := _STATS.match(line.strip())) and m[1] == "Total"
    ]
    if tps is None or not starts:
        raise WorkloadError(f"memcaslap printed no final statistics: {text.strip()[-300:]!r}")
    section = lines[starts[-1] + 1 :]
    mean = next(float(line.split()[1]) for line in section if line.strip().startswith("Avg:"))
    buckets = _log2_buckets(section)
    ops = int(tps[2])
    return Metrics(
        requests=ops,
        median_us=None,
        mean_us=mean,
        p99_us=round(log2_percentile(buckets, 0.99), 3),
        throughput_rps=float(tps[3]),
        duration_s=ops / float(tps[3]) if float(tps[3]) else 0.0,
    )


def _log2_buckets(section: list[str]) -> dict[int, int]:
    """The histogram under "Log2 Dist:": rows "K: n_K n_K+1 n_K+2 n_K+3" until a blank line."""
    start = next(i for i, line in enumerate(section) if "Log2 Dist:" in line)
    buckets: dict[int, int] = {}
    for line in section[start + 1 :]:
        if not line.strip():
            break
        first, *counts = line.split()
        base = int(first.rstrip(":"))
        buckets.update({base + i: int(n) for i, n in enumerate(counts)})
    return buckets


def log2_percentile(buckets: Mapping[int, int], q: float) -> float:
    """The q-quantile of a log2 histogram, interpolated geometrically inside its bucket."""
    total = sum(buckets.values())
    if total == 0:
        return math.nan
    rank = q * total
    seen = 0
    for k in sorted(buckets):
        count = buckets[k]
        if count and seen + count >= rank:
            low, high = (2.0 ** (k - 1) if k > 0 else 0.0), 2.0**k
            fraction = (rank - seen) / count
            return low * (high / low) ** fraction if low > 0 else high * fraction
        seen += count
    return 2.0 ** max(buckets)


# -- YCSB (MongoDB; testbed only)

_YCSB_OPS = ("read", "update", "insert", "scan", "readmodifywrite")


def _ycsb_properties(load: ToolLoad) -> str:
    ops = DRIVERS["ycsb"].operations(load)
    unknown = [op for op in ops if op not in _YCSB_OPS]
    if unknown:
        raise ValueError(f"ycsb runs {', '.join(_YCSB_OPS)}, not {', '.join(unknown)}")
    share = 1 / len(ops)
    lines = [
        "workload=site.ycsb.workloads.CoreWorkload",
        "recordcount=1000",
        f"operationcount={load.requests}",
        "fieldcount=1",
        f"fieldlength={load.payload_bytes}",
        "requestdistribution=zipfian",
        *(f"{op}proportion={share if op in ops else 0:g}" for op in _YCSB_OPS),
    ]
    return "\n".join([*lines, ""])


def _ycsb(phase: str) -> Builder:
    def build(address: Address, load: ToolLoad, workdir: Path) -> Command:
        props = workdir / "ycsb.properties"
        url = f"mongodb://{address[0]}:{address[1]}/ycsb?w=1"
        argv = (
            "ycsb", phase, "mongodb", "-s", "-P", str(props), "-p", f"mongodb.url={url}",
            "-threads", str(load.connections),
        )  # fmt: skip
        return Command(argv, {props.name: _ycsb_properties(load)})

    return build


def parse_ycsb(text: str, load: ToolLoad) -> Metrics:
    """The summary lines "[SECTION], Name, value" of a `ycsb run`."""
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].startswith("["):
            try:
                values[(parts[0].strip("[]"), parts[1])] = float(parts[2])
            except ValueError:
                continue
    ops = {
        section: values[(section, "Operations")]
        for section, name in values
        if name == "Operations" and section not in ("OVERALL", "CLEANUP")
        and not section.endswith("-FAILED")
    }  # fmt: skip
    if ("OVERALL", "Throughput(ops/sec)") not in values or not ops:
        raise WorkloadError(f"ycsb printed no summary: {text.strip()[-300:]!r}")
    count = sum(ops.values())
    mean = sum(values[(s, "AverageLatency(us)")] * n for s, n in ops.items()) / count
    return Metrics(
        requests=int(count),
        median_us=None,
        mean_us=round(mean, 3),
        p99_us=max(values[(s, "99thPercentileLatency(us)")] for s in ops),
        throughput_rps=values[("OVERALL", "Throughput(ops/sec)")],
        duration_s=values[("OVERALL", "RunTime(ms)")] / 1000,
    )


DRIVERS: Mapping[str, Driver] = MappingProxyType(
    {
        "redis-benchmark": Driver(
            "redis-benchmark",
            "redis-benchmark",
            role="redis",
            package="redis-tools",
            default_operations=("set", "get"),
            command=redis_benchmark_command,
            parse=parse_redis_benchmark,
        ),
        "memcaslap": Driver(
            "memcaslap",
            "memcaslap",
            role="memcached",
            package="libmemcached-tools",
            default_operations=("set", "get"),
            command=memcaslap_command,
            parse=parse_memcaslap,
        ),
        "ycsb": Driver(
            "ycsb",
            "ycsb",
            role="",
            package="",
            default_operations=("read", "update"),  # YCSB workload A
            command=_ycsb("run"),
            parse=parse_ycsb,
            prepare=_ycsb("load"),
            where="YCSB is not packaged by Debian and cannot be downloaded here: testbed only "
            "(put its bin/ on PATH)",
        ),
    }
)


def driver(tool: str) -> Driver:
    try:
        return DRIVERS[tool]
    except KeyError:
        raise ValueError(f"unknown load tool {tool!r}; known: {', '.join(DRIVERS)}") from None


def run_tool(tool: Driver, address: Address, load: ToolLoad, log_dir: Path, name: str) -> Metrics:
    """Run `tool` against `address` and return its metrics (see `_run_logged`)."""
    stdout = _run_logged(tool, tool.command(address, load, log_dir), load, log_dir, name)
    return tool.parse(stdout, load)


def prepare_tool(tool: Driver, address: Address, load: ToolLoad, log_dir: Path, name: str) -> None:
    """The tool's one-off preparation of a fresh system (YCSB loads its records), if any."""
    if tool.prepare is not None:
        _run_logged(tool, tool.prepare(address, load, log_dir), load, log_dir, name)


def _run_logged(tool: Driver, command: Command, load: ToolLoad, log_dir: Path, name: str) -> str:
    """Run `command` in `log_dir` (with its files written there) and return its stdout. The
    process is logged as NAME.command/.stdout/.stderr/.exit and always reaped; past
    `load.timeout_s` it is stopped and WorkloadTimeout raised; a failure quotes its output."""
    for file_name, text in command.files.items():
        (log_dir / file_name).write_text(text)
    group = ProcessGroup(log_dir, term_grace=5.0)
    try:
        process = group.launch(ProcessSpec(name, command.argv, cwd=log_dir))
        try:
            code = process.popen.wait(timeout=load.timeout_s)
        except subprocess.TimeoutExpired:
            raise WorkloadTimeout(
                f"{tool.binary} did not finish {load.requests} requests within "
                f"{load.timeout_s:g} s"
            ) from None
    finally:
        group.stop()
    if code != 0:
        raise WorkloadError(f"{tool.binary} exited with status {code}:\n{process.log_tail(10)}")
    return process.stdout_path.read_text(errors="replace")


@dataclass(frozen=True)
class Measured:
    """One trial of an app experiment: the tool's metrics, what the leader agreed on meanwhile
    (all None for a system that keeps no counters) and what the relay did (None: no relay)."""

    metrics: Metrics
    breakdown: InputBreakdown
    relay: RelayStats | None


def measure(
    system: ServesApp,
    tool: Driver,
    load: ToolLoad,
    *,
    warmup: int,
    client_rtt_us: int,
    log_dir: Path,
    name: str,
    prepare: bool = False,
) -> Measured:
    """Drive `system`'s server with `tool`: its preparation (on a fresh system), a warm-up run
    of `warmup` requests, then the measured run, each through its own delaying relay when
    `client_rtt_us` is set (the baseline and the replicated leader alike), with the leader's
    counters read just before and just after the measured run."""
    address = system.app_address()
    if prepare:
        prepare_tool(tool, address, load, log_dir, f"{name}.prepare")
    if warmup:
        warm = dataclasses.replace(load, requests=max(warmup, load.connections))
        with _client_path(address, client_rtt_us) as (target, _):  # its numbers do not count
            _run_logged(tool, tool.command(target, warm, log_dir), warm, log_dir, f"{name}.warmup")
    counters = system.input_counters if isinstance(system, CountsInputs) else dict
    before = counters()
    with _client_path(address, client_rtt_us) as (target, relay):
        metrics = run_tool(tool, target, load, log_dir, f"{name}.load")
    breakdown = InputBreakdown.between(before, counters())
    return Measured(metrics, breakdown, relay.stats() if relay is not None else None)


@contextlib.contextmanager
def _client_path(address: Address, rtt_us: int) -> Iterator[tuple[Address, DelayRelay | None]]:
    """Where the tool connects: the server itself, or a fresh relay adding `rtt_us` to it."""
    if not rtt_us:
        yield address, None
        return
    with DelayRelay.for_rtt(address, rtt_us) as relay:
        yield relay.address, relay
