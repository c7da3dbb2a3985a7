"""Round trip through each transport: replica 0 writes a sequence number into every peer, each
peer writes it back into its own slot of replica 0, and the round ends when all have answered
(with 2 processes a plain ping-pong; with 3, one replication round as APUS's leader sees it).

    .venv/bin/python benchmarks/transport_roundtrip.py [--rounds N] [--processes 2 3]

Prints median and p99 per configuration. Timings on a shared or loaded machine are noise:
check `uptime` first.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from gaia.transport import ClusterSpec, Transport, cleanup_shm, make_transport

U64 = struct.Struct("<Q")
REGION = 4096
PING = 0  # where replica 0 writes the round number in each peer
STOP = 2**64 - 1
WARMUP = 200


@dataclass(frozen=True)
class Config:
    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


CONFIGS = (
    Config("shm spin 50 µs (default)", "shm", {"spin": 50e-6}),
    Config("shm no spin", "shm", {"spin": 0.0}),
    Config("tcp blake2b", "tcp", {"mac": "blake2b"}),
    Config("tcp hmac-sha256", "tcp", {"mac": "hmac-sha256"}),
)


def slot(peer: int) -> int:
    """Where `peer` answers in replica 0's region."""
    return 8 * peer


def cluster_of(processes: int) -> ClusterSpec:
    ports = []
    for _ in range(processes):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    members = {i: ("127.0.0.1", port) for i, port in enumerate(ports)}
    return ClusterSpec(f"bench-{uuid.uuid4().hex[:8]}", members, key=os.urandom(32))


def answer(config: Config, me: int, cluster: ClusterSpec) -> None:
    """A peer: echo every new round number back to replica 0 until STOP."""
    with make_transport(config.kind, me, REGION, cluster, **config.options) as t:
        t.connect(30)
        last = 0
        while last != STOP:
            t.wait(1.0)
            k: int = U64.unpack_from(t.region, PING)[0]
            if k != last:
                t.write(0, slot(me), U64.pack(k))
                last = k


def lead(t: Transport, rounds: int) -> list[int]:
    """Replica 0: time `rounds` rounds, in nanoseconds."""
    times = []
    for k in range(1, rounds + 1):
        started = time.perf_counter_ns()
        for peer in t.peers:
            t.write(peer, PING, U64.pack(k))
        for peer in t.peers:
            while U64.unpack_from(t.region, slot(peer))[0] != k:
                if not t.wait(5.0):
                    raise TimeoutError(f"round {k}: peer {peer} did not answer")
        times.append(time.perf_counter_ns() - started)
    return times


def measure(config: Config, processes: int, rounds: int) -> list[int]:
    cluster = cluster_of(processes)
    context = multiprocessing.get_context("spawn")
    helpers = [
        context.Process(target=answer, args=(config, me, cluster), daemon=True)
        for me in range(1, processes)
    ]
    for helper in helpers:
        helper.start()
    try:
        with make_transport(config.kind, 0, REGION, cluster, **config.options) as t:
            t.connect(30)
            times = lead(t, WARMUP + rounds)[WARMUP:]
            for peer in t.peers:
                t.write(peer, PING, U64.pack(STOP))
            for helper in helpers:
                helper.join(10)
        return times
    finally:
        for helper in helpers:
            if helper.is_alive():
                helper.kill()
                helper.join()
        cleanup_shm(cluster.cluster_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 3])
    args = parser.parse_args()

    table = Table(
        title=f"transport round trip, µs ({args.rounds} rounds)",
        caption=f"load average {os.getloadavg()[0]:.1f} at the start",
    )
    for column in ("transport", "processes", "median", "p99", "mean"):
        table.add_column(column, justify="left" if column == "transport" else "right")
    for processes in args.processes:
        for config in CONFIGS:
            micros = [ns / 1e3 for ns in measure(config, processes, args.rounds)]
            table.add_row(
                config.name,
                str(processes),
                f"{statistics.median(micros):.1f}",
                f"{statistics.quantiles(micros, n=100)[98]:.1f}",
                f"{statistics.fmean(micros):.1f}",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
