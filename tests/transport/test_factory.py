"""The factory: one name per transport, and a clear refusal for one that cannot run here."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest

from gaia.systems import SystemUnavailable
from gaia.transport import ClusterSpec, ShmTransport, TcpTransport, make_transport

from .rdma_env import RDMA_MISSING, needs_rdma


def test_known_kinds_build_their_transport(make_cluster: Callable[[int], ClusterSpec]) -> None:
    cluster = make_cluster(2)
    with make_transport("shm", 0, 4096, cluster, spin=0) as shm:
        assert isinstance(shm, ShmTransport)
    with make_transport("tcp", 0, 4096, cluster, mac="hmac-sha256") as tcp:
        assert isinstance(tcp, TcpTransport)


@pytest.mark.skipif(not RDMA_MISSING, reason="this machine has an RDMA device")
def test_rdma_without_a_device_says_why(make_cluster: Callable[[int], ClusterSpec]) -> None:
    """With pyverbs (Debian's, linked into the venv by provisioning), the reason is the missing
    device; without it, how to get pyverbs."""
    if importlib.util.find_spec("pyverbs") is None:
        reason = r"^pyverbs is not importable .*invoke setup --only rdma"
    else:
        reason = r"^no RDMA device: "
    with pytest.raises(SystemUnavailable, match=reason):
        make_transport("rdma", 0, 4096, make_cluster(2))


@needs_rdma
def test_rdma_names_the_devices_when_the_wanted_one_is_absent(
    make_cluster: Callable[[int], ClusterSpec],
) -> None:
    with pytest.raises(SystemUnavailable, match=r"no RDMA device 'nosuch' \(present: "):
        make_transport("rdma", 0, 4096, make_cluster(2), device="nosuch")


def test_unknown_kind_lists_the_choices(make_cluster: Callable[[int], ClusterSpec]) -> None:
    with pytest.raises(ValueError, match="shm"):
        make_transport("udp", 0, 4096, make_cluster(2))


@pytest.mark.parametrize(
    ("cluster_id", "members"),
    [("a/b", {0: ("h", 1), 1: ("h", 2)}), ("*", {0: ("h", 1), 1: ("h", 2)}), ("ok", {0: ("h", 1)})],
)
def test_cluster_spec_rejects_unsafe_ids_and_lone_members(
    cluster_id: str, members: dict[int, tuple[str, int]]
) -> None:
    with pytest.raises(ValueError):
        ClusterSpec(cluster_id, members)
