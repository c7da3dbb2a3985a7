"""TCP specifics: authentication, frame checks, and a replica that survives a bad peer."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import pytest

from gaia.transport import ClusterSpec, TcpTransport
from gaia.transport.control import (
    FrameError,
    HandshakeError,
    Identity,
    Session,
    accept_handshake,
    dial_handshake,
)

from . import peers
from .peers import REGION, stop, wait_for, word

KEY = os.urandom(32)
CLUSTER = ClusterSpec("unit", {0: ("127.0.0.1", 1), 1: ("127.0.0.1", 2)}, key=KEY)


def handshake(dialer: Identity, acceptor: Identity) -> tuple[list[Session], Session]:
    """Run both halves of a handshake over a socketpair; the acceptor's errors propagate, the
    dialer's session (if it got one) is in the returned list."""
    dialed: list[Session] = []

    def dial(sock: socket.socket) -> None:
        with contextlib.suppress(ConnectionError):  # the acceptor refused us
            dialed.append(dial_handshake(sock, dialer, acceptor.me))

    left, right = socket.socketpair()
    with left, right:
        left.settimeout(5)
        right.settimeout(5)
        thread = threading.Thread(target=dial, args=(left,))
        thread.start()
        try:
            return dialed, accept_handshake(right, acceptor)
        finally:
            right.shutdown(socket.SHUT_RDWR)
            thread.join(5)


def sessions(mac: str = "blake2b") -> tuple[Session, Session]:
    """Both ends of a good connection from replica 0 to replica 1."""
    dialed, acceptor = handshake(
        Identity.of(0, CLUSTER, REGION, mac), Identity.of(1, CLUSTER, REGION, mac)
    )
    return dialed[0], acceptor


@pytest.mark.parametrize(
    ("dialer", "reason"),
    [
        (
            Identity.of(0, dataclasses.replace(CLUSTER, key=os.urandom(32)), REGION, "blake2b"),
            "tag",
        ),
        (
            Identity.of(0, dataclasses.replace(CLUSTER, cluster_id="x"), REGION, "blake2b"),
            "cluster",
        ),
        (Identity.of(0, CLUSTER, 2 * REGION, "blake2b"), "region"),
        (Identity.of(0, CLUSTER, REGION, "hmac-sha256"), "MAC"),
        (Identity.of(0, CLUSTER, REGION, "blake2b", protocol="rdma"), "protocol"),
    ],
    ids=["key", "cluster", "region", "mac", "protocol"],
)
def test_handshakes_from_strangers_are_refused(dialer: Identity, reason: str) -> None:
    with pytest.raises(HandshakeError, match=reason):
        handshake(dialer, Identity.of(1, CLUSTER, REGION, "blake2b"))


def test_only_the_lower_id_dials() -> None:
    with pytest.raises(HandshakeError, match="must wait for my call"):
        handshake(
            Identity.of(1, CLUSTER, REGION, "blake2b"), Identity.of(0, CLUSTER, REGION, "blake2b")
        )


@pytest.mark.parametrize("mac", ["blake2b", "hmac-sha256"])
def test_frames_round_trip_in_order(mac: str) -> None:
    dialer, acceptor = sessions(mac)
    first = dialer.seal(16, b"hello")
    stream = memoryview(first + dialer.seal(0, b"x" * 100))
    assert acceptor.open(stream, 0, REGION) == (16, 5)
    assert acceptor.open(stream, len(first), REGION) == (0, 100)


def test_a_frame_is_checked_before_and_after_its_body_arrives() -> None:
    dialer, acceptor = sessions()
    frame = dialer.seal(8, b"payload!")
    assert acceptor.open(memoryview(frame[:11]), 0, REGION) is None
    assert acceptor.open(memoryview(frame[:-1]), 0, REGION) is None
    tampered = bytearray(frame)
    tampered[14] ^= 1
    with pytest.raises(FrameError, match="bad tag"):
        acceptor.open(memoryview(tampered), 0, REGION)


@pytest.mark.parametrize(
    ("offset", "length"), [(0, 0), (REGION - 4, 8), (0, REGION + 1), (2**63, 8)]
)
def test_out_of_bounds_headers_are_rejected_without_waiting_for_a_body(
    offset: int, length: int
) -> None:
    _, acceptor = sessions()
    header = offset.to_bytes(8, "little") + length.to_bytes(4, "little")
    with pytest.raises(FrameError, match="outside region"):
        acceptor.open(memoryview(header), 0, REGION)


def test_replayed_reflected_and_cross_session_frames_are_rejected() -> None:
    dialer, acceptor = sessions()
    frame = memoryview(dialer.seal(0, b"once"))
    assert acceptor.open(frame, 0, REGION) == (0, 4)
    with pytest.raises(FrameError):
        acceptor.open(frame, 0, REGION)  # replayed: the sequence number moved on
    _, fresh = sessions()
    with pytest.raises(FrameError):
        fresh.open(frame, 0, REGION)  # from another connection: other keys
    with pytest.raises(FrameError):
        dialer.open(memoryview(dialer.seal(0, b"back")), 0, REGION)  # reflected to its sender


def test_a_short_cluster_key_is_refused() -> None:
    with pytest.raises(ValueError, match="key"):
        TcpTransport(0, REGION, dataclasses.replace(CLUSTER, key=b"short"))


def connect_as(identity: Identity, address: tuple[str, int]) -> tuple[socket.socket, Session]:
    sock = socket.create_connection(address, timeout=5)
    return sock, dial_handshake(sock, identity, 2)


def closed_by_peer(t: TcpTransport, sock: socket.socket) -> bool:
    """Drive `t` until it closes `sock`'s connection (EOF or reset); False after 5 s."""
    sock.settimeout(0.01)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        t.wait(0.01)
        try:
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bad_peers_are_rejected_while_the_good_one_is_served(
    make_cluster: Callable[[int], ClusterSpec],
    spawn: Callable[..., BaseProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Replica 2 runs here, replica 1 ticks a counter into it from another process, and this
    test plays replica 0: wrong key, forged tag, out-of-bounds frame, then a good frame."""
    caplog.set_level(logging.WARNING, logger="gaia.transport")
    cluster = make_cluster(3)
    address = cluster.members[2]
    with TcpTransport(2, REGION, cluster) as t:
        good = spawn(peers.tick, "tcp", 1, cluster, 2)
        wait_for(t, lambda: word(t, 8) > 0)

        stranger = dataclasses.replace(cluster, key=os.urandom(32))
        impostor = Identity.of(0, stranger, REGION, "blake2b")
        with pytest.raises(ConnectionError, match="closed during the handshake"):
            connect_as(impostor, address)
        wait_for(t, lambda: t.stats.rejected == 1)
        assert "bad hello tag" in caplog.text

        me = Identity.of(0, cluster, REGION, "blake2b")
        sock, session = connect_as(me, address)
        with sock:
            forged = bytearray(session.seal(100, b"f" * 16))
            forged[-1] ^= 1
            sock.sendall(forged)
            assert closed_by_peer(t, sock)
        assert "bad tag on frame 0" in caplog.text

        sock, session = connect_as(me, address)
        with sock:
            sock.sendall(session.seal(REGION - 8, b"o" * 16))
            assert closed_by_peer(t, sock)
        assert "outside region" in caplog.text
        assert t.stats.rejected == 3
        assert bytes(t.region[100:116]) == bytes(16)

        ticks = word(t, 8)
        sock, session = connect_as(me, address)
        with sock:
            sock.sendall(session.seal(200, b"g" * 16))
            wait_for(t, lambda: bytes(t.region[200:216]) == b"g" * 16)
        wait_for(t, lambda: word(t, 8) > ticks + 10)
        assert good.is_alive()
        stop(t, good, 1)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_stopped_peer_never_blocks_the_writer_and_fails_after_write_timeout(
    make_cluster: Callable[[int], ClusterSpec], spawn: Callable[..., BaseProcess]
) -> None:
    """A SIGSTOPped peer reads nothing: once the socket buffers are full, what the kernel does
    not take waits in the backlog, and no write waits for it (a leader blocked there would stop
    heartbeating its healthy peers). After `write_timeout` without progress the peer is failed
    and later writes are dropped at once; after SIGCONT the connection is made again."""
    timeout = 1.0
    cluster = make_cluster(2)
    with TcpTransport(0, REGION, cluster, write_timeout=timeout) as t:
        process = spawn(peers.announce, "tcp", 1, cluster, 1)
        t.connect(30)
        wait_for(t, lambda: word(t, 16) == 1)
        os.kill(process.pid or 0, signal.SIGSTOP)
        try:
            slowest = 0.0
            first_kept: float | None = None
            deadline = time.monotonic() + 30
            while 1 not in t.failed_peers:
                assert time.monotonic() < deadline, "buffers never filled?"
                started = time.monotonic()
                t.write(1, 4096, os.urandom(4096))
                slowest = max(slowest, time.monotonic() - started)
                if first_kept is None and t.backlog(1):
                    first_kept = time.monotonic()
                time.sleep(0.001)
            failed_after = time.monotonic() - (first_kept or 0.0)
            assert slowest < timeout / 2, f"a write blocked for {slowest:.3f} s"
            assert timeout <= failed_after < timeout + 3.0  # (the kernel may still take a little)
            started = time.monotonic()
            t.write(1, 4096, b"dropped")
            assert time.monotonic() - started < 0.1
        finally:
            os.kill(process.pid or 0, signal.SIGCONT)
        t.connect(30)
        stop(t, process, 1)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_backlog_is_sent_in_order_once_the_peer_reads_again(
    make_cluster: Callable[[int], ClusterSpec],
) -> None:
    """Writes to a peer that reads nothing for a while pile up in the backlog; once it reads
    again, they arrive in the order written (the last write to an offset wins), and `wait`
    on the writer's side is what sends them on."""
    cluster = make_cluster(2)
    with (
        TcpTransport(0, REGION, cluster, write_timeout=30.0) as a,
        TcpTransport(1, REGION, cluster) as b,
    ):
        a.connect(10)
        b.connect(10)
        chunk, writes = 4096, 2048
        for k in range(writes):  # 8 MiB: more than the socket buffers of both ends hold
            a.write(1, 0, struct.pack("<Q", k) * (chunk // 8))
        assert a.backlog(1), "the kernel took 8 MiB at once: nothing to test"
        assert a.failed_peers == frozenset()
        deadline = time.monotonic() + 30
        while word(b, 0) != writes - 1 or a.backlog(1):
            assert time.monotonic() < deadline, "the backlog never drained"
            a.wait(0.001)
            b.wait(0.001)
        assert bytes(b.region[:chunk]) == struct.pack("<Q", writes - 1) * (chunk // 8)
        assert a.failed_peers == frozenset()
