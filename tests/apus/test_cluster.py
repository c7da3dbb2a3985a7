"""Real 3-replica APUS clusters on this machine (shm and tcp): commit, lose a backup, go on,
bring it back and watch it catch up from the leader. test_rdma_cluster.py runs the same
scenarios over rdma in the Soft-RoCE lane's emulated guest, at the slower `Pace` below."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gaia.apus.client import ApusClient
from gaia.apus.config import ClusterConfig, ConfigError, Timing
from gaia.apus.systems import ApusCluster
from gaia.transport.shm import DEFAULT_SHM_DIR

from ..transport.rdma_env import IN_LANE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass(frozen=True)
class Pace:
    """How fast a cluster under test may be: its core's timing and the tests' time bounds.
    Only the time allowed changes with the pace, never what a test checks."""

    timing: Timing = field(default_factory=Timing)
    start: float = 30.0
    """every replica up and following one leader"""
    status: float = 1.0
    """one replica's STATUS answer"""
    commit: float = 10.0
    """one input committed (the client's bound, through elections too)"""
    settle: float = 20.0
    """a restarted backup caught up, a new leader elected"""


NATIVE = Pace()
EMULATED = Pace(
    # Python under QEMU's TCG (the Soft-RoCE lane) runs many times slower, more still on a busy
    # host: a replica can stall for longer than the default 60-120 ms election timeout (or the
    # leader's 120 ms quorum check), which sets off elections nobody needs. Ten times the tick
    # keeps the ratios: heartbeats every 50 ms, elections after 0.6-1.2 s of silence.
    timing=Timing(tick_ms=10.0),
    start=180.0,
    status=10.0,
    commit=60.0,
    settle=180.0,
)
PACE = EMULATED if IN_LANE else NATIVE
"""The pace of every cluster here: EMULATED in the Soft-RoCE lane's guest, else NATIVE."""


@pytest.fixture(params=["shm", "tcp"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApusCluster]:
    c = ApusCluster(
        3,
        tmp_path / "logs",
        transport=request.param,
        durability="fsync",
        timing=PACE.timing,
        start_timeout=PACE.start,
        status_timeout=PACE.status,
        client_timeout=PACE.commit,
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()
    assert not any(p.running() for p in c.servers)
    assert not list(DEFAULT_SHM_DIR.glob(f"*{c.cluster_id}*"))


def wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{predicate.__name__} not reached within {timeout:.0f} s")


def submit(client: ApusClient, n: int, tag: str) -> int:
    for k in range(n):
        client.submit(f"{tag}-{k}".encode())
    return client.last_index


def test_commit_lose_a_backup_and_catch_it_up(cluster: ApusCluster) -> None:
    client = cluster.client()
    first = submit(client, 50, "a")
    leader = cluster.leader()
    assert leader is not None
    backup = next(i for i in range(3) if i != leader)

    cluster.kill(backup)
    second = submit(client, 50, "b")  # a majority (leader + one backup) still commits
    assert second > first
    statuses = cluster.statuses()
    assert statuses[backup] is None
    assert statuses[leader] is not None and statuses[leader]["commit"] >= second

    cluster.restart(backup)  # recovers its log, then the leader fills the gap
    third = submit(client, 10, "c")

    def caught_up() -> bool:
        s = cluster.statuses()[backup]
        return s is not None and s["applied"] >= third

    wait_for(caught_up, PACE.settle)
    # every input was timed where it was proposed (the leader of its time)
    counts = [
        s["timings_us"]["count"] for s in cluster.statuses().values() if s and "timings_us" in s
    ]
    assert sum(counts) >= 100
    client.close()


def test_leader_failover_keeps_acknowledged_inputs(cluster: ApusCluster) -> None:
    client = cluster.client()
    acked = submit(client, 30, "before")
    old = cluster.leader()
    assert old is not None
    cluster.kill(old)

    def new_leader() -> bool:
        return cluster.leader() not in (None, old)

    wait_for(new_leader, PACE.settle)
    client = cluster.client()
    after = submit(client, 10, "after")
    assert after > acked
    live = [s for s in cluster.statuses().values() if s is not None]
    assert len(live) == 2 and all(s["commit"] >= acked for s in live)


def test_a_bad_cluster_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text('{"cluster_id": "x", "transport": "pigeon"}')
    with pytest.raises(ConfigError, match="missing fields"):
        ClusterConfig.load(path)
