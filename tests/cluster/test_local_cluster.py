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
