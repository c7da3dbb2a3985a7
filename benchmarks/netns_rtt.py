"""What per-replica network namespaces cost: TCP round trips through the bridge vs loopback,
and the time to make and remove one cluster's namespaces.

    .venv/bin/python benchmarks/netns_rtt.py [--rounds 2000] [--trials 7] [--members 3]

Needs root (it makes namespaces with gaia.cluster.netns). A 64-byte ping-pong over one TCP
connection (TCP_NODELAY), on three paths:

- loopback: client and echo server in this namespace, on 127.0.0.1 (isolation "none");
- root->member: client here, server in a member's namespace, through the bridge and a veth
  (how the benchmark client reaches replicas);
- member->member: both in namespaces, through two veths and the bridge (how replicas talk
  over the tcp transport);

each with three placements: client and server pinned to the same CPU, pinned to two CPUs, and
left to the scheduler. Placement matters more than the path here: a wake-up on the other vCPU
of this VM costs ~50 µs, and left unpinned a veth path ended up across the two vCPUs in some
trials where loopback hardly ever did (a wide interval), so only pinned pairs compare paths.

Each trial runs every configuration once, in turn, so drift on a shared machine hits them
alike; the table gives the median over trials of each trial's median, with a 95% bootstrap
interval (gaia.stats), the median p99, and the ratio to loopback with the same placement.
Timings on a loaded machine are noise: see `uptime`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gaia.cluster import netns
from gaia.cluster.procs import ProcessGroup, ProcessSpec
from gaia.stats import median_ci

PAYLOAD = b"x" * 64
PORT = 7100  # servers pinned to CPU 0; PORT + 1: servers left to the scheduler
WARMUP = 200
LOOPBACK = "loopback"
SERVER = """
import os, socket, sys
if sys.argv[3] != "-":
    os.sched_setaffinity(0, {int(sys.argv[3])})
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)
"""


def client(host: str, port: int, rounds: int) -> list[float]:
    """Round trips in µs, after a warm-up (runs in whichever namespace this process is in)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(WARMUP + rounds):
            started = time.perf_counter_ns()
            sock.sendall(PAYLOAD)
            got = 0
            while got < len(PAYLOAD):
                got += len(sock.recv(4096))
            times.append((time.perf_counter_ns() - started) / 1e3)
    return times[WARMUP:]


def run_client(
    prefix: Sequence[str], host: str, port: int, rounds: int, cpu: int | None
) -> list[float]:
    """`client` in a fresh interpreter (on `cpu` if given), inside a namespace when `prefix`
    is `ip netns exec`."""
    argv = [*prefix, sys.executable, __file__, "--client", host, str(port), str(rounds)]
    argv += ["--cpu", str(cpu)] if cpu is not None else []
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300).stdout
    samples: list[float] = json.loads(out)
    return samples


def network_setup_seconds(members: int, times: int) -> tuple[list[float], list[float]]:
    """Seconds to create and to destroy a cluster's bridge and `members` namespaces."""
    made, removed = [], []
    for _ in range(times):
        started = time.monotonic()
        network = netns.Network.create(netns.new_id(), members)
        made.append(time.monotonic() - started)
        started = time.monotonic()
        network.destroy()
        removed.append(time.monotonic() - started)
    return made, removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2000, help="round trips per trial")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--members", type=int, default=3, help="namespaces in the setup timing")
    parser.add_argument("--client", nargs=3, metavar=("HOST", "PORT", "ROUNDS"), help="internal")
    parser.add_argument("--cpu", type=int, help="internal: the client's CPU")
    args = parser.parse_args()
    if args.client:
        host, port, rounds = args.client
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        print(json.dumps(client(host, int(port), int(rounds))))
        return
    why = netns.unavailable_because()
    if why is not None:
        sys.exit(f"netns_rtt: network namespaces cannot be made here: {why}")
    load = os.getloadavg()[0]

    cpus = sorted(os.sched_getaffinity(0))
    placements: dict[str, tuple[int, int | None]] = {"same CPU": (PORT, cpus[0])}
    if len(cpus) > 1:
        placements["2 CPUs"] = (PORT, cpus[1])
    placements["unpinned"] = (PORT + 1, None)

    with (
        tempfile.TemporaryDirectory(prefix="gaia-netns-rtt-") as logs,
        netns.Network.create(netns.new_id(), 2) as network,
        ProcessGroup(Path(logs)) as group,
    ):
        member0 = network.address(0)
        for port, on in ((PORT, str(cpus[0])), (PORT + 1, "-")):
            here = (sys.executable, "-c", SERVER, "127.0.0.1", str(port), on)
            group.launch(ProcessSpec(f"loopback-{port}", here))
            there = (sys.executable, "-c", SERVER, member0, str(port), on)
            group.launch(ProcessSpec(f"member0-{port}", network.exec_argv(0, there)))
        paths = {
            LOOPBACK: ((), "127.0.0.1"),
            "root->member": ((), member0),
            "member->member": (network.exec_argv(1, []), member0),
        }
        configs = [(path, placement) for placement in placements for path in paths]
        medians: dict[tuple[str, str], list[float]] = {config: [] for config in configs}
        tails: dict[tuple[str, str], list[float]] = {config: [] for config in configs}
        for _ in range(args.trials):
            for path, placement in configs:
                prefix, host = paths[path]
                port, cpu = placements[placement]
                samples = run_client(prefix, host, port, args.rounds, cpu)
                medians[path, placement].append(statistics.median(samples))
                tails[path, placement].append(statistics.quantiles(samples, n=100)[98])
    made, removed = network_setup_seconds(args.members, 5)

    table = Table(
        title=f"TCP round trip, 64 B, µs: {args.trials} trials x {args.rounds} round trips",
        caption=f"load average {load:.1f} at the start; {os.cpu_count()} cores",
    )
    for column in ("path", "placement", "median", "95% CI", "p99", "vs loopback"):
        table.add_column(column, justify="left" if column in ("path", "placement") else "right")
    for path, placement in configs:
        estimate = median_ci(medians[path, placement])
        base = statistics.median(medians[LOOPBACK, placement])
        table.add_row(
            path,
            placement,
            f"{estimate.median:.1f}",
            f"{estimate.low:.1f}-{estimate.high:.1f}",
            f"{statistics.median(tails[path, placement]):.1f}",
            f"{estimate.median / base:.2f}x",
            end_section=path == "member->member",
        )
    console = Console()
    console.print(table)
    console.print(
        f"bridge + {args.members} namespaces: created in {statistics.median(made) * 1e3:.0f} ms,"
        f" removed in {statistics.median(removed) * 1e3:.0f} ms (median of {len(made)})"
    )


if __name__ == "__main__":
    main()
