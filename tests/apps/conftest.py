"""Real APUS clusters that replicate a real Redis or memcached (the shim preloaded into each)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gaia.apus.systems import ApusCluster
from gaia.transport.shm import DEFAULT_SHM_DIR

MakeCluster = Callable[..., ApusCluster]


@pytest.fixture
def app_cluster(tmp_path: Path) -> Iterator[MakeCluster]:
    """Start clusters on demand; every one is stopped, and must leave nothing behind."""
    started: list[ApusCluster] = []

    def make(app: str, transport: str = "shm", replicas: int = 3, **kw: object) -> ApusCluster:
        logs = tmp_path / f"logs{len(started)}"
        c = ApusCluster(replicas, logs, transport=transport, app=app, **kw)  # type: ignore[arg-type]
        started.append(c)
        c.start()
        return c

    yield make
    for c in started:
        c.stop()
        assert not any(p.running() for p in c.servers)
        assert not list(DEFAULT_SHM_DIR.glob(f"*{c.cluster_id}*"))


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout:.0f} s: {what or predicate}")


def caught_up(cluster: ApusCluster, members: list[int] | None = None) -> bool:
    """Every (listed) replica has applied the leader's commit index and replayed all of it."""
    statuses = cluster.statuses()
    wanted = set(statuses) if members is None else set(members)
    live = {i: s for i, s in statuses.items() if s is not None and i in wanted}
    if set(live) != wanted:
        return False
    commits = {s["commit"] for s in live.values() if s["role"] == "leader"}
    if len(commits) != 1:
        return False
    (commit,) = commits
    return all(s["app"]["replayed_upto"] >= commit for s in live.values())
