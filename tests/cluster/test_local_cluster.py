"""invoke cluster.up / status / down, as a user runs them (through gaia.cluster.local)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gaia.apus.client import ApusClient
from gaia.cluster import local

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_up_status_down(tmp_path: Path) -> None:
    state_dir = tmp_path / "cluster"
    state = local.up(3, "shm", "memory", state_dir)
    try:
        with pytest.raises(local.ClusterError, match="already up"):
            local.up(3, "shm", "memory", state_dir)
        info = local.status(state_dir)
        assert info["leader"] is not None and len(info["replicas"]) == 3
        assert "namespaces" in info["isolation"]  # says how replicas are isolated
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
    assert state["cluster_id"] not in " ".join(p.name for p in Path("/dev/shm").iterdir())


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
