"""Pick a transport by name, as experiment definitions and the replica daemon spell it."""

from __future__ import annotations

from typing import Any

from gaia.transport.base import ClusterSpec, Transport
from gaia.transport.rdma import RdmaTransport
from gaia.transport.shm import ShmTransport
from gaia.transport.tcp import TcpTransport

KINDS = ("shm", "tcp", "rdma")


def make_transport(
    kind: str, me: int, region_size: int, cluster: ClusterSpec, **options: Any
) -> Transport:
    """Build replica `me`'s end of transport `kind`; `options` go to that transport's class
    (e.g. `spin` for shm, `mac` for tcp, `device` for rdma, `on_peer_failure` for all).

    Raises TransportUnavailable (a SystemUnavailable) when `kind` cannot run here, e.g. rdma
    without pyverbs or without a device; the message says which."""
    if kind == "shm":
        return ShmTransport(me, region_size, cluster, **options)
    if kind == "tcp":
        return TcpTransport(me, region_size, cluster, **options)
    if kind == "rdma":
        return RdmaTransport(me, region_size, cluster, **options)
    raise ValueError(f"unknown transport {kind!r}; choose one of {KINDS}")
