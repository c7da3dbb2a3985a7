"""The ZooKeeper baseline against real servers: start, commit, read back, survive a follower
crash, fail with the server's own words, and leave no process behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from gaia.baselines.zookeeper import SERVER_SCRIPT, ZooKeeper
from gaia.cluster.procs import ProcessGroupError, live_group_members

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not SERVER_SCRIPT.is_file(), reason="ZooKeeper is not installed (`invoke setup`)"
    ),
]


@pytest.fixture
def zookeeper(tmp_path: Path) -> Iterator[ZooKeeper]:
    with ZooKeeper(3, tmp_path / "logs") as ensemble:
        yield ensemble


def assert_all_gone(ensemble: ZooKeeper) -> None:
    for server in ensemble.servers:
        assert server.popen.returncode is not None, f"{server.name} was not reaped"
        assert live_group_members(server.pid) == [], f"{server.name} left processes behind"


def test_three_servers_commit_writes_that_another_client_reads(zookeeper: ZooKeeper) -> None:
    assert sorted(zookeeper.modes(), key=str) == ["follower", "follower", "leader"]
    payloads = [f"{i:064d}".encode() for i in range(20)]
    with closing(zookeeper.client(first=0)) as writer:
        for payload in payloads:
            writer.submit(payload)
        with closing(zookeeper.client(first=1)) as reader:
            assert reader.read(writer.key) == (payloads[-1], len(payloads))

    described = zookeeper.describe()
    assert described["system"] == "zookeeper"
    assert described["replicas"] == 3
    assert described["force_sync"] == "yes"
    assert described["version"].startswith("3.")

    zookeeper.stop()
    assert_all_gone(zookeeper)
    zookeeper.stop()  # idempotent
    for server in zookeeper.servers:
        assert (zookeeper.log_dir / f"{server.name}.command").read_text().strip()
        assert "forceSync=yes" in (zookeeper.log_dir / f"{server.name}.zoo.cfg").read_text()
        assert (zookeeper.log_dir / f"{server.name}.exit").read_text().strip()


def test_writes_go_on_after_a_follower_crashes(zookeeper: ZooKeeper) -> None:
    modes = zookeeper.modes()
    leader = modes.index("leader")
    victim, survivor = (i for i, mode in enumerate(modes) if mode == "follower")
    with closing(zookeeper.client(first=leader)) as writer:
        for i in range(10):
            writer.submit(b"before %d" % i)
        zookeeper.kill(victim)
        assert zookeeper.servers[victim].popen.returncode == -9

        began = time.monotonic()
        for i in range(50):
            writer.submit(b"after %d" % i)
        assert time.monotonic() - began < 10.0

        with closing(zookeeper.client(first=survivor)) as reader:
            assert reader.read(writer.key) == (b"after 49", 60)
    assert zookeeper.modes().count("leader") == 1
    assert zookeeper.modes()[victim] is None
    zookeeper.stop()
    assert_all_gone(zookeeper)


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    ensemble = ZooKeeper(1, tmp_path / "logs", heap_mb=1)  # the JVM refuses a 1 MB heap
    with pytest.raises(ProcessGroupError, match=r"(?s)zk1 exited.*zk1\.std(out|err)"):
        ensemble.start()
    assert_all_gone(ensemble)


def test_memory_only_variant_configures_force_sync_off(tmp_path: Path) -> None:
    ensemble = ZooKeeper(1, tmp_path / "logs", force_sync=False)
    assert ensemble.name == "zookeeper-nosync"
    assert ensemble.describe()["durability"] == "no-fsync"
