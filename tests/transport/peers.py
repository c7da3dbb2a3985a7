"""Peer replicas for the transport tests (each runs in its own spawned process), and the
helpers a test uses to drive them.

Convention: a peer ends when the test writes `STOP` at `STOP_OFFSET` of its region, so it stays
up (reading, acknowledging) until the test has checked what it needed.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

from gaia.softroce.lane import in_lane
from gaia.transport import ClusterSpec, Transport, make_transport

U64 = struct.Struct("<Q")
STOP_OFFSET = 0
STOP = 2**64 - 1
REGION = 8192
RECORD = 1024  # torn-write test: 127 body words and a trailing seal word, all holding k
START = 60.0 if in_lane() else 10.0
"""Seconds a freshly spawned peer gets to come up and connect: its interpreter imports gaia and
pyverbs, which in the Soft-RoCE lane's emulated guest on a busy host took more than 10 s."""
SETTLE = 120.0 if in_lane() else 30.0
"""Seconds for the rest a test or a peer waits on (the other side's writes, STOP, an exit)."""


def word(t: Transport, offset: int) -> int:
    value: int = U64.unpack_from(t.region, offset)[0]
    return value


def wait_for(t: Transport, done: Callable[[], bool], timeout: float = SETTLE) -> None:
    """Drive `t.wait` until `done()`; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "condition not reached in time"
        t.wait(0.05)


def stop(t: Transport, process: BaseProcess, peer: int) -> None:
    """Tell a peer process to finish (repeating: writes may be dropped while it reconnects)
    and check that it exited cleanly."""
    deadline = time.monotonic() + SETTLE
    while process.is_alive() and time.monotonic() < deadline:
        t.write(peer, STOP_OFFSET, U64.pack(STOP))
        process.join(0.05)
    assert process.exitcode == 0


def jitter(k: int) -> None:
    """Vary the time between a wake-up and the next write, so writes land at every point of
    the reader's spin/sleep transition."""
    match k % 4:
        case 1:
            os.sched_yield()
        case 2:
            end = time.perf_counter() + 20e-6
            while time.perf_counter() < end:
                pass
        case 3:
            time.sleep(0.0002)


def serve_until_stop(t: Transport, timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while word(t, STOP_OFFSET) != STOP:
        if time.monotonic() > deadline:
            raise TimeoutError(f"replica {t.me}: no STOP within {timeout} s")
        t.wait(0.2)


def write_patterns(
    kind: str, me: int, cluster: ClusterSpec, writes: list[tuple[int, int, bytes]], done: int
) -> None:
    """Make `writes` (peer, offset, data), then set word `done` of replica 0 to 1."""
    with make_transport(kind, me, REGION, cluster) as t:
        t.connect(START)
        for peer, offset, data in writes:
            t.write(peer, offset, data)
        t.write(0, done, U64.pack(1))
        serve_until_stop(t)


def echo(kind: str, me: int, cluster: ClusterSpec, rounds: int, options: dict[str, Any]) -> None:
    """Each time word 8 of my region holds a new k, write k into word 8 * (me + 1) of replica 0."""
    with make_transport(kind, me, REGION, cluster, **options) as t:
        t.connect(START)
        last = 0
        while last < rounds:
            if not t.wait(10):
                raise TimeoutError(f"echo {me}: nothing after round {last}")
            k = word(t, 8)
            if k != last:
                jitter(k)
                t.write(0, 8 * (me + 1), U64.pack(k))
                last = k
        serve_until_stop(t)


def write_records(kind: str, me: int, cluster: ClusterSpec, count: int, offset: int) -> None:
    """Overwrite one record in replica 0 `count` times as fast as possible, k = 1..count."""
    with make_transport(kind, me, REGION, cluster) as t:
        t.connect(START)
        for k in range(1, count + 1):
            t.write(0, offset, struct.pack(f"<{RECORD // 8}Q", *[k] * (RECORD // 8)))
        serve_until_stop(t)


def announce(kind: str, me: int, cluster: ClusterSpec, generation: int) -> None:
    """Write my generation into word 8 * (me + 1) of replica 0 (repeating until it gets
    through, as a restarted replica's first writes may race its peers' reconnection)."""
    with make_transport(kind, me, REGION, cluster) as t:
        t.connect(START)
        while word(t, STOP_OFFSET) != STOP:
            t.write(0, 8 * (me + 1), U64.pack(generation))
            t.wait(0.05)


def tick(kind: str, me: int, cluster: ClusterSpec, target: int) -> None:
    """Write an increasing counter into word 8 of `target` every millisecond, without waiting
    for the other members (some of them are played by the test over raw sockets)."""
    with make_transport(kind, me, REGION, cluster) as t:
        k = 0
        while word(t, STOP_OFFSET) != STOP:
            k += 1
            t.write(target, 8, U64.pack(k))
            t.wait(0.001)
