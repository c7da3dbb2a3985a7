"""What every baseline that runs one server process per replica on this host has in common.

ZooKeeper and etcd differ only in their command lines, their readiness probe, their client and
what `describe()` adds; the life cycle (data directories, launching, readiness, teardown, fault
injection, which server a new client talks to) lives here once.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from gaia.cluster.procs import ManagedProcess, ProcessGroup, ProcessSpec

MAX_REPLICAS = 9

# Durability policies as results files name them (DESIGN: "explicit in every experiment").
# Both servers fsync their log before acknowledging, batching concurrent writes into one fsync.
GROUP_COMMIT = "group-commit"
# Written to the log but never fsynced: survives a server crash, not a machine crash.
NO_FSYNC = "no-fsync"


class LocalEnsemble(ABC):
    """N server processes on loopback, each with its own data directory, logs under `log_dir`.

    Data directories go under `data_root`, or under a fresh temporary directory that `stop()`
    removes: they hold preallocated logs nobody needs after the run, whereas `log_dir` (commands,
    configuration files, outputs, exit codes) is kept with the results.
    """

    name: str

    def __init__(
        self,
        replicas: int,
        log_dir: Path,
        *,
        data_root: Path | None,
        start_timeout: float,
    ) -> None:
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")
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
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            data_root = self._data_root
            if data_root is None:
                data_root = self._temp_root = Path(tempfile.mkdtemp(prefix=f"gaia-{self.name}-"))
            for spec in self._server_specs(data_root.resolve()):
                self.servers.append(self._group.launch(spec))
            self._group.wait_ready(
                self._not_ready,
                timeout=self.start_timeout,
                what=f"{self.name} (replicas={self.replicas})",
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop and reap every server, then drop temporary data; idempotent."""
        try:
            if self._group is not None:
                try:
                    if any(server.running() for server in self.servers):
                        self._group.stop(self._stop_first())
                finally:
                    self._group.stop()
        finally:
            if self._temp_root is not None:
                shutil.rmtree(self._temp_root, ignore_errors=True)
                self._temp_root = None

    def kill(self, index: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Fault injection: crash server `index` (0-based; SIGKILL by default) and reap it."""
        if self._group is None:
            raise RuntimeError(f"{self.name} is not running")
        self._group.stop([self.servers[index]], first_signal=sig)

    def describe(self) -> Mapping[str, Any]:
        return {"system": self.name, "replicas": self.replicas, **self._details()}

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
