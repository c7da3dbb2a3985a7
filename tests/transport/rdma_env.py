"""Whether this machine has an RDMA device, for the tests that need one."""

from __future__ import annotations

import pytest

from gaia.transport import TransportUnavailable
from gaia.transport.rdma import load_pyverbs, open_device


def rdma_missing() -> str:
    """Why the rdma transport cannot be tried here ("" if it can: a device is present)."""
    try:
        _, context = open_device(load_pyverbs(), "auto")
    except TransportUnavailable as exc:
        return f"{exc} (the Soft-RoCE lane runs these tests: invoke test-rdma)"
    context.close()
    return ""


RDMA_MISSING = rdma_missing()
needs_rdma = pytest.mark.skipif(bool(RDMA_MISSING), reason=RDMA_MISSING or "-")
"""For tests that need an RDMA device: they run in the Soft-RoCE lane and skip elsewhere."""
