"""RDMA transport logic that needs no device: GID choice, link details, send bookkeeping."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
import socket
import threading
from pathlib import Path

import pytest

from gaia.transport import ClusterSpec, TransportUnavailable
from gaia.transport import rdma as rdma_module
from gaia.transport.base import SEAL_BYTES
from gaia.transport.control import (
    FrameError,
    Identity,
    Session,
    accept_handshake,
    dial_handshake,
    recv_message,
    send_message,
)
from gaia.transport.rdma import LinkInfo, SendWindow, choose_gid, pieces

CLUSTER = ClusterSpec("unit", {0: ("127.0.0.1", 1), 1: ("127.0.0.1", 2)}, key=os.urandom(32))


def fake_port(
    tmp_path: Path, gids: dict[int, tuple[str | None, str]], link_layer: str = "Ethernet"
) -> Path:
    """A sysfs port directory: index -> (GID text, or None for an entry that cannot be read,
    as the kernel's EINVAL; gid_attrs type)."""
    port = tmp_path / "rxe0" / "ports" / "1"
    (port / "gids").mkdir(parents=True)
    (port / "gid_attrs" / "types").mkdir(parents=True)
    (port / "link_layer").write_text(f"{link_layer}\n")
    for index, (gid, kind) in gids.items():
        if gid is None:
            (port / "gids" / str(index)).mkdir()  # reading it fails, like an unused entry
        else:
            (port / "gids" / str(index)).write_text(ipaddress.IPv6Address(gid).exploded + "\n")
        (port / "gid_attrs" / "types" / str(index)).write_text(f"{kind}\n")
    return port


RXE = {
    0: ("fe80::a45a:12ff:feb5:a65a", "RoCE v2"),
    1: ("::ffff:10.99.0.1", "RoCE v2"),
    2: (None, ""),
    3: ("::", "RoCE v2"),
}
CONNECTX = {
    0: ("fe80::1", "IB/RoCE v1"),
    1: ("fe80::1", "RoCE v2"),
    2: ("::ffff:192.168.1.5", "IB/RoCE v1"),
    3: ("::ffff:192.168.1.5", "RoCE v2"),
}
IPV6_ONLY = {0: ("fe80::1", "RoCE v2"), 1: ("2001:db8::5", "RoCE v2")}


@pytest.mark.parametrize(
    ("table", "expected"), [(RXE, 1), (CONNECTX, 3), (IPV6_ONLY, 1)], ids=["rxe", "cx", "ipv6"]
)
def test_auto_picks_a_roce_v2_gid_with_an_ip_address(
    tmp_path: Path, table: dict[int, tuple[str | None, str]], expected: int
) -> None:
    gid = choose_gid(fake_port(tmp_path, table))
    assert gid.index == expected
    assert gid.kind == "RoCE v2"
    assert gid.text == ipaddress.IPv6Address(table[expected][0] or "").exploded


def test_unreadable_and_zero_entries_are_skipped(tmp_path: Path) -> None:
    gids = rdma_module.read_gids(fake_port(tmp_path, RXE))
    assert [g.index for g in gids] == [0, 1]


def test_infiniband_uses_the_port_gid(tmp_path: Path) -> None:
    port = fake_port(tmp_path, {0: ("fe80::2", "IB/RoCE v1")}, link_layer="InfiniBand")
    assert choose_gid(port).index == 0


def test_an_explicit_index_is_used_or_refused_with_the_table(tmp_path: Path) -> None:
    port = fake_port(tmp_path, RXE)
    assert choose_gid(port, 0).kind == "RoCE v2"
    with pytest.raises(TransportUnavailable, match=r"GID index 2 .* empty .*1: ::ffff:a63:1"):
        choose_gid(port, 2)


def test_no_usable_gid_says_what_there_is(tmp_path: Path) -> None:
    port = fake_port(tmp_path, {0: ("fe80::1", "RoCE v2"), 1: ("::ffff:10.0.0.1", "IB/RoCE v1")})
    with pytest.raises(TransportUnavailable, match=r"no RoCE v2 GID .*gid_index.*IB/RoCE v1"):
        choose_gid(port)


INFO = LinkInfo(
    qpn=17, psn=0xABCDEF, lid=0, mtu=3, gid=ipaddress.IPv6Address("::ffff:10.99.0.1").packed,
    rkey=0x1234, addr=0x7F00_0000_1000, count=42,
)  # fmt: skip


def test_link_info_round_trips_and_rejects_nonsense() -> None:
    assert LinkInfo.unpack(INFO.pack()) == INFO
    with pytest.raises(FrameError, match="bytes"):
        LinkInfo.unpack(INFO.pack()[:-1])
    for bad in (dataclasses.replace(INFO, mtu=9), dataclasses.replace(INFO, psn=1 << 24)):
        with pytest.raises(FrameError, match="implausible"):
            LinkInfo.unpack(bad.pack())


def connected_sessions() -> tuple[socket.socket, Session, socket.socket, Session]:
    """Both ends of an authenticated rdma control connection over a socketpair."""
    left, right = socket.socketpair()
    left.settimeout(5)
    right.settimeout(5)
    dialer: list[Session] = []
    thread = threading.Thread(
        target=lambda: dialer.append(
            dial_handshake(left, Identity.of(0, CLUSTER, 4096, "blake2b", "rdma"), 1)
        )
    )
    thread.start()
    acceptor = accept_handshake(right, Identity.of(1, CLUSTER, 4096, "blake2b", "rdma"))
    thread.join(5)
    return left, dialer[0], right, acceptor


def test_link_info_travels_authenticated() -> None:
    left, dialer, right, acceptor = connected_sessions()
    with left, right:
        send_message(left, dialer, INFO.pack())
        assert LinkInfo.unpack(recv_message(right, acceptor, LinkInfo.SIZE)) == INFO

        frame = bytearray(dialer.seal(0, INFO.pack()))
        frame[20] ^= 1
        left.sendall(frame)
        with pytest.raises(FrameError, match="bad tag"):
            recv_message(right, acceptor, LinkInfo.SIZE)


def test_a_control_message_of_another_size_is_refused() -> None:
    left, dialer, right, acceptor = connected_sessions()
    with left, right:
        send_message(left, dialer, b"x" * (LinkInfo.SIZE + 1))
        with pytest.raises(FrameError):
            recv_message(right, acceptor, LinkInfo.SIZE)


@pytest.mark.parametrize(("size", "chunk"), [(1, 64), (8, 64), (9, 64), (100, 16), (72, 64)])
def test_pieces_cover_the_write_with_the_seal_last_and_alone(size: int, chunk: int) -> None:
    parts = pieces(size, chunk)
    assert [start for start, _ in parts] == sorted(start for start, _ in parts)
    assert sum(length for _, length in parts) == size
    assert all(0 < length <= chunk for _, length in parts)
    if size > SEAL_BYTES:
        assert parts[-1] == (size - SEAL_BYTES, SEAL_BYTES)


def test_every_nth_wr_is_signalled_and_a_completion_retires_all_before_it() -> None:
    window = SendWindow(depth=64, ring=4096, every=4)
    claims = [window.claim(8) for _ in range(9)]
    assert [c.signal for c in claims if c] == [False, False, False, True] * 2 + [False]
    window.completed(4)
    assert (window.retired, window.tail, window.in_flight) == (4, 32, 5)
    window.completed(8)
    assert (window.retired, window.in_flight) == (8, 1)
    assert not window.waiting_for_completion


def test_the_wr_that_fills_the_queue_is_signalled() -> None:
    window = SendWindow(depth=4, ring=4096, every=3)
    claims = [window.claim(8) for _ in range(4)]
    assert [c.signal for c in claims if c] == [False, False, True, True]
    assert window.claim(8) is None
    window.completed(3)
    assert window.in_flight == 1
    assert window.claim(8) is not None


def test_claims_beyond_a_quarter_of_the_ring_are_refused() -> None:
    window = SendWindow(depth=4, ring=1024, every=2)
    with pytest.raises(ValueError, match=r"1\.\.256"):
        window.claim(257)
    with pytest.raises(ValueError, match="bad window"):
        SendWindow(depth=4, ring=1024, every=5)


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_never_overlaps_in_flight_bytes_and_never_deadlocks(seed: int) -> None:
    """Claims of random sizes, completions at random moments (in order, as RC delivers them):
    staging bytes of WRs in flight never overlap, and a refused claim always has a signalled
    WR in flight whose completion will make room."""
    rng = random.Random(seed)
    ring = rng.choice([256, 1000, 4096])
    depth = rng.randint(1, 32)
    window = SendWindow(depth=depth, ring=ring, every=rng.randint(1, min(depth, 8)))
    in_flight: list[tuple[int, int, int, bool]] = []  # wr id, offset, size, signalled
    for _ in range(3000):
        if in_flight and rng.random() < 0.3:
            signalled = [wr for wr, _, _, signal in in_flight if signal]
            if signalled:
                done = rng.choice(signalled)
                window.completed(done)
                in_flight = [w for w in in_flight if w[0] > done]
            continue
        size = rng.randint(1, window.max_claim)
        claim = window.claim(size)
        if claim is None:
            assert window.waiting_for_completion, "full window without a signalled WR"
            continue
        assert claim.offset + size <= ring
        for _, offset, length, _ in in_flight:
            assert claim.offset + size <= offset or offset + length <= claim.offset
        in_flight.append((claim.wr_id, claim.offset, size, claim.signal))
        assert window.in_flight == len(in_flight) <= window.depth


def test_missing_pyverbs_is_reported_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent() -> None:
        raise ImportError("No module named 'pyverbs'")

    monkeypatch.setattr(rdma_module, "_pyverbs_modules", absent)
    with pytest.raises(TransportUnavailable, match=r"pyverbs is not importable.*python3-pyverbs"):
        rdma_module.load_pyverbs()
