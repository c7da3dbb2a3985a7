"""The one workload generator every system is measured with: closed-loop clients (paxi style).

Each of N connections is a thread with its own `ConsensusClient`; it submits one payload, waits
for the answer, and submits the next, so the offered load is whatever the system sustains at
that concurrency. Every request is recorded as (connection, start, end) with
`time.perf_counter_ns`; each connection's first requests are warm-up and are dropped. The whole
load is bounded in time: a system that stops answering fails the trial with `WorkloadTimeout`
instead of hanging the run (the caller then stops the system, which unblocks the clients).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from gaia.systems import ConsensusClient

POLL_S = 0.1
"""How often the waiting thread reports progress and checks the deadline."""


class WorkloadError(RuntimeError):
    """A client connection failed; the message names the connection and the request."""


class WorkloadTimeout(WorkloadError):
    """The load did not finish within its time bound."""


@dataclass(frozen=True)
class Load:
    """What one trial sends. `requests` and `warmup` are totals, spread evenly over the
    connections, so a trial costs the same number of agreements in every client mode."""

    connections: int
    requests: int
    warmup: int
    payload_bytes: int
    timeout_s: float

    def share(self, total: int, connection: int) -> int:
        """Connection `connection`'s part of `total` (the first ones take the remainder)."""
        base, extra = divmod(total, self.connections)
        return base + (connection < extra)


@dataclass(frozen=True)
class Metrics:
    """The per-trial numbers a results row carries (a load tool that cannot give an exact
    median leaves it None)."""

    requests: int
    median_us: float | None
    mean_us: float
    p99_us: float
    throughput_rps: float
    duration_s: float


@dataclass(frozen=True)
class InputBreakdown:
    """What a leader agreed on during one trial (the APUS paper's Table III), from two
    snapshots of its cumulative counters (gaia.systems.CountsInputs):

    - consensus_inputs: the socket calls that each went through consensus (accept, every read
      that returned data, close), as the seeds count them;
    - consensus_rounds: the log entries that carried them: one input each, or a BATCH of the
      inputs of every connection that was ready together;
    - input_calls and input_bytes_per_call: the reads alone, and their mean size;
    - storage / first-ack / quorum mean: per round, from its proposal to its local log write
      (L2), to the first backup's ack, to the majority's (the consensus latency).

    A counter the system does not keep gives None."""

    consensus_inputs: int | None = None
    consensus_rounds: int | None = None
    input_calls: int | None = None
    input_bytes_per_call: float | None = None
    storage_mean_us: float | None = None
    first_ack_mean_us: float | None = None
    quorum_mean_us: float | None = None

    COUNTERS: ClassVar[tuple[str, ...]] = (
        "consensus_inputs",
        "input_calls",
        "input_bytes",
        "timed_inputs",
        "storage_s",
        "first_ack_s",
        "quorum_s",
    )

    @classmethod
    def between(cls, before: Mapping[str, float], after: Mapping[str, float]) -> InputBreakdown:
        def delta(key: str) -> float | None:
            if key not in before or key not in after:
                return None
            return after[key] - before[key]

        def mean_us(total: float | None, count: float | None) -> float | None:
            return round(total / count * 1e6, 3) if total is not None and count else None

        calls, timed = delta("input_calls"), delta("timed_inputs")
        read = delta("input_bytes")
        inputs = delta("consensus_inputs")
        return cls(
            consensus_inputs=None if inputs is None else int(inputs),
            consensus_rounds=None if timed is None else int(timed),
            input_calls=None if calls is None else int(calls),
            input_bytes_per_call=round(read / calls, 3) if read is not None and calls else None,
            storage_mean_us=mean_us(delta("storage_s"), timed),
            first_ack_mean_us=mean_us(delta("first_ack_s"), timed),
            quorum_mean_us=mean_us(delta("quorum_s"), timed),
        )


@dataclass(frozen=True)
class Recording:
    """The measured (non-warm-up) requests of one trial, one entry per request."""

    connection: NDArray[np.int64]
    start_ns: NDArray[np.int64]
    end_ns: NDArray[np.int64]

    @property
    def count(self) -> int:
        return len(self.start_ns)

    @property
    def latency_us(self) -> NDArray[np.float64]:
        return (self.end_ns - self.start_ns) / 1e3

    @property
    def duration_s(self) -> float:
        """From the first measured request's start to the last one's end."""
        return float(self.end_ns.max() - self.start_ns.min()) / 1e9

    def metrics(self) -> Metrics:
        latency = self.latency_us
        duration = self.duration_s
        return Metrics(  # rounded to the clock's resolution (ns), for readable files
            requests=self.count,
            median_us=round(float(np.median(latency)), 3),
            mean_us=round(float(latency.mean()), 3),
            p99_us=round(float(np.percentile(latency, 99)), 3),
            throughput_rps=round(self.count / duration, 1) if duration > 0 else 0.0,
            duration_s=round(duration, 9),
        )


def payload(connection: int, sequence: int, size: int) -> bytes:
    """A distinct, readable payload of exactly `size` bytes, so logs show who sent what."""
    return f"{connection}:{sequence}:".encode().ljust(size, b".")[:size]


class _Connection(threading.Thread):
    """One closed-loop client: opens its connection, waits for the others, then submits."""

    def __init__(
        self,
        index: int,
        open_client: Callable[[], ConsensusClient],
        load: Load,
        start_line: threading.Barrier,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"workload-c{index}", daemon=True)
        self.index = index
        self.open_client = open_client
        self.warmup = load.share(load.warmup, index)
        self.total = self.warmup + load.share(load.requests, index)
        self.payload_bytes = load.payload_bytes
        self.start_line = start_line
        self.stop = stop
        self.done = 0
        self.times: list[tuple[int, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        client: ConsensusClient | None = None
        try:
            client = self.open_client()
            self.start_line.wait()
            for sequence in range(self.total):
                if self.stop.is_set():
                    return
                data = payload(self.index, sequence, self.payload_bytes)
                start = time.perf_counter_ns()
                client.submit(data)
                end = time.perf_counter_ns()
                if sequence >= self.warmup:
                    self.times.append((start, end))
                self.done = sequence + 1
        except threading.BrokenBarrierError:
            return  # another connection failed first; its error is the one reported
        except BaseException as exc:
            self.error = WorkloadError(f"connection {self.index}, request {self.done}: {exc!r}")
            self.error.__cause__ = exc
            self.start_line.abort()
        finally:
            if client is not None:
                client.close()


def run_closed_loop(
    open_client: Callable[[], ConsensusClient],
    load: Load,
    on_progress: Callable[[int, int], None] | None = None,
) -> Recording:
    """Drive `load` through clients from `open_client` and return the measured requests.

    `on_progress(done, total)` is called from the calling thread about every POLL_S seconds.
    Raises WorkloadError for the first failed connection and WorkloadTimeout past
    `load.timeout_s`; in both cases the other connections are told to stop after their current
    request. Ctrl-C in the calling thread does the same before propagating.
    """
    stop = threading.Event()
    start_line = threading.Barrier(load.connections)
    connections = [
        _Connection(i, open_client, load, start_line, stop) for i in range(load.connections)
    ]
    total = sum(c.total for c in connections)
    deadline = time.monotonic() + load.timeout_s
    try:
        for connection in connections:
            connection.start()
        while any(c.is_alive() for c in connections):
            failed = next((c.error for c in connections if c.error is not None), None)
            if failed is not None:
                raise failed
            if time.monotonic() > deadline:
                done = sum(c.done for c in connections)
                raise WorkloadTimeout(
                    f"{done} of {total} requests answered within {load.timeout_s:g} s"
                )
            if on_progress is not None:
                on_progress(sum(c.done for c in connections), total)
            alive = [c for c in connections if c.is_alive()]
            if alive:
                alive[0].join(POLL_S)
    finally:
        stop.set()
        start_line.abort()
    failed = next((c.error for c in connections if c.error is not None), None)
    if failed is not None:
        raise failed
    if on_progress is not None:
        on_progress(total, total)
    return _recording(connections)


def _recording(connections: list[_Connection]) -> Recording:
    rows = [(c.index, start, end) for c in connections for start, end in c.times]
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return Recording(table[:, 0], table[:, 1], table[:, 2])
