"""The registry: names map to factories, and systems that cannot run here say why."""

from __future__ import annotations

from pathlib import Path

import pytest

from gaia.baselines import SYSTEMS, create
from gaia.baselines.etcd import Etcd
from gaia.baselines.zookeeper import SERVER_SCRIPT, ZooKeeper
from gaia.systems import SystemUnavailable


def test_names() -> None:
    assert set(SYSTEMS) == {
        "zookeeper",
        "zookeeper-nosync",
        "etcd",
        "etcd-nosync",
        "libpaxos",
        "dare",
    }


@pytest.mark.parametrize(
    ("name", "reason"),
    [("libpaxos", "not built on this target"), ("dare", "needs RDMA hardware")],
)
def test_testbed_only_systems_say_why(tmp_path: Path, name: str, reason: str) -> None:
    with pytest.raises(SystemUnavailable, match=reason):
        create(name, 3, tmp_path)


def test_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known: zookeeper"):
        create("chubby", 3, tmp_path)


def test_missing_binaries_make_the_system_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SystemUnavailable, match="ZooKeeper is not installed"):
        ZooKeeper(3, tmp_path, server_script=tmp_path / "zkServer.sh")
    with pytest.raises(SystemUnavailable, match="etcd is not installed"):
        Etcd(3, tmp_path, binary="gaia-no-such-etcd")


def test_replica_counts_outside_one_to_nine_are_refused(tmp_path: Path) -> None:
    if not SERVER_SCRIPT.is_file():
        pytest.skip("ZooKeeper is not installed (`invoke setup`)")
    for replicas in (0, 10):
        with pytest.raises(ValueError, match="between 1 and 9"):
            create("zookeeper", replicas, tmp_path)
    assert create("zookeeper-nosync", 3, tmp_path).name == "zookeeper-nosync"
