"""invoke cluster.up / status / down, as a user runs them (through gaia.cluster.local)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from gaia.apus.client import ApusClient
from gaia.cluster import local, netns
from gaia.cluster.procs import ProcessIdentity

from .netns_env import NETNS_MISSING

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def shm_files(cluster_id: str) -> list[Path]:
    return [p for p in Path("/dev/shm").iterdir() if cluster_id in p.name]


@pytest.mark.parametrize("isolation", ["auto", "none"])
def test_up_status_down(tmp_path: Path, isolation: str) -> None:
    state_dir = tmp_path / "cluster"
    state = local.up(3, "shm", "memory", state_dir, isolation=isolation)
    try:
        with pytest.raises(local.ClusterError, match="already up"):
            local.up(3, "shm", "memory", state_dir)
        info = local.status(state_dir)
        assert info["leader"] is not None and len(info["replicas"]) == 3
        # says how replicas are isolated, and why
        expected = "netns" if isolation == "auto" and not NETNS_MISSING else "none"
        assert info["isolation"]["mode"] == expected and info["isolation"]["reason"]
        hosts = {host for host, _port in info["clients"].values()}
        if expected == "netns":
            assert hosts == set(info["isolation"]["addresses"].values())
        else:
            assert hosts == {"127.0.0.1"}
        host, port = info["leader_address"]
        client = ApusClient({0: (host, port)})
        client.submit(b"hello")
        client.close()
        assert local.status(state_dir)["replicas"][str(info["leader"])]["commit"] >= 2
    finally:
        assert local.down(state_dir)
    assert local.read_state(state_dir) is None
    assert not local.down(state_dir)
    with pytest.raises(local.ClusterError, match="no cluster is up"):
        local.status(state_dir)
    assert not shm_files(state["cluster_id"])
    if not NETNS_MISSING:
        assert netns.leftovers(state["network_id"]) == []


def test_up_with_redis_gives_a_replicated_redis(tmp_path: Path) -> None:
    """What `invoke cluster.up --app redis` promises: point a Redis client at the leader."""
    import redis

    state_dir = tmp_path / "cluster"
    local.up(3, "shm", "memory", state_dir, app="redis")
    try:
        info = local.status(state_dir)
        assert info["app"] == "redis" and len(info["app_servers"]) == 3
        host, port = info["leader_app_address"]
        r = redis.Redis(host=host, port=port, socket_timeout=10)
        assert r.set("greeting", "hello") and r.get("greeting") == b"hello"
        leader = info["replicas"][str(info["leader"])]
        assert leader["app"]["serving"] and not any(
            r["app"]["serving"] for i, r in info["replicas"].items() if i != str(info["leader"])
        )
    finally:
        assert local.down(state_dir)


def test_down_after_the_supervisor_was_sigkilled_leaves_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "cluster"
    state = local.up(3, "shm", "memory", state_dir)
    replicas = [ProcessIdentity(p["pid"], p["start"]) for p in state["processes"].values()]
    assert len(replicas) == 3 and all(r.alive() for r in replicas)
    os.kill(state["supervisor"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while ProcessIdentity.of(state["supervisor"]) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(r.alive() for r in replicas), "the replicas outlive their supervisor"

    assert local.down(state_dir)  # finds the dead supervisor and cleans up after it
    deadline = time.monotonic() + 10
    while any(r.alive() for r in replicas) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(r.alive() for r in replicas)
    assert local.read_state(state_dir) is None
    assert not shm_files(state["cluster_id"])
    if not NETNS_MISSING:
        assert netns.leftovers(state["network_id"]) == []
    assert not local.down(state_dir)
