"""Behaviour every transport shares, checked on shm, tcp and (with a device) rdma alike."""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess

import pytest

from gaia.transport import ClusterSpec, PeersUnreachable, Transport, make_transport

from . import peers
from .peers import REGION, U64, stop, wait_for, word
from .rdma_env import needs_rdma

KINDS = ["shm", "tcp", pytest.param("rdma", marks=needs_rdma)]

Spawn = Callable[..., BaseProcess]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    param: str = request.param
    return param


@pytest.fixture
def pair(kind: str, make_cluster: Callable[[int], ClusterSpec]) -> Iterator[list[Transport]]:
    """Two connected replicas in this process (tcp's connection threads do the handshakes)."""
    cluster = make_cluster(2)
    ends = [make_transport(kind, i, REGION, cluster) for i in (0, 1)]
    try:
        for end in ends:
            end.connect(5)
        yield ends
    finally:
        for end in ends:
            end.close()


def test_wait_reports_each_change_once(pair: list[Transport]) -> None:
    a, b = pair
    assert not b.wait(0.05)
    a.write(1, 64, b"x" * 20)
    assert b.wait(5)
    assert bytes(b.region[64:84]) == b"x" * 20
    assert not b.wait(0.05)
    assert b.stats.wakeups == 1
    assert a.stats.writes == 1
    assert a.stats.bytes_written == 20


def test_cut_drops_writes_until_heal(pair: list[Transport]) -> None:
    a, b = pair
    a.cut(1)
    a.write(1, 0, U64.pack(7))
    assert not b.wait(0.1)
    assert a.stats.dropped_cut == 1
    assert word(b, 0) == 0
    a.heal(1)
    a.write(1, 0, U64.pack(8))
    assert b.wait(5)
    assert word(b, 0) == 8
    assert a.failed_peers == frozenset()


def test_caller_bugs_raise(pair: list[Transport]) -> None:
    a, _ = pair
    for peer, offset, data in [(0, 0, b"x"), (5, 0, b"x"), (1, REGION - 1, b"xy"), (1, -1, b"x")]:
        with pytest.raises(ValueError):
            a.write(peer, offset, data)
    with pytest.raises(ValueError):
        a.write(1, 0, b"")


def test_connect_times_out_naming_the_missing_peer(
    kind: str, make_cluster: Callable[[int], ClusterSpec]
) -> None:
    cluster = make_cluster(3)
    with make_transport(kind, 1, REGION, cluster) as t:
        started = time.monotonic()
        with pytest.raises(PeersUnreachable) as caught:
            t.connect(0.3)
        assert time.monotonic() - started < 2
        assert caught.value.missing == {0, 2}
        assert "0:" in str(caught.value) and "2:" in str(caught.value)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_writes_from_two_peers_land_at_their_offsets(
    kind: str, make_cluster: Callable[[int], ClusterSpec], spawn: Spawn
) -> None:
    cluster = make_cluster(3)
    patterns = {
        1: [(0, 100, b"\x01"), (0, 200, bytes(range(8))), (0, 300, os.urandom(9))],
        2: [(0, 1000, os.urandom(100)), (0, 4096, os.urandom(4096)), (1, 500, b"to one")],
    }
    with make_transport(kind, 0, REGION, cluster) as t:
        procs = {
            me: spawn(peers.write_patterns, kind, me, cluster, writes, 16 + 8 * me)
            for me, writes in patterns.items()
        }
        t.connect(peers.START)
        wait_for(t, lambda: word(t, 24) == 1 and word(t, 32) == 1)
        for writes in patterns.values():
            for peer, offset, data in writes:
                if peer == 0:
                    assert bytes(t.region[offset : offset + len(data)]) == data
        untouched = bytearray(t.region)
        for writes in patterns.values():
            for peer, offset, data in writes:
                if peer == 0:
                    untouched[offset : offset + len(data)] = bytes(len(data))
        untouched[24:40] = bytes(16)
        assert untouched == bytes(REGION), "bytes outside the written ranges changed"
        for me, process in procs.items():
            stop(t, process, me)


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("kind", "spin"),
    [
        pytest.param("shm", 0.0, id="shm"),
        pytest.param("shm", 20e-6, id="shm-spin"),
        pytest.param("tcp", 0.0, id="tcp"),
        pytest.param("rdma", 0.0, id="rdma", marks=needs_rdma),
    ],
)
def test_wait_never_misses_a_write(
    kind: str, spin: float, make_cluster: Callable[[int], ClusterSpec], spawn: Spawn
) -> None:
    """Ping-pong 1000 rounds with writes landing at every point of the reader's spin/sleep
    transition. Nobody else writes, so a missed wake-up stalls its round: the wait times out."""
    rounds = 1000
    options = {"spin": spin} if kind == "shm" else {}
    cluster = make_cluster(2)
    with make_transport(kind, 0, REGION, cluster, **options) as t:
        process = spawn(peers.echo, kind, 1, cluster, rounds, options)
        t.connect(peers.START)
        for k in range(1, rounds + 1):
            peers.jitter(k // 4)
            t.write(1, 8, U64.pack(k))
            while word(t, 16) != k:
                assert t.wait(5.0), f"round {k}: write not noticed within 5 s"
        stop(t, process, 1)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_sealed_record_is_never_seen_before_its_body(
    kind: str, make_cluster: Callable[[int], ClusterSpec], spawn: Spawn
) -> None:
    """A writer overwrites one record (every word = k, seal word last) as fast as it can while
    this reader checks it: once the seal says k, every body word is at least k; and the last
    record is always noticed."""
    count, offset = 3000, 2048
    words = peers.RECORD // 8
    cluster = make_cluster(2)
    with make_transport(kind, 0, REGION, cluster) as t:
        process = spawn(peers.write_records, kind, 1, cluster, count, offset)
        t.connect(peers.START)
        seen = 0
        while seen < count:
            assert t.wait(5), f"final record not noticed (last seen {seen})"
            seal = word(t, offset + peers.RECORD - 8)
            body = struct.unpack_from(f"<{words - 1}Q", t.region, offset)
            assert min(body) >= seal, f"seal {seal} visible over an older body"
            assert seal >= seen
            seen = seal
        stop(t, process, 1)


def test_a_failure_is_reported_before_it_shows_in_failed_peers(
    kind: str, make_cluster: Callable[[int], ClusterSpec]
) -> None:
    """Whoever finds a peer in failed_peers finds its report made (the lane once saw the peer
    there and no report yet); a write from the callback to that peer is the same failure."""
    seen: list[tuple[int, bool]] = []

    def report(peer: int, why: str) -> None:
        seen.append((peer, peer in t.failed_peers))
        t.write(peer, 0, b"x")

    with make_transport(kind, 0, REGION, make_cluster(2), on_peer_failure=report) as t:
        t.write(1, 0, b"x")  # peer 1 never came up
        assert seen == [(1, False)]
        assert t.failed_peers == frozenset({1})
        assert t.stats.dropped_failed == 2


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_dead_peer_fails_fast_and_a_restarted_one_is_reconnected(
    kind: str, make_cluster: Callable[[int], ClusterSpec], spawn: Spawn
) -> None:
    cluster = make_cluster(2)
    reports: list[tuple[int, str]] = []
    with make_transport(
        kind, 0, REGION, cluster, on_peer_failure=lambda p, why: reports.append((p, why))
    ) as t:
        first = spawn(peers.announce, kind, 1, cluster, 1)
        t.connect(peers.START)
        wait_for(t, lambda: word(t, 16) == 1)
        os.kill(first.pid or 0, signal.SIGKILL)
        first.join(5)

        deadline = time.monotonic() + 5
        slowest = 0.0
        while 1 not in t.failed_peers:
            assert time.monotonic() < deadline, "dead peer never reported"
            started = time.monotonic()
            t.write(1, 8, U64.pack(1))
            slowest = max(slowest, time.monotonic() - started)
            t.wait(0.002)
        for _ in range(100):
            started = time.monotonic()
            t.write(1, 8, U64.pack(1))
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.5, f"a write to a dead peer took {slowest:.3f} s"
        assert [p for p, _ in reports] == [1]

        second = spawn(peers.announce, kind, 1, cluster, 2)
        wait_for(t, lambda: word(t, 16) == 2)
        t.connect(peers.START)
        assert t.failed_peers == frozenset()
        stop(t, second, 1)
