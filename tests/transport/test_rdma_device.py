"""The rdma transport against a real verbs device (Soft-RoCE in the lane's guest): selection,
the send window under load, and clean failures for a bad rkey and a vanished queue pair.

The behaviour every transport shares (wake-ups, torn writes, dead and restarted peers, three
processes) is checked on rdma too, by test_transport.py."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gaia.transport import ClusterSpec, RdmaTransport, TransportUnavailable
from gaia.transport.rdma import DEFAULT_SYSFS, LinkInfo, choose_gid

from .peers import REGION, U64, wait_for, word
from .rdma_env import needs_rdma

pytestmark = [needs_rdma, pytest.mark.integration, pytest.mark.timeout(120)]

Reports = list[tuple[int, str]]


@pytest.fixture
def pair(make_cluster: Callable[[int], ClusterSpec]) -> Iterator[list[RdmaTransport]]:
    cluster = make_cluster(2)
    ends = [RdmaTransport(i, REGION, cluster) for i in (0, 1)]
    try:
        for end in ends:
            end.connect(10)
        yield ends
    finally:
        for end in ends:
            end.close()


def test_the_port_and_gid_are_chosen_from_the_device(pair: list[RdmaTransport]) -> None:
    a, _ = pair
    port_dir = DEFAULT_SYSFS / a.device / "ports" / str(a.port)
    assert a.gid == choose_gid(port_dir)
    mtu = {"256": 1, "512": 2, "1024": 3, "2048": 4, "4096": 5}
    if a.device.startswith("rxe"):  # Soft-RoCE on an IPv4 netdev: the lane's guest
        assert a.gid.index == 1
        assert a.gid.address.ipv4_mapped is not None
        assert a.mtu == mtu["1024"], "rxe on a dummy device (MTU 1500) is active at 1024"


def test_a_port_that_does_not_exist_is_refused(
    make_cluster: Callable[[int], ClusterSpec],
) -> None:
    with pytest.raises(TransportUnavailable, match=r"RDMA port .*:7"):
        RdmaTransport(0, REGION, make_cluster(2), port=7)


def test_writes_larger_than_the_staging_ring_and_more_than_the_queue_arrive(
    pair: list[RdmaTransport],
) -> None:
    """A write of several ring chunks, then many more writes than the send queue holds: the
    window must recycle staging bytes and queue slots as completions come back."""
    a, b = pair
    big = os.urandom(REGION - 64)
    a.close()  # replica 0 comes back with a tiny send side
    with RdmaTransport(
        0, REGION, a.cluster, staging_bytes=1024, queue_depth=8, signal_every=4
    ) as small:
        small.connect(10)
        small.write(1, 64, big)
        wait_for(b, lambda: bytes(b.region[64:]) == big)
        for k in range(1, 501):
            small.write(1, 0, U64.pack(k))
        wait_for(b, lambda: word(b, 0) == 500)
        assert small.failed_peers == frozenset()
        assert small.stats.writes == 501


class _BadRkey(RdmaTransport):
    """A peer that advertises a wrong rkey for its region (a bug, or a stale registration)."""

    def _link_info(self, qp: Any, peer: int) -> LinkInfo:
        info = super()._link_info(qp, peer)
        return dataclasses.replace(info, rkey=info.rkey ^ 0x5A5A)


def test_a_wrong_rkey_fails_the_peer_cleanly(make_cluster: Callable[[int], ClusterSpec]) -> None:
    cluster = make_cluster(2)
    reports: Reports = []
    with (
        RdmaTransport(0, REGION, cluster, on_peer_failure=lambda p, w: reports.append((p, w))) as a,
        _BadRkey(1, REGION, cluster) as b,
    ):
        a.connect(10)
        b.connect(10)
        a.write(1, 0, U64.pack(1))
        wait_for(a, lambda: 1 in a.failed_peers, timeout=10)
        assert reports and reports[0][0] == 1
        assert "IBV_WC_REM_ACCESS_ERR" in reports[0][1]
        assert word(b, 0) == 0, "nothing may land through a wrong rkey"
        started = time.monotonic()
        a.write(1, 0, U64.pack(2))
        assert time.monotonic() - started < 0.1
        assert a.stats.dropped_failed == 1
        wait_for(b, lambda: 0 in b.failed_peers, timeout=10)  # a closed the control link


def test_a_vanished_queue_pair_fails_with_retry_exceeded(
    make_cluster: Callable[[int], ClusterSpec],
) -> None:
    """The peer's queue pair disappears while its control connection stays up (as when a
    machine dies without closing anything): the RC retries run out and the write completes
    with IBV_WC_RETRY_EXC_ERR, within the configured ack timeout and retries."""
    cluster = make_cluster(2)
    reports: Reports = []
    with (
        RdmaTransport(
            0, REGION, cluster, qp_timeout=10, retry_count=2,
            on_peer_failure=lambda p, w: reports.append((p, w)),
        ) as a,
        RdmaTransport(1, REGION, cluster) as b,
    ):  # fmt: skip
        a.connect(10)
        b.connect(10)
        a.write(1, 0, U64.pack(1))
        wait_for(b, lambda: word(b, 0) == 1)
        link = b._links.links[0]
        link.qp.close()  # white box: the only way to lose a QP but keep its process here
        started = time.monotonic()
        a.write(1, 0, U64.pack(2))
        # The report, not failed_peers: b's process and control link are still up, so a redials
        # it at once and 1 can leave failed_peers again before this thread looks.
        wait_for(a, lambda: bool(reports), timeout=20)
        assert time.monotonic() - started < 10
        assert reports[0][0] == 1
        assert "IBV_WC_RETRY_EXC_ERR" in reports[0][1]


def test_a_restarted_peer_continues_its_counter(
    make_cluster: Callable[[int], ClusterSpec],
) -> None:
    """A replica's wake-up counter in my header survives its restart: its new incarnation
    continues from my value, so a restart can never make the counter repeat a value I saw."""
    cluster = make_cluster(2)
    with RdmaTransport(0, REGION, cluster) as a:
        for generation in (1, 2):
            with RdmaTransport(1, REGION, cluster) as b:
                b.connect(10)
                for k in range(3):
                    b.write(0, 8, U64.pack(10 * generation + k))
                wait_for(a, lambda g=generation: word(a, 8) == 10 * g + 2)
            wait_for(a, lambda: 1 in a.failed_peers)
        assert bytes(a._counters)[8:16] == U64.pack(6)
