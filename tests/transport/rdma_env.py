"""Whether this machine has an RDMA device, for the tests that need one, and whether the tests
run in the Soft-RoCE lane's emulated guest."""

from __future__ import annotations

import pytest

from gaia.softroce.lane import in_lane
from gaia.transport import TransportUnavailable
from gaia.transport.rdma import load_pyverbs, open_device

IN_LANE = in_lane()
"""True in the Soft-RoCE lane's guest: QEMU's software emulation, where Python runs many times
slower than here (and slower still when the host is busy)."""


def rdma_missing() -> str:
    """Why the rdma transport cannot be tried here ("" if it can: a device is present)."""
    try:
        _, context = open_device(load_pyverbs(), "auto")
    except TransportUnavailable as exc:
        return str(exc)
    context.close()
    return ""


RDMA_MISSING = rdma_missing()
if RDMA_MISSING and IN_LANE:  # the lane exists to run these tests: skipping them is no pass
    raise RuntimeError(f"the Soft-RoCE lane's guest has no usable RDMA device: {RDMA_MISSING}")
needs_rdma = pytest.mark.skipif(
    bool(RDMA_MISSING),
    reason=f"{RDMA_MISSING} (the Soft-RoCE lane runs these tests: invoke test-rdma)",
)
"""For tests that need an RDMA device: they run in the Soft-RoCE lane and skip elsewhere."""
