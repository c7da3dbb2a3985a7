"""Per-member network namespaces: the choice and its reason, names, errors, subnets, and
nothing left after the owner is SIGKILLed and the sweep ran."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from gaia.cluster import netns
from gaia.cluster.procs import ProcessIdentity
from gaia.systems import SystemUnavailable

from .netns_env import needs_netns

pytestmark = [pytest.mark.timeout(60)]

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


# -- real namespaces (root) ---------------------------------------------------------------------


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
