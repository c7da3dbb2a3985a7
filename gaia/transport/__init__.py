"""One-sided remote writes between APUS replicas: the interface and its implementations."""

from gaia.transport.base import (
    ClusterSpec,
    PeersUnreachable,
    Transport,
    TransportStats,
    TransportUnavailable,
)
from gaia.transport.factory import KINDS, make_transport
from gaia.transport.rdma import RdmaTransport
from gaia.transport.shm import ShmTransport, cleanup_shm
from gaia.transport.tcp import TcpTransport

__all__ = [
    "KINDS",
    "ClusterSpec",
    "PeersUnreachable",
    "RdmaTransport",
    "ShmTransport",
    "TcpTransport",
    "Transport",
    "TransportStats",
    "TransportUnavailable",
    "cleanup_shm",
    "make_transport",
]
