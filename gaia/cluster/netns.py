"""One network namespace per cluster member, joined by a bridge in the root namespace.

For one cluster (a short id of 8 hex digits, `new_id()`), `Network.create` makes:

- a Linux bridge `gaia<id>b` in the root namespace, holding the first address of a private /24
  (`.1`), so clients running in the root namespace (the benchmark) reach every member through it;
- per member `i`, a namespace `gaia<id>n<i>` with its loopback up and one end of a veth pair,
  renamed `eth0`, at address `.<i + 2>`; the other end, `gaia<id>v<i>`, is a port of the bridge.

Interface names fit IFNAMSIZ (15 characters) for up to 100 members. The /24 comes from
198.18.0.0/15, the range RFC 2544 sets aside for benchmarking network devices, which nothing
routes on a normal host; the first candidate is derived from the id and any /24 that overlaps an
existing route or address of this host (another cluster's bridge, a VPN) is passed over. The
choice is made under a lock file, so two clusters created at once never take the same /24.

Processes join a namespace through `ip netns exec NAME argv...` (see `Network.exec_argv`): `ip`
enters the namespace and then execs the command in its own place, so the PID the launcher sees
and reaps, and the process group it signals, are the server's own. Shared memory is unaffected
(the namespaces are network namespaces only; /dev/shm is the same file system everywhere).

Teardown: `Network.destroy` (also at interpreter exit) and `cleanup(id)` kill whatever still
runs inside the cluster's namespaces (a namespace, and the veth in it, lives as long as any
process does), delete the namespaces (which deletes their veths) and the bridge. Every cluster
leaves an owner record (PID and start time of the creating process) under /run/gaia-netns;
`sweep()`, called before every creation, removes the objects of every cluster whose owner is
gone, e.g. after a SIGKILL, and never touches a live cluster of another process.

`decide()` says whether namespaces can be used: they need root and a working `ip netns`
(probed once per process by creating and deleting one). The answer and its reason are recorded
with every ensemble (`describe()["isolation"]`).

Link faults: `cut(i, j)` drops every packet between members i and j with iptables DROP rules
inside member i's namespace (so they vanish with it), `heal()` removes them.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gaia.cluster.procs import ProcessIdentity
from gaia.systems import SystemUnavailable

Mode = Literal["netns", "none"]
REQUESTS: tuple[str, ...] = ("auto", "netns", "none")
LOOPBACK = "127.0.0.1"
SUPERNET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544: benchmarking
STATE_DIR = Path("/run/gaia-netns")
PREFIX = "gaia"
IFNAMSIZ = 16  # including the terminating NUL
MAX_MEMBERS = 100
_ID = re.compile(r"[0-9a-f]{8}")
# Every object this module creates: gaia<id>b (bridge), gaia<id>v<i> (veth), gaia<id>n<i> (netns).
_NAME = re.compile(rf"{PREFIX}([0-9a-f]{{8}})([bvn])(\d*)")
# Where to find ip and iptables besides PATH (sbin is missing from some PATHs).
_SYSTEM_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
_COMMAND_TIMEOUT = 30.0

_LIVE: weakref.WeakSet[Network] = weakref.WeakSet()
log = logging.getLogger(__name__)


class NetnsError(RuntimeError):
    """An `ip` or `iptables` command failed (the message quotes it and its stderr), or no /24
    is free."""


class NetnsUnavailable(SystemUnavailable):
    """isolation='netns' was asked for where namespaces cannot be made; the message says why."""


def new_id() -> str:
    return secrets.token_hex(4)


def _check_id(cluster_id: str) -> str:
    if not _ID.fullmatch(cluster_id):
        raise ValueError(f"network id {cluster_id!r}: 8 lowercase hex digits (see new_id())")
    return cluster_id


def bridge_name(cluster_id: str) -> str:
    return f"{PREFIX}{_check_id(cluster_id)}b"


def namespace_name(cluster_id: str, index: int) -> str:
    return f"{PREFIX}{_check_id(cluster_id)}n{index}"


def veth_name(cluster_id: str, index: int) -> str:
    return f"{PREFIX}{_check_id(cluster_id)}v{index}"


def _command(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), _SYSTEM_PATH]))


def _run(argv: Sequence[str]) -> str:
    """Run one command; its stdout, or NetnsError naming the command and quoting its stderr."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{shlex.join(argv)}` could not run: {exc}") from exc
    if result.returncode != 0:
        raise NetnsError(
            f"`{shlex.join(argv)}` failed (exit {result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip() or 'no output'}"
        )
    return result.stdout


def ip(*args: str, namespace: str | None = None) -> str:
    """`ip [-n NAMESPACE] ARGS...`, with errors that say which command failed and why."""
    binary = _command("ip")
    if binary is None:
        raise NetnsError("no `ip` command (Debian package iproute2, in the common role)")
    return _run([binary, *(["-n", namespace] if namespace else []), *args])


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = ip("-j", *args).strip()
    found: list[dict[str, Any]] = json.loads(out) if out else []
    return found


# -- what may run where -------------------------------------------------------------------------


@dataclass(frozen=True)
class Isolation:
    """How an ensemble's members are isolated from each other, and why."""

    mode: Mode
    requested: str
    reason: str

    def describe(self) -> dict[str, str]:
        return {"mode": self.mode, "requested": self.requested, "reason": self.reason}


def decide(requested: str = "auto", *, euid: int | None = None) -> Isolation:
    """`auto`: namespaces if this process can make them, else plain processes on 127.0.0.1;
    `netns`: namespaces or NetnsUnavailable; `none`: plain processes. `euid` stands in for this
    process's effective user id (default: the actual one), so a caller can ask "as non-root"."""
    if requested not in REQUESTS:
        raise ValueError(f"isolation {requested!r}: choose one of {', '.join(REQUESTS)}")
    if requested == "none":
        return Isolation(
            "none", requested, f"isolation 'none' was asked for: plain processes on {LOOPBACK}"
        )
    problem = unavailable_because(euid)
    if problem is None:
        return Isolation(
            "netns", requested, "root with a working `ip netns`: one network namespace per member"
        )
    if requested == "netns":
        raise NetnsUnavailable(f"network namespaces cannot be used here: {problem}")
    return Isolation("none", requested, f"{problem}: plain processes on {LOOPBACK}")


def unavailable_because(euid: int | None = None) -> str | None:
    """Why namespaces cannot be made by this process, or None if they can."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return f"not root (euid {euid}): network namespaces need root"
    if _command("ip") is None:
        return "no `ip` command (Debian package iproute2)"
    return _probe()


@functools.cache
def _probe() -> str | None:
    """Make and delete what a network needs: a namespace (root is not enough in a container
    without CAP_SYS_ADMIN), a bridge and a veth into the namespace (a kernel may lack the
    modules, as the Soft-RoCE lane's guest does)."""
    cluster_id = new_id()
    ns = namespace_name(cluster_id, 0)
    try:
        with _locked():
            _claim(cluster_id)
        ip("netns", "add", ns)
        ip("link", "add", bridge_name(cluster_id), "type", "bridge")
        veth = veth_name(cluster_id, 0)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    except (NetnsError, OSError) as exc:
        return f"network namespaces with a bridge and veths do not work here ({exc})"
    finally:
        with contextlib.suppress(NetnsError, OSError):
            cleanup(cluster_id)
    return None


# -- owner records, the lock, leftovers --------------------------------------------------------


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise subnet choice and sweeps across processes (and threads: one open file each)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _owner_file(cluster_id: str) -> Path:
    return STATE_DIR / f"{_check_id(cluster_id)}.owner"


def _claim(cluster_id: str) -> None:
    """Record this process as the owner, before anything of the cluster exists."""
    me = ProcessIdentity.of(os.getpid())
    assert me is not None
    _owner_file(cluster_id).write_text(json.dumps({"pid": me.pid, "start": me.start}) + "\n")


def _owner_alive(cluster_id: str) -> bool:
    try:
        raw = json.loads(_owner_file(cluster_id).read_text())
    except (OSError, ValueError):
        return False
    return ProcessIdentity(int(raw["pid"]), int(raw["start"])).alive()


def owned_by(pid: int) -> list[str]:
    """Ids of the clusters whose owner record names process `pid` (not yet cleaned up)."""
    owned = []
    for path in sorted(STATE_DIR.glob("*.owner")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            if _ID.fullmatch(path.stem) and int(json.loads(path.read_text())["pid"]) == pid:
                owned.append(path.stem)
    return owned


def leftovers(cluster_id: str | None = None) -> list[str]:
    """Names of the namespaces and links of `cluster_id` (default: of every cluster) that exist."""
    return [name for name, owner, _kind in _objects() if cluster_id in (None, owner)]


def _objects() -> list[tuple[str, str, str]]:
    """(name, cluster id, kind: b, v or n) of every object named like ours on this host."""
    names = [entry["name"] for entry in _ip_json("netns", "list")]
    names += [entry["ifname"] for entry in _ip_json("link", "show")]
    return [
        (name, match.group(1), match.group(2))
        for name in names
        if (match := _NAME.fullmatch(name)) is not None
    ]


def cleanup(cluster_id: str, *, grace: float = 5.0) -> list[str]:
    """Remove everything of cluster `cluster_id`, whoever made it; return what was removed.

    Kills (SIGKILL) any process still inside its namespaces first: a namespace outlives `ip
    netns del` while a process is in it, and so does its veth. Goes on past failures and raises
    NetnsError listing them at the end.
    """
    removed: list[str] = []
    errors: list[str] = []
    for kind in ("n", "v", "b"):  # a veth is gone with its namespace, unless a process held it
        for name, owner, what in _objects():
            if owner != cluster_id or what != kind:
                continue
            try:
                if kind == "n":
                    _kill_inside(name, grace)
                    ip("netns", "del", name)
                else:
                    ip("link", "del", name)
                removed.append(name)
            except NetnsError as exc:
                if name in leftovers(cluster_id):  # not merely gone with its peer meanwhile
                    errors.append(str(exc))
    _owner_file(cluster_id).unlink(missing_ok=True)
    if errors:
        raise NetnsError(f"cleanup of network {cluster_id} incomplete: " + "; ".join(errors))
    return removed


def _kill_inside(namespace: str, grace: float) -> None:
    deadline = time.monotonic() + grace
    while pids := [int(p) for p in ip("netns", "pids", namespace).split()]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            raise NetnsError(f"processes {pids} in namespace {namespace} survive SIGKILL")
        time.sleep(0.02)


def sweep() -> list[str]:
    """Remove the namespaces and links of every cluster whose creating process is gone."""
    with _locked():
        return _sweep()


def _sweep() -> list[str]:
    """The sweep proper, under the lock. A cluster that cannot be removed is logged and left:
    someone else's leftover must not stop a new cluster from being made."""
    ids = {owner for _name, owner, _kind in _objects()}
    ids |= {path.stem for path in STATE_DIR.glob("*.owner") if _ID.fullmatch(path.stem)}
    removed = []
    for cluster_id in sorted(ids):
        if not _owner_alive(cluster_id):
            try:
                removed += cleanup(cluster_id)
            except NetnsError as exc:
                log.warning("sweep: %s", exc)
    return removed


# -- one cluster's network ---------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    index: int
    namespace: str
    veth: str
    address: str


@dataclass(eq=False)  # identity: one object per live network (kept in a WeakSet)
class Network:
    """The bridge and namespaces of one cluster; `destroy()` (idempotent) removes them."""

    cluster_id: str
    subnet: ipaddress.IPv4Network
    bridge: str
    gateway: str
    members: tuple[Member, ...]
    cuts: set[tuple[int, int]] = field(default_factory=set)
    destroyed: bool = False

    @classmethod
    def create(cls, cluster_id: str, members: int, *, subnet: str | None = None) -> Network:
        """Make the bridge and `members` namespaces; on any failure remove what was made."""
        if not 1 <= members <= MAX_MEMBERS:
            raise ValueError(f"members must be between 1 and {MAX_MEMBERS}, not {members}")
        bridge = bridge_name(cluster_id)
        assert len(veth_name(cluster_id, members - 1)) < IFNAMSIZ
        try:
            with _locked():
                _sweep()
                if leftovers(cluster_id) or _owner_file(cluster_id).exists():
                    raise FileExistsError(f"network id {cluster_id} is in use (take new_id())")
                _claim(cluster_id)
                chosen = _choose_subnet(cluster_id, subnet)
                hosts = list(chosen.hosts())
                network = cls(
                    cluster_id,
                    chosen,
                    bridge,
                    str(hosts[0]),
                    tuple(
                        Member(
                            i,
                            namespace_name(cluster_id, i),
                            veth_name(cluster_id, i),
                            str(hosts[i + 1]),
                        )
                        for i in range(members)
                    ),
                )
                # The bridge's address makes the /24 a route, which is what the next
                # cluster's choice (after this lock) looks at.
                ip("link", "add", bridge, "type", "bridge")
                ip("addr", "add", f"{network.gateway}/{chosen.prefixlen}", "dev", bridge)
                ip("link", "set", bridge, "up")
            for member in network.members:
                network._add(member)
        except FileExistsError:
            raise  # someone else's: not ours to clean up
        except BaseException:
            with contextlib.suppress(NetnsError, OSError):
                cleanup(cluster_id)
            raise
        _LIVE.add(network)
        return network

    def _add(self, member: Member) -> None:
        ns = member.namespace
        ip("netns", "add", ns)
        ip("link", "add", member.veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", member.veth, "master", self.bridge, "up")
        ip("addr", "add", f"{member.address}/{self.subnet.prefixlen}", "dev", "eth0", namespace=ns)
        ip("link", "set", "eth0", "up", namespace=ns)
        ip("link", "set", "lo", "up", namespace=ns)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def address(self, index: int) -> str:
        return self.members[index].address

    def exec_argv(self, index: int, argv: Sequence[str]) -> tuple[str, ...]:
        """`argv` as a command that runs it inside member `index`'s namespace (same PID)."""
        binary = _command("ip")
        assert binary is not None, "checked by decide()"
        return (binary, "netns", "exec", self.members[index].namespace, *argv)

    def cut(self, i: int, j: int) -> None:
        """Drop every packet between members i and j (both directions) until `heal`."""
        pair = self._pair(i, j)
        if pair in self.cuts:
            return
        for rule in self._rules(*pair):
            self._iptables(pair[0], "-I", *rule)
        self.cuts.add(pair)

    def heal(self, i: int | None = None, j: int | None = None) -> None:
        """Undo `cut(i, j)`, or every cut when called without members."""
        if i is None or j is None:
            pairs = sorted(self.cuts)
        else:
            pairs = [self._pair(i, j)] if self._pair(i, j) in self.cuts else []
        for pair in pairs:
            for rule in self._rules(*pair):
                self._iptables(pair[0], "-D", *rule)
            self.cuts.discard(pair)

    def _pair(self, i: int, j: int) -> tuple[int, int]:
        if i == j or not (0 <= i < len(self.members) and 0 <= j < len(self.members)):
            raise ValueError(f"cut/heal needs two different members of {len(self.members)}")
        return (min(i, j), max(i, j))

    def _rules(self, i: int, j: int) -> list[tuple[str, ...]]:
        """Rules for member i's namespace that cut it off from member j."""
        peer = self.members[j].address
        return [("INPUT", "-s", peer, "-j", "DROP"), ("OUTPUT", "-d", peer, "-j", "DROP")]

    def _iptables(self, index: int, *args: str) -> None:
        binary = _command("iptables")
        if binary is None:
            raise NetnsError(
                "cutting links needs iptables, which is not installed (Debian package iptables,"
                " in the common role: `invoke setup --only common`)"
            )
        _run(self.exec_argv(index, [binary, "-w", *args]))

    def describe(self) -> dict[str, Any]:
        return {
            "subnet": str(self.subnet),
            "bridge": self.bridge,
            "bridge_address": self.gateway,
            "namespaces": {str(m.index): m.namespace for m in self.members},
            "addresses": {str(m.index): m.address for m in self.members},
        }

    def destroy(self) -> None:
        if self.destroyed:
            return
        cleanup(self.cluster_id)
        self.destroyed = True
        _LIVE.discard(self)


def _choose_subnet(cluster_id: str, wanted: str | None) -> ipaddress.IPv4Network:
    """`wanted`, or the first /24 of SUPERNET from a place given by the id, that overlaps no
    route (any table) or address of this host."""
    taken = _taken()
    if wanted is not None:
        subnet = ipaddress.IPv4Network(wanted)
        clash = next((t for t in taken if t.overlaps(subnet)), None)
        if clash is not None:
            raise NetnsError(f"subnet {subnet} overlaps {clash}, already routed on this host")
        return subnet
    candidates = list(SUPERNET.subnets(new_prefix=24))
    start = int(cluster_id, 16) % len(candidates)
    for subnet in candidates[start:] + candidates[:start]:
        if not any(t.overlaps(subnet) for t in taken):
            return subnet
    raise NetnsError(f"no free /24 left in {SUPERNET}: every one overlaps a route of this host")


def _taken() -> list[ipaddress.IPv4Network]:
    found = []
    for route in _ip_json("-4", "route", "show", "table", "all"):
        if route.get("dst") not in (None, "default"):
            found.append(ipaddress.IPv4Network(route["dst"], strict=False))
    for link in _ip_json("-4", "addr", "show"):
        for info in link.get("addr_info", []):
            found.append(
                ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
            )
    return found


@atexit.register
def _destroy_leftover_networks() -> None:
    for network in list(_LIVE):
        with contextlib.suppress(NetnsError, OSError):
            network.destroy()
