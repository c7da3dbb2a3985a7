"""Shared-memory specifics: files, restarts, and the doorbell's "only when asleep" rule."""

from __future__ import annotations

import mmap
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import pytest

from gaia.transport import ClusterSpec, ShmTransport, cleanup_shm
from gaia.transport.shm import DEFAULT_SHM_DIR, segment_path

from . import peers
from .peers import REGION, U64, wait_for, word


def files_of(cluster: ClusterSpec) -> list[str]:
    return sorted(p.name for p in DEFAULT_SHM_DIR.glob(f"gaia.{cluster.cluster_id}.*"))


def test_close_removes_the_segment_and_doorbell(make_cluster: Callable[[int], ClusterSpec]) -> None:
    cluster = make_cluster(2)
    t = ShmTransport(0, REGION, cluster)
    assert files_of(cluster) == [f"gaia.{cluster.cluster_id}.0.{s}" for s in ("bell", "seg")]
    assert os.path.getsize(segment_path(DEFAULT_SHM_DIR, cluster.cluster_id, 0)) == (
        mmap.PAGESIZE + REGION
    ), "region must follow one header page (page-aligned, registrable)"
    t.close()
    t.close()
    assert files_of(cluster) == []


def test_a_second_process_for_a_live_replica_id_is_refused(
    make_cluster: Callable[[int], ClusterSpec],
) -> None:
    cluster = make_cluster(2)
    with ShmTransport(0, REGION, cluster), pytest.raises(RuntimeError, match="already running"):
        ShmTransport(0, REGION, cluster)


def test_writer_rings_the_doorbell_only_for_a_sleeping_reader(
    make_cluster: Callable[[int], ClusterSpec],
) -> None:
    cluster = make_cluster(2)
    with ShmTransport(0, REGION, cluster) as a, ShmTransport(1, REGION, cluster, spin=0) as b:
        a.connect(5)
        a.write(1, 0, U64.pack(1))  # b is awake (not in wait): no syscall
        assert a.stats.doorbells == 0
        assert b.wait(0)

        woke = threading.Event()
        reader = threading.Thread(target=lambda: b.wait(5) and woke.set())
        reader.start()
        deadline = time.monotonic() + 5
        while b.stats.sleeps == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.01)  # b is now blocked in poll()
        a.write(1, 0, U64.pack(2))
        reader.join(5)
        assert woke.is_set()
        assert a.stats.doorbells == 1


def test_mismatched_region_size_is_not_attached(
    make_cluster: Callable[[int], ClusterSpec],
) -> None:
    cluster = make_cluster(2)
    with ShmTransport(0, REGION, cluster) as a, ShmTransport(1, 2 * REGION, cluster):
        with pytest.raises(TimeoutError, match="size"):
            a.connect(0.2)
        a.write(1, 0, b"x")
        assert a.failed_peers == {1}
        assert a.stats.dropped_failed == 1


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_cleanup_removes_what_a_killed_replica_left(
    make_cluster: Callable[[int], ClusterSpec], spawn: Callable[..., BaseProcess]
) -> None:
    cluster = make_cluster(2)
    with ShmTransport(0, REGION, cluster) as t:
        process = spawn(peers.announce, "shm", 1, cluster, 1)
        t.connect(10)
        wait_for(t, lambda: word(t, 16) == 1)
        os.kill(process.pid or 0, signal.SIGKILL)
        process.join(5)
    left = files_of(cluster)
    assert left == [f"gaia.{cluster.cluster_id}.1.{s}" for s in ("bell", "seg")]
    removed = cleanup_shm(cluster.cluster_id)
    assert sorted(p.name for p in removed) == left
    assert files_of(cluster) == []


def test_writers_follow_a_peer_that_closed_and_came_back(
    make_cluster: Callable[[int], ClusterSpec],
) -> None:
    cluster = make_cluster(2)
    with ShmTransport(0, REGION, cluster, probe_interval=0) as a:
        with ShmTransport(1, REGION, cluster):
            a.connect(5)
        a.write(1, 0, U64.pack(5))  # the segment is CLOSED: detached, write dropped
        assert a.failed_peers == {1}
        assert a.stats.dropped_failed == 1
        with ShmTransport(1, REGION, cluster) as again:
            a.write(1, 0, U64.pack(6))
            assert again.wait(5)
            assert word(again, 0) == 6
            assert a.failed_peers == frozenset()
