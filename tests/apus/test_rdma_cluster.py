"""test_cluster.py's scenarios on a 3-replica APUS cluster over the rdma transport: commit,
lose a backup and catch it up, fail the leader over. They need an RDMA device, so they run in
the Soft-RoCE lane (invoke test-rdma) and skip elsewhere; in the lane's emulated guest at
test_cluster's EMULATED pace (slower core timing, longer bounds)."""

from __future__ import annotations

import pytest

from ..transport.rdma_env import needs_rdma
from .test_cluster import (
    cluster,
    test_commit_lose_a_backup_and_catch_it_up,
    test_leader_failover_keeps_acknowledged_inputs,
)

__all__ = [
    "cluster",
    "test_commit_lose_a_backup_and_catch_it_up",
    "test_leader_failover_keeps_acknowledged_inputs",
]

# The same fixture and scenarios, with the fixture's transport parameter replaced by rdma.
pytestmark = [
    pytest.mark.parametrize("cluster", [pytest.param("rdma", marks=needs_rdma)], indirect=True),
    pytest.mark.integration,
    pytest.mark.timeout(600),
]
