"""What every system that runs one server process per replica on this host has in common.

ZooKeeper, etcd and APUS differ only in their command lines, their readiness probe, their client
and what `describe()` adds; the life cycle (isolation, data directories, launching, readiness,
teardown, fault injection, which server a new client talks to) lives here once, so every system
of a comparison runs isolated the same way.

Isolation (`isolation=`, recorded in `describe()["isolation"]` with its reason): `netns` puts
each server in a network namespace of its own (gaia.cluster.netns) at `host(i)`, reached from
this process through a bridge, and makes `cut`/`heal` possible; `none` runs plain processes on
127.0.0.1; `auto` (the default) is `netns` where this process can make namespaces (root), else
`none`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import shutil
import signal
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from gaia.cluster import netns
from gaia.cluster.procs import ManagedProcess, ProcessGroup, ProcessGroupError, ProcessSpec

MAX_REPLICAS = 9

# Durability policies as results files name them (DESIGN: "explicit in every experiment").
# Both servers fsync their log before acknowledging, batching concurrent writes into one fsync.
GROUP_COMMIT = "group-commit"
# Written to the log but never fsynced: survives a server crash, not a machine crash.
NO_FSYNC = "no-fsync"

_STARTED: weakref.WeakSet[LocalEnsemble] = weakref.WeakSet()


class LocalEnsemble(ABC):
    """N server processes on this host, each with its own data directory, logs under `log_dir`.

    Data directories go under `data_root`, or under a fresh temporary directory that `stop()`
    removes: they hold preallocated logs nobody needs after the run, whereas `log_dir` (commands,
    configuration files, outputs, exit codes) is kept with the results.
    """

    name: str

    def __init__(
        self,
        replicas: int,
        log_dir: Path,
        data_root: Path | None,
        start_timeout: float,
        isolation: str | netns.Isolation = "auto",
    ) -> None:
        """`isolation`: "auto", "netns" or "none" (see the module), or a decision already made
        (`netns.decide(...)`); "netns" where it cannot be had raises NetnsUnavailable, a
        SystemUnavailable."""
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")
        self.isolation = (
            isolation if isinstance(isolation, netns.Isolation) else netns.decide(isolation)
        )
        self.network_id = netns.new_id()
        self.network: netns.Network | None = None
        self.replicas = replicas
        # Absolute, because servers get paths from it in their configuration.
        self.log_dir = log_dir.resolve()
        self.start_timeout = start_timeout
        self.servers: list[ManagedProcess] = []
        self._data_root = data_root
        self._temp_root: Path | None = None
        self._group: ProcessGroup | None = None
        self._clients_opened = 0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch every server and return once the ensemble serves; on any failure (including
        Ctrl-C) stop whatever was started before re-raising."""
        if self._group is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._group = ProcessGroup(self.log_dir)
        _STARTED.add(self)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if self.isolation.mode == "netns":
                self.network = netns.Network.create(self.network_id, self.replicas)
            data_root = self._data_root
            if data_root is None:
                data_root = self._temp_root = Path(tempfile.mkdtemp(prefix=f"gaia-{self.name}-"))
            for index, spec in enumerate(self._server_specs(data_root.resolve())):
                self.servers.append(self._group.launch(self._placed(index, spec)))
            self._group.wait_ready(
                self._not_ready,
                timeout=self.start_timeout,
                what=f"{self.name} (replicas={self.replicas})",
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop and reap every server, then remove the namespaces and temporary data;
        idempotent."""
        try:
            if self._group is not None:
                try:
                    if any(server.running() for server in self.servers):
                        self._group.stop(self._stop_first())
                finally:
                    self._group.stop()
        finally:
            try:
                if self.network is not None:
                    self.network.destroy()
            finally:
                if self._temp_root is not None:
                    shutil.rmtree(self._temp_root, ignore_errors=True)
                    self._temp_root = None
                _STARTED.discard(self)

    def host(self, index: int) -> str:
        """The address server `index` listens on (its namespace's, or 127.0.0.1)."""
        return self.network.address(index) if self.network is not None else netns.LOOPBACK

    def _placed(self, index: int, spec: ProcessSpec) -> ProcessSpec:
        """`spec` as it runs in server `index`'s namespace (unchanged without namespaces)."""
        if self.network is None:
            return spec
        return dataclasses.replace(spec, argv=self.network.exec_argv(index, spec.argv))

    def kill(self, index: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Fault injection: crash server `index` (0-based; SIGKILL by default) and reap it."""
        if self._group is None:
            raise RuntimeError(f"{self.name} is not running")
        self._group.stop([self.servers[index]], first_signal=sig)

    def cut(self, i: int, j: int) -> None:
        """Fault injection: drop every packet between servers i and j (0-based) until `heal`.
        Needs namespaces (isolation "netns") and iptables."""
        self._running_network("cut").cut(i, j)

    def heal(self, i: int | None = None, j: int | None = None) -> None:
        """Undo `cut(i, j)`, or every cut."""
        self._running_network("heal").heal(i, j)

    def _running_network(self, what: str) -> netns.Network:
        if self.network is None or self.network.destroyed:
            raise RuntimeError(
                f"{what}: {self.name} has no network namespaces to cut links between "
                f"(isolation {self.isolation.mode}: {self.isolation.reason})"
            )
        return self.network

    def describe(self) -> Mapping[str, Any]:
        isolation: dict[str, Any] = self.isolation.describe()
        if self.network is not None:
            isolation |= self.network.describe()
        return {
            "system": self.name,
            "replicas": self.replicas,
            "isolation": isolation,
            **self._details(),
        }

    def _next_client(self, first: int | None) -> tuple[int, int]:
        """Number the next client (for its own key) and pick the server it talks to first:
        `first` if given, else round robin, so that a sweep over clients spreads them evenly
        and the same run always makes the same choice."""
        number = self._clients_opened
        self._clients_opened += 1
        return number, number % self.replicas if first is None else first

    def _stop_first(self) -> list[ManagedProcess]:
        """Servers to stop, all together, before the others; by default none."""
        return []

    @abstractmethod
    def _server_specs(self, data_root: Path) -> list[ProcessSpec]:
        """Write configuration files and return one command per server, in index order."""

    @abstractmethod
    def _not_ready(self) -> list[ManagedProcess]:
        """The servers that do not serve yet (all of them while no single leader is agreed)."""

    @abstractmethod
    def _details(self) -> Mapping[str, Any]:
        """Version, durability and tuning, for results files."""


@atexit.register
def _stop_leftover_ensembles() -> None:
    """Stop ensembles nobody stopped before the interpreter exits (servers first, gracefully,
    then their namespaces); registered after procs' and netns' hooks, so it runs before them."""
    for ensemble in list(_STARTED):
        with contextlib.suppress(ProcessGroupError, netns.NetnsError, OSError):
            ensemble.stop()
