"""etcd baseline: an N-member cluster on this host (Debian's etcd 3.4) and a JSON-gateway client.

A write is one `put` through the v3 JSON gateway (/v3/kv/put, base64 keys and values) over a
kept-alive HTTP connection: it returns after the Raft leader committed the entry to a majority
and applied it. The gateway is the v3 API itself, so plain http.client suffices and no client
library's own overhead sits in the measured path.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gaia.cluster.ensemble import GROUP_COMMIT, NO_FSYNC, LocalEnsemble
from gaia.cluster.netns import Isolation
from gaia.cluster.procs import ManagedProcess, ProcessSpec, free_ports
from gaia.systems import SystemUnavailable

KEY_PREFIX = "gaia"
# etcd 3.4 accepts --unsafe-no-fsync (backported from 3.5) but leaves it out of --help.
NO_FSYNC_FLAG = "--unsafe-no-fsync"


class EtcdError(RuntimeError):
    """The gateway answered a request with something other than success."""


@dataclass(frozen=True)
class Member:
    """Where one member listens: its host (namespace address or 127.0.0.1) and two ports."""

    host: str
    client: int
    peer: int

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def call(conn: http.client.HTTPConnection, path: str, body: Mapping[str, Any] | None = None) -> Any:
    """POST `body` as JSON to the gateway (GET without a body) and return the decoded answer."""
    if body is None:
        conn.request("GET", path)
    else:
        # Bytes, not str: http.client then sends headers and body in one segment, which keeps
        # Nagle and delayed ACKs out of the measured latency.
        headers = {"Content-Type": "application/json"}
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
    response = conn.getresponse()
    data = response.read()
    if response.status != http.client.OK:
        raise EtcdError(f"{path}: HTTP {response.status}: {data[:500]!r}")
    return json.loads(data)


def probe(member: Member, path: str, body: Mapping[str, Any] | None = None) -> Any:
    """One request on a fresh connection; None if the member does not answer it (yet)."""
    conn = http.client.HTTPConnection(member.host, member.client, timeout=1.0)
    try:
        return call(conn, path, body)
    except (OSError, ValueError, http.client.HTTPException, EtcdError):
        return None
    finally:
        conn.close()


def member_status(member: Member) -> tuple[str, str] | None:
    """(this member's id, the leader's id as it sees it; "0" for none), or None if silent."""
    status = probe(member, "/v3/maintenance/status", {})
    if status is None:
        return None
    return str(status["header"]["member_id"]), str(status.get("leader", "0"))


def member_leader(member: Member) -> str | None:
    """The leader's id as this member sees it, or None while it is unhealthy or leaderless.

    /health is true only once the member has a leader and can serve a quorum read; the status
    call then names the leader, so the caller can check that all members agree on it.
    """
    health = probe(member, "/health")
    status = member_status(member) if health and health.get("health") == "true" else None
    return None if status is None or status[1] == "0" else status[1]


@functools.cache
def etcd_version(binary: str) -> str:
    """The installed version as `etcd --version` reports it (e.g. "3.4.23")."""
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    match = re.search(r"etcd Version: (\S+)", result.stdout)
    if match is None:
        raise RuntimeError(f"cannot read a version from {binary}: {result.stdout!r}")
    return match.group(1)


@functools.cache
def supports_no_fsync(binary: str) -> bool:
    """Whether this etcd accepts --unsafe-no-fsync (its flag parser rejects unknown flags)."""
    result = subprocess.run([binary, NO_FSYNC_FLAG, "--version"], capture_output=True, check=False)
    return result.returncode == 0


class EtcdClient:
    """One kept-alive HTTP connection to one member; each `submit` puts this client's key."""

    def __init__(self, member: Member, key: str, timeout: float) -> None:
        self.key = key
        self._key = _b64(key.encode())
        self._conn = http.client.HTTPConnection(member.host, member.client, timeout=timeout)
        self._conn.connect()
        self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def submit(self, payload: bytes) -> None:
        call(self._conn, "/v3/kv/put", {"key": self._key, "value": _b64(payload)})

    def read(self, key: str) -> tuple[bytes, int]:
        """The latest value of `key` and how many writes it has had (a linearizable read)."""
        answer = call(self._conn, "/v3/kv/range", {"key": _b64(key.encode())})
        kvs = answer.get("kvs", [])
        if not kvs:
            raise KeyError(key)
        # Absent fields are zero values in the gateway's JSON; int64s are strings.
        return base64.b64decode(kvs[0].get("value", "")), int(kvs[0].get("version", 0))

    def close(self) -> None:
        self._conn.close()


class Etcd(LocalEnsemble):
    """N etcd members, each its own process and data directory, bootstrapped as a new cluster."""

    def __init__(
        self,
        replicas: int,
        log_dir: Path,
        *,
        fsync: bool = True,
        request_timeout: float = 10.0,
        binary: str = "etcd",
        data_root: Path | None = None,
        start_timeout: float = 30.0,
        isolation: str | Isolation = "auto",
    ) -> None:
        path = shutil.which(binary)
        if path is None:
            raise SystemUnavailable(
                f"etcd is not installed: no {binary!r} on PATH "
                "(Debian package etcd-server; `invoke setup` installs it)"
            )
        if not fsync and not supports_no_fsync(path):
            raise SystemUnavailable(
                f"etcd {etcd_version(path)} has no {NO_FSYNC_FLAG}: "
                "etcd without fsync cannot run on this target"
            )
        super().__init__(replicas, log_dir, data_root, start_timeout, isolation)
        self.name = "etcd" if fsync else "etcd-nosync"
        self.fsync = fsync
        self.request_timeout = request_timeout
        self.binary = path
        self.ports: list[Member] = []

    def _server_specs(self, data_root: Path) -> list[ProcessSpec]:
        ports = free_ports(2 * self.replicas)
        self.ports = [Member(self.host(i), *ports[2 * i : 2 * i + 2]) for i in range(self.replicas)]
        initial_cluster = ",".join(
            f"e{index}={member.peer_url}" for index, member in enumerate(self.ports, start=1)
        )
        # A fresh token per cluster: members of another run can never join this one.
        token = f"gaia-{uuid.uuid4().hex[:12]}"
        specs = []
        for index, member in enumerate(self.ports, start=1):
            name = f"e{index}"
            # Created here, not by etcd, so stale data under a given data_root is refused
            # (FileExistsError) instead of silently rejoining a cluster that no longer exists.
            (data_root / name).mkdir(mode=0o700, parents=True)
            client_url, peer_url = member.client_url, member.peer_url
            argv = [
                self.binary,
                f"--name={name}",
                f"--data-dir={data_root / name}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster={initial_cluster}",
                "--initial-cluster-state=new",
                f"--initial-cluster-token={token}",
                "--logger=zap",  # 3.4's default logger only prints a deprecation warning first
            ]
            if not self.fsync:
                argv.append(NO_FSYNC_FLAG)
            specs.append(ProcessSpec(name=name, argv=tuple(argv), cwd=data_root))
        return specs

    def _not_ready(self) -> list[ManagedProcess]:
        leaders = [member_leader(member) for member in self.ports]
        leaderless = [s for s, leader in zip(self.servers, leaders, strict=True) if leader is None]
        if leaderless:
            return leaderless
        return [] if len(set(leaders)) == 1 else list(self.servers)

    def _stop_first(self) -> list[ManagedProcess]:
        """The followers: stopped together with them, the leader spends 7 s trying to hand its
        leadership to a member that is shutting down; stopped after them, it finds no peer to
        hand it to and exits at once (teardown ~0.1 s instead of ~7 s)."""
        statuses = [
            member_status(member) if server.running() else None
            for server, member in zip(self.servers, self.ports, strict=True)
        ]
        leaders = {status[1] for status in statuses if status is not None}
        if len(leaders) != 1:
            return []
        return [
            server
            for server, status in zip(self.servers, statuses, strict=True)
            if status is not None and status[0] not in leaders
        ]

    def client(self, first: int | None = None) -> EtcdClient:
        """A new connection to member `first` (default: round robin)."""
        number, member = self._next_client(first)
        return EtcdClient(self.ports[member], f"{KEY_PREFIX}/client-{number}", self.request_timeout)

    def _details(self) -> Mapping[str, Any]:
        return {
            "version": etcd_version(self.binary),
            "unsafe_no_fsync": not self.fsync,
            "unsafe_no_fsync_supported": supports_no_fsync(self.binary),
            "durability": GROUP_COMMIT if self.fsync else NO_FSYNC,
        }
