"""Whether this process may make network namespaces, for the tests that need them."""

from __future__ import annotations

import pytest

from gaia.cluster import netns

NETNS_MISSING = netns.unavailable_because() or ""
needs_netns = pytest.mark.skipif(
    bool(NETNS_MISSING),
    reason=f"network namespaces cannot be made here: {NETNS_MISSING} (CI runs as root)",
)
"""For tests that need root and a working `ip netns`; elsewhere they skip and say why."""
