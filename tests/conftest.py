"""Suite-wide guard: no test leaves a network namespace, veth or bridge of its own behind.

Every local ensemble runs in network namespaces when the suite runs as root (isolation "auto"),
so a teardown that forgets one would leak them on a machine others share. At the end of the
session, any cluster network created by this process that still exists fails the run (and is
removed, so the failure does not outlive the report).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gaia.cluster import netns


@pytest.fixture(scope="session", autouse=True)
def no_leftover_networks() -> Iterator[None]:
    yield
    if os.geteuid() != 0 or netns.unavailable_because() is not None:
        return
    mine = netns.owned_by(os.getpid())
    left = {cluster_id: netns.leftovers(cluster_id) for cluster_id in mine}
    left = {cluster_id: names for cluster_id, names in left.items() if names}
    for cluster_id in mine:
        netns.cleanup(cluster_id)
    assert not left, f"network namespaces or links left behind by the tests: {left}"
