"""Per-member network namespaces: made, reachable, cut and healed, and always removed (after
stop, after Ctrl-C during start, after the owner is SIGKILLed); the choice and its fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gaia.cluster import netns
from gaia.cluster.ensemble import LocalEnsemble
from gaia.cluster.procs import ManagedProcess, ProcessIdentity, ProcessSpec, live_group_members
from gaia.systems import SystemUnavailable

from .netns_env import needs_netns

pytestmark = [pytest.mark.timeout(60)]

ECHO = textwrap.dedent(
    """
    import socket, sys
    server = socket.create_server((sys.argv[1], int(sys.argv[2])))
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(64))
    """
)
# Prints "ok" if HOST:PORT echoes within a second, else the error.
KNOCK = textwrap.dedent(
    """
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0) as s:
            s.sendall(b"knock")
            print("ok" if s.recv(64) == b"knock" else "garbled")
    except OSError as e:
        print(f"unreachable: {e}")
    """
)
PORT = 7000  # every member has a network stack of its own: the same port everywhere


class Echoes(LocalEnsemble):
    """N tiny TCP echo servers, each at its member's address."""

    name = "echoes"

    def __init__(self, replicas: int, log_dir: Path, **kwargs: Any) -> None:
        super().__init__(replicas, log_dir, data_root=None, start_timeout=20.0, **kwargs)

    def _server_specs(self, data_root: Path) -> list[ProcessSpec]:
        return [
            ProcessSpec(f"echo{i}", (sys.executable, "-c", ECHO, self.host(i), str(self.port(i))))
            for i in range(self.replicas)
        ]

    def port(self, index: int) -> int:
        return PORT if self.network is not None else PORT + index

    def knock(self, target: int, source: int | None = None) -> str:
        """Connect to member `target` from member `source`'s namespace (None: from here)."""
        argv: tuple[str, ...] = (sys.executable, "-c", KNOCK, self.host(target))
        argv += (str(self.port(target)),)
        if source is not None:
            assert self.network is not None
            argv = self.network.exec_argv(source, argv)
        knocked = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
        return knocked.stdout.strip()

    def _not_ready(self) -> list[ManagedProcess]:
        return [s for i, s in enumerate(self.servers) if self.knock(i) != "ok"]

    def _details(self) -> Mapping[str, Any]:
        return {}


def net_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


# -- the choice, everywhere ---------------------------------------------------------------------


def test_the_choice_and_its_reason_are_explicit() -> None:
    off = netns.decide("none")
    assert (off.mode, off.requested) == ("none", "none") and "127.0.0.1" in off.reason
    fallback = netns.decide("auto", euid=1000)
    assert fallback.mode == "none"
    assert fallback.reason.startswith("not root (euid 1000)") and "127.0.0.1" in fallback.reason
    with pytest.raises(SystemUnavailable, match=r"cannot be used here: not root \(euid 1000\)"):
        netns.decide("netns", euid=1000)
    with pytest.raises(ValueError, match="choose one of auto, netns, none"):
        netns.decide("vm")


def test_names_fit_ifnamsiz_for_every_member() -> None:
    cluster_id = netns.new_id()
    names = [netns.bridge_name(cluster_id)]
    names += [netns.veth_name(cluster_id, i) for i in range(netns.MAX_MEMBERS)]
    assert max(len(name) for name in names) < netns.IFNAMSIZ
    with pytest.raises(ValueError, match="8 lowercase hex digits"):
        netns.bridge_name("../etc")


def test_a_failing_ip_command_is_named_with_its_stderr() -> None:
    with pytest.raises(netns.NetnsError, match=r"`\S*ip link del gaia-no-such-link` failed .*: \S"):
        netns.ip("link", "del", "gaia-no-such-link")


def test_not_root_falls_back_to_plain_processes_and_says_why(tmp_path: Path) -> None:
    with Echoes(2, tmp_path, isolation=netns.decide("auto", euid=1000)) as echoes:
        assert echoes.network is None and echoes.host(1) == "127.0.0.1"
        assert echoes.knock(1) == "ok"
        assert net_namespace(echoes.servers[0].pid) == net_namespace(os.getpid())
        isolation = echoes.describe()["isolation"]
        assert isolation["mode"] == "none" and "not root (euid 1000)" in isolation["reason"]
        with pytest.raises(RuntimeError, match=r"no network namespaces to cut.*not root"):
            echoes.cut(0, 1)


# -- real namespaces (root) ---------------------------------------------------------------------


@needs_netns
def test_members_are_isolated_reachable_cut_healed_and_removed(tmp_path: Path) -> None:
    echoes = Echoes(3, tmp_path, isolation="netns")
    with echoes:
        network = echoes.network
        assert network is not None
        names = set(netns.leftovers(echoes.network_id))
        assert names == {network.bridge} | {
            name for m in network.members for name in (m.namespace, m.veth)
        }
        ours = net_namespace(os.getpid())
        spaces = {net_namespace(server.pid) for server in echoes.servers}
        assert len(spaces) == 3 and ours not in spaces  # one namespace each, not ours
        described = echoes.describe()["isolation"]
        assert described["mode"] == "netns" and described["subnet"] == str(network.subnet)
        assert all(echoes.host(i) in [m.address for m in network.members] for i in range(3))
        assert network.subnet.subnet_of(netns.SUPERNET)

        # through the bridge from here, and from member to member
        assert [echoes.knock(i) for i in range(3)] == ["ok"] * 3
        assert echoes.knock(0, source=1) == "ok"

        echoes.cut(0, 1)
        assert echoes.knock(0, source=1).startswith("unreachable")
        assert echoes.knock(1, source=0).startswith("unreachable")
        assert echoes.knock(0, source=2) == "ok"  # only that link is cut
        assert echoes.knock(0) == "ok"
        echoes.heal()
        assert echoes.knock(0, source=1) == "ok"

        echoes.kill(2)
        assert not echoes.servers[2].running()
    assert netns.leftovers(echoes.network_id) == []
    for server in echoes.servers:
        assert server.popen.returncode is not None and live_group_members(server.pid) == []
    assert echoes.describe()["isolation"]["mode"] == "netns"  # still says how it ran


@needs_netns
def test_ctrl_c_during_start_removes_the_namespaces(tmp_path: Path) -> None:
    class Interrupted(Echoes):
        def _not_ready(self) -> list[ManagedProcess]:
            raise KeyboardInterrupt

    ensemble = Interrupted(2, tmp_path, isolation="netns")
    with pytest.raises(KeyboardInterrupt):
        ensemble.start()
    assert netns.leftovers(ensemble.network_id) == []
    assert all(server.popen.returncode is not None for server in ensemble.servers)


@needs_netns
def test_a_subnet_or_id_in_use_is_never_taken_twice() -> None:
    first_id = netns.new_id()
    # same starting candidate (the id modulo the number of /24s), so the second must move on
    second_id = f"{(int(first_id, 16) + 512) % 2**32:08x}"
    with netns.Network.create(first_id, 1) as first:
        with netns.Network.create(second_id, 1) as second:
            assert second.subnet != first.subnet
        with pytest.raises(netns.NetnsError, match=f"subnet {first.subnet} overlaps"):
            netns.Network.create(netns.new_id(), 1, subnet=str(first.subnet))
        with pytest.raises(FileExistsError, match="in use"):
            netns.Network.create(first_id, 1)
        assert len(netns.leftovers(first_id)) == 3  # the failed attempt removed nothing of it
    assert netns.leftovers(first_id) == netns.leftovers(second_id) == []


OWNER = textwrap.dedent(
    """
    import subprocess, sys, time
    from gaia.cluster import netns
    network = netns.Network.create(sys.argv[1], 2)
    inside = subprocess.Popen(network.exec_argv(1, ["sleep", "60"]), start_new_session=True)
    print(inside.pid, flush=True)
    time.sleep(60)
    """
)


@needs_netns
def test_a_sigkilled_owner_leaves_nothing_after_the_sweep() -> None:
    cluster_id = netns.new_id()
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, cluster_id], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        inside = ProcessIdentity.of(int(owner.stdout.readline()))
        assert inside is not None
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert len(netns.leftovers(cluster_id)) == 5  # the bridge, 2 namespaces, 2 veths
    assert inside.alive()  # the crash took only the owner
    assert cluster_id not in netns.owned_by(os.getpid())

    removed = netns.sweep()
    assert set(netns.leftovers(cluster_id)) == set() and len(removed) >= 3
    deadline = time.monotonic() + 5
    while inside.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not inside.alive()  # it was killed with its namespace
