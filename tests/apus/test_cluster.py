"""Real 3-replica APUS clusters on this machine (shm and tcp): commit, lose a backup, go on,
bring it back and watch it catch up from the leader."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gaia.apus.client import ApusClient
from gaia.apus.config import ClusterConfig, ConfigError
from gaia.apus.systems import ApusCluster
from gaia.transport.shm import DEFAULT_SHM_DIR

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(params=["shm", "tcp"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApusCluster]:
    c = ApusCluster(3, tmp_path / "logs", transport=request.param, durability="fsync")
    c.start()
    try:
        yield c
    finally:
        c.stop()
    assert not any(p.running() for p in c.servers)
    assert not list(DEFAULT_SHM_DIR.glob(f"*{c.cluster_id}*"))


def wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


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

    wait_for(caught_up)
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
    wait_for(lambda: cluster.leader() not in (None, old))
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
