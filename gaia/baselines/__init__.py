"""The baseline systems APUS is compared with, by the names experiment definitions use.

Every entry is a factory `(replicas, log_dir, **params) -> ReplicatedSystem`. A system that
cannot run on this target raises SystemUnavailable with the reason, from its factory, so the
runner records "not run here" and why. That includes "etcd-nosync" when the installed etcd lacks
--unsafe-no-fsync: whether it has the flag is a property of the installed binary, not of this
code, so the entry exists everywhere and the binary decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from gaia.baselines.etcd import Etcd
from gaia.baselines.zookeeper import ZooKeeper
from gaia.systems import ReplicatedSystem, SystemUnavailable

LIBPAXOS_UNAVAILABLE = (
    "libpaxos: testbed only: not built on this target (LibPaxos3 is not a Debian package; "
    "building it from source is a later issue)"
)
DARE_UNAVAILABLE = (
    "dare: testbed only: needs RDMA hardware (DARE runs over InfiniBand/RoCE verbs and this "
    "target has no RDMA device) and is not built on this target"
)


class SystemFactory(Protocol):
    def __call__(self, replicas: int, log_dir: Path, **params: Any) -> ReplicatedSystem: ...


def _unavailable(reason: str) -> SystemFactory:
    def factory(replicas: int, log_dir: Path, **params: Any) -> ReplicatedSystem:
        raise SystemUnavailable(reason)

    return factory


SYSTEMS: Mapping[str, SystemFactory] = MappingProxyType(
    {
        "zookeeper": partial(ZooKeeper, force_sync=True),
        "zookeeper-nosync": partial(ZooKeeper, force_sync=False),
        "etcd": partial(Etcd, fsync=True),
        "etcd-nosync": partial(Etcd, fsync=False),
        "libpaxos": _unavailable(LIBPAXOS_UNAVAILABLE),
        "dare": _unavailable(DARE_UNAVAILABLE),
    }
)


def create(name: str, replicas: int, log_dir: Path, **params: Any) -> ReplicatedSystem:
    """Build (not start) the baseline called `name`; raises SystemUnavailable when it cannot
    run here and ValueError for a name that is not a baseline."""
    try:
        factory = SYSTEMS[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(SYSTEMS)}") from None
    return factory(replicas, log_dir, **params)
