"""ZooKeeper baseline: an N-server ensemble on this host (Debian's ZooKeeper 3.8), a kazoo client.

The servers run in quorum mode even for N = 1 (`standaloneEnabled=false`), so every size goes
through the same Zab path and has a leader. A write is a synchronous `set` of the client's own
znode, as zk-smoketest measures it: one Zab proposal, acknowledged after a quorum logged it.
"""

from __future__ import annotations

import functools
import re
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kazoo.client import KazooClient

from gaia.cluster.ensemble import GROUP_COMMIT, NO_FSYNC, LocalEnsemble
from gaia.cluster.netns import Isolation
from gaia.cluster.procs import ManagedProcess, ProcessSpec, free_ports
from gaia.systems import SystemUnavailable

SERVER_SCRIPT = Path("/usr/share/zookeeper/bin/zkServer.sh")
# Debian's zkServer.sh classpath (zkEnv.sh) has no SLF4J binding, so the server would log
# nothing at all. The JVM honours the last -cp it is given, so SERVER_JVMFLAGS can repeat the
# script's classpath with the log4j binding (both are dependencies of libzookeeper-java) added;
# log4j.properties comes from /etc/zookeeper/conf and logs to stdout with the CONSOLE appender.
SERVER_CLASSPATH = ":".join(
    (
        "/etc/zookeeper/conf",
        "/usr/share/java/zookeeper.jar",
        "/usr/share/java/slf4j-log4j12.jar",
        "/usr/share/java/log4j-1.2.jar",
    )
)
KEY_PREFIX = "/gaia"


@dataclass(frozen=True)
class Server:
    """Where one server listens: its host (namespace address or 127.0.0.1) and three ports."""

    host: str
    client: int
    peer: int
    election: int


def zoo_cfg(
    data_dir: Path,
    own: Server,
    ensemble: Sequence[Server],
    *,
    force_sync: bool,
    tick_ms: int,
) -> str:
    """One server's zoo.cfg. Keys ZooKeeper does not know itself, like forceSync, become
    `zookeeper.*` system properties, which is where the transaction log reads forceSync."""
    lines = [
        f"tickTime={tick_ms}",
        "initLimit=10",
        "syncLimit=5",
        f"dataDir={data_dir}",
        f"clientPort={own.client}",
        f"clientPortAddress={own.host}",
        "maxClientCnxns=0",  # every benchmark client connects from the same address
        "standaloneEnabled=false",
        "admin.enableServer=false",
        "4lw.commands.whitelist=srvr,stat,ruok",
        f"forceSync={'yes' if force_sync else 'no'}",
    ]
    lines += [
        f"server.{myid}={server.host}:{server.peer}:{server.election}"
        for myid, server in enumerate(ensemble, start=1)
    ]
    return "\n".join(lines) + "\n"


def four_letter_word(host: str, port: int, word: str, timeout: float = 1.0) -> str:
    """Send a four-letter command (e.g. `srvr`) to a server's client port; return its answer."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(word.encode())
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def server_mode(host: str, port: int) -> str | None:
    """`leader` or `follower` from `srvr`, or None while the server does not serve."""
    try:
        answer = four_letter_word(host, port, "srvr")
    except OSError:
        return None
    match = re.search(r"^Mode: (\S+)", answer, re.MULTILINE)
    return match.group(1) if match else None


@functools.cache
def zookeeper_version(server_script: Path) -> str:
    """The installed version as `zkServer.sh version` reports it (e.g. "3.8.0")."""
    result = subprocess.run(
        [str(server_script), "version"], capture_output=True, text=True, check=True
    )
    match = re.search(r"version (\S+)", result.stdout)
    if match is None:
        raise RuntimeError(f"cannot read a version from {server_script}: {result.stdout!r}")
    return match.group(1)


class ZooKeeperClient:
    """One kazoo session. Each `submit` sets this client's own znode and returns once the
    leader has committed it (kazoo's synchronous `set`)."""

    def __init__(self, hosts: str, key: str, timeout: float) -> None:
        self.key = key
        # Hosts are already in the order this client should try them: no shuffling.
        self._zk = KazooClient(hosts=hosts, randomize_hosts=False, timeout=timeout)
        self._zk.start(timeout=timeout)
        try:
            self._zk.ensure_path(key)
        except BaseException:
            self.close()
            raise

    def submit(self, payload: bytes) -> None:
        self._zk.set(self.key, payload)

    def read(self, key: str) -> tuple[bytes, int]:
        """The latest value of `key` and how many writes it has had, after a `sync` so that a
        client on a lagging follower still sees every committed write."""
        self._zk.sync(key)
        data, stat = self._zk.get(key)
        return bytes(data), int(stat.version)

    def close(self) -> None:
        self._zk.stop()
        self._zk.close()


class ZooKeeper(LocalEnsemble):
    """N ZooKeeper servers started with `zkServer.sh start-foreground` (the script execs the
    JVM, so the process we reap is the server itself)."""

    def __init__(
        self,
        replicas: int,
        log_dir: Path,
        *,
        force_sync: bool = True,
        heap_mb: int = 256,
        tick_ms: int = 2000,
        session_timeout: float = 10.0,
        server_script: Path = SERVER_SCRIPT,
        data_root: Path | None = None,
        start_timeout: float = 60.0,
        isolation: str | Isolation = "auto",
    ) -> None:
        if not server_script.is_file():
            raise SystemUnavailable(
                f"ZooKeeper is not installed: {server_script} is missing "
                "(Debian packages zookeeper and zookeeperd; `invoke setup` installs them)"
            )
        super().__init__(replicas, log_dir, data_root, start_timeout, isolation)
        self.name = "zookeeper" if force_sync else "zookeeper-nosync"
        self.force_sync = force_sync
        self.heap = f"-Xms{min(64, heap_mb)}m -Xmx{heap_mb}m"
        self.tick_ms = tick_ms
        self.session_timeout = session_timeout
        self.server_script = server_script
        self.ports: list[Server] = []

    def _server_specs(self, data_root: Path) -> list[ProcessSpec]:
        ports = free_ports(3 * self.replicas)
        self.ports = [Server(self.host(i), *ports[3 * i : 3 * i + 3]) for i in range(self.replicas)]
        specs = []
        for myid, own in enumerate(self.ports, start=1):
            name = f"zk{myid}"
            data_dir = data_root / name
            data_dir.mkdir(parents=True)  # never reuse another run's state: FileExistsError
            (data_dir / "myid").write_text(f"{myid}\n")
            config = self.log_dir / f"{name}.zoo.cfg"
            config.write_text(
                zoo_cfg(
                    data_dir,
                    own,
                    self.ports,
                    force_sync=self.force_sync,
                    tick_ms=self.tick_ms,
                )
            )
            jvm_flags = f"{self.heap} -cp {SERVER_CLASSPATH} -Dzookeeper.root.logger=INFO,CONSOLE"
            specs.append(
                ProcessSpec(
                    name=name,
                    argv=(str(self.server_script), "start-foreground", str(config)),
                    env={"SERVER_JVMFLAGS": jvm_flags, "JMXDISABLE": "true"},
                    cwd=data_dir,  # where a heap dump on OutOfMemoryError would land
                )
            )
        return specs

    def modes(self) -> list[str | None]:
        """Each server's mode (`leader`, `follower`, or None if it does not answer)."""
        return [
            server_mode(ports.host, ports.client) if server.running() else None
            for server, ports in zip(self.servers, self.ports, strict=True)
        ]

    def _not_ready(self) -> list[ManagedProcess]:
        modes = self.modes()
        silent = [s for s, mode in zip(self.servers, modes, strict=True) if mode is None]
        if silent:
            return silent
        return [] if modes.count("leader") == 1 else list(self.servers)

    def client(self, first: int | None = None) -> ZooKeeperClient:
        """A new session that tries server `first` (default: round robin) and fails over to
        the others in order."""
        number, start = self._next_client(first)
        order = self.ports[start:] + self.ports[:start]
        hosts = ",".join(f"{ports.host}:{ports.client}" for ports in order)
        return ZooKeeperClient(hosts, f"{KEY_PREFIX}/client-{number}", self.session_timeout)

    def _details(self) -> Mapping[str, Any]:
        return {
            "version": zookeeper_version(self.server_script),
            "force_sync": "yes" if self.force_sync else "no",
            "durability": GROUP_COMMIT if self.force_sync else NO_FSYNC,
            "jvm_heap": self.heap,
            "tick_ms": self.tick_ms,
        }
