"""Every system under test runs the same way inside per-replica network namespaces: APUS over
shm and over tcp (which then crosses the veths), ZooKeeper and etcd; and the fault only
namespaces make possible, a cut link, under an APUS-over-tcp cluster."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from gaia.apus.config import Timing
from gaia.apus.systems import ApusCluster
from gaia.baselines.etcd import Etcd
from gaia.baselines.zookeeper import SERVER_SCRIPT, ZooKeeper
from gaia.cluster import netns
from gaia.cluster.ensemble import LocalEnsemble
from gaia.transport.shm import DEFAULT_SHM_DIR

from ..apus.test_cluster import PACE, submit, wait_for
from .netns_env import needs_netns

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def assert_in_own_namespaces(ensemble: LocalEnsemble) -> None:
    ours = os.readlink("/proc/self/ns/net")
    spaces = {os.readlink(f"/proc/{server.pid}/ns/net") for server in ensemble.servers}
    assert len(spaces) == ensemble.replicas and ours not in spaces
    isolation = ensemble.describe()["isolation"]
    assert isolation["mode"] == "netns" and isolation["requested"] == "netns"


def assert_gone(ensemble: LocalEnsemble) -> None:
    assert not any(server.running() for server in ensemble.servers)
    assert netns.leftovers(ensemble.network_id) == []


STEADY = Timing(tick_ms=5.0)
"""For tests about something else than elections: heartbeats every 25 ms, elections after
0.3-0.6 s of silence, so that a stall of the loaded test machine does not move the leader."""


@pytest.fixture
def apus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApusCluster]:
    cluster = ApusCluster(
        3, tmp_path / "logs", transport=request.param, isolation="netns", timing=STEADY
    )
    with cluster:
        yield cluster
    assert_gone(cluster)
    assert not list(DEFAULT_SHM_DIR.glob(f"*{cluster.cluster_id}*"))


@needs_netns
@pytest.mark.parametrize("apus", ["shm", "tcp"], indirect=True)
def test_apus_commits_inside_namespaces(apus: ApusCluster) -> None:
    assert_in_own_namespaces(apus)
    network = apus.network
    assert network is not None
    assert apus.config is not None
    assert {m.host for m in apus.config.members.values()} == {m.address for m in network.members}
    with closing(apus.client()) as client:
        committed = submit(client, 50, "in-netns")
    wait_for(
        lambda: all(s is not None and s["applied"] >= committed for s in apus.statuses().values()),
        PACE.settle,
    )


@needs_netns
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda log_dir: ZooKeeper(3, log_dir, isolation="netns"),
            id="zookeeper",
            marks=pytest.mark.skipif(
                not SERVER_SCRIPT.is_file(), reason="ZooKeeper is not installed (`invoke setup`)"
            ),
        ),
        pytest.param(lambda log_dir: Etcd(3, log_dir, isolation="netns"), id="etcd"),
    ],
)
def test_baselines_serve_from_namespaces(
    make: Callable[[Path], ZooKeeper | Etcd], tmp_path: Path
) -> None:
    ensemble = make(tmp_path / "logs")
    with ensemble:
        assert_in_own_namespaces(ensemble)
        with (
            closing(ensemble.client(first=0)) as writer,
            closing(ensemble.client(first=2)) as reader,
        ):
            for k in range(10):
                writer.submit(f"{k:032d}".encode())
            assert reader.read(writer.key) == (f"{9:032d}".encode(), 10)
    assert_gone(ensemble)


@needs_netns
@pytest.mark.parametrize("apus", ["tcp"], indirect=True)
def test_a_backup_cut_off_from_the_leader_catches_up_once_healed(apus: ApusCluster) -> None:
    client = apus.client()
    before = submit(client, 20, "before")
    leader = apus.leader()
    assert leader is not None
    backup, other = (i for i in range(3) if i != leader)
    view = apus.statuses()[leader]["view"]  # type: ignore[index]

    apus.cut(leader, backup)
    during = submit(client, 50, "during")  # the leader and the other backup are a majority
    statuses = apus.statuses()  # from here, through the bridge: only the replicas' link is cut
    assert statuses[leader] is not None and statuses[leader]["commit"] >= during
    # the leader's sends to the cut backup never stall it, so nobody needed a new election
    assert (statuses[leader]["role"], statuses[leader]["view"]) == ("leader", view)
    assert statuses[backup] is not None and statuses[backup]["applied"] < during
    wait_for(
        lambda: (s := apus.statuses()[other]) is not None and s["applied"] >= during, PACE.settle
    )

    apus.heal()
    after = submit(client, 10, "after")
    wait_for(
        lambda: (s := apus.statuses()[backup]) is not None and s["applied"] >= after, PACE.settle
    )
    assert after > during > before
    client.close()


def test_apus_falls_back_to_loopback_when_not_root(tmp_path: Path) -> None:
    fallback = netns.decide("auto", euid=1000)  # what a non-root user gets
    with ApusCluster(3, tmp_path / "logs", transport="shm", isolation=fallback) as apus:
        assert apus.network is None
        assert {host for host, _ in apus.addresses.values()} == {"127.0.0.1"}
        isolation = apus.describe()["isolation"]
        assert isolation["mode"] == "none" and "not root" in isolation["reason"]
        with closing(apus.client()) as client:
            assert submit(client, 5, "plain") >= 5
