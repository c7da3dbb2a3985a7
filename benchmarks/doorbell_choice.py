"""Why the shm transport's doorbell is a named FIFO: ping-pong two processes through each
candidate alone (no shared memory), each side blocking in poll() until rung.

    .venv/bin/python benchmarks/doorbell_choice.py [--rounds N]

Candidates: a named FIFO, a Unix datagram socket bound to a path (both reachable by unrelated
processes through a file name), and an eventfd (fastest, but an unrelated process can only
obtain it through SCM_RIGHTS from a thread serving a socket; here it is simply inherited).
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

Ring = Callable[[], None]
Block = Callable[[], None]


def fifo(directory: Path, me: int) -> tuple[Ring, Block]:
    """My FIFO read-write (never EOF), the other's write-only."""
    mine, theirs = directory / f"fifo{me}", directory / f"fifo{1 - me}"
    os.mkfifo(mine)
    reader = os.open(mine, os.O_RDWR | os.O_NONBLOCK)
    while not theirs.exists():
        time.sleep(0.001)
    while True:
        try:
            writer = os.open(theirs, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # ENXIO until the other side opened its end for reading
            time.sleep(0.001)

    def ring() -> None:
        os.write(writer, b"\0")

    return ring, sleeper(reader, 4096)


def dgram(directory: Path, me: int) -> tuple[Ring, Block]:
    mine, theirs = directory / f"sock{me}", directory / f"sock{1 - me}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(mine))
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    while True:
        try:
            sender.connect(str(theirs))
            break
        except OSError:
            time.sleep(0.001)

    def ring() -> None:
        sender.send(b"\0")

    return ring, sleeper(receiver, 16)


def sleeper(source: int | socket.socket, drain: int) -> Block:
    """Block until rung, then consume the ring (the closure keeps `source` open)."""
    poller = select.poll()
    poller.register(source, select.POLLIN)

    def block() -> None:
        poller.poll()
        if isinstance(source, socket.socket):
            source.recv(drain)
        else:
            os.read(source, drain)

    return block


def eventfds(me: int, fds: tuple[int, int]) -> tuple[Ring, Block]:
    theirs = fds[1 - me]
    return (lambda: os.eventfd_write(theirs, 1)), sleeper(fds[me], 8)


def ping_pong(ring: Ring, block: Block, first: bool, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        if first:
            ring()
            block()
        else:
            block()
            ring()
        times.append((time.perf_counter_ns() - started) / 1e3)
    return times


def run(kind: str, rounds: int) -> list[float]:
    """Fork: the child answers, the parent times the round trips."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        fds = (os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK))
        child = os.fork()
        me = 0 if child else 1
        if kind == "fifo":
            ring, block = fifo(Path(tmp), me)
        elif kind == "dgram":
            ring, block = dgram(Path(tmp), me)
        else:
            ring, block = eventfds(me, fds)
        times = ping_pong(ring, block, first=bool(child), rounds=rounds)
        if not child:
            os._exit(0)
        os.waitpid(child, 0)
        return times[rounds // 10 :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20000)
    rounds = parser.parse_args().rounds
    table = Table(title="doorbell ping-pong, µs", caption=f"load average {os.getloadavg()[0]:.1f}")
    for column in ("doorbell", "median", "p99"):
        table.add_column(column, justify="left" if column == "doorbell" else "right")
    for kind in ("fifo", "dgram", "eventfd"):
        times = run(kind, rounds)
        p99 = statistics.quantiles(times, n=100)[98]
        table.add_row(kind, f"{statistics.median(times):.1f}", f"{p99:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
