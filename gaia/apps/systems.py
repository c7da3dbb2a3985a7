"""The unreplicated baselines of the app experiments: one unmodified server, nothing else.

`redis`, `memcached` and `mongodb` start the very command line a replica daemon starts for its
own server (gaia.apps.APPS), without the shim and without replicas, so an overhead measured
against them is the cost of APUS and nothing else. They serve only the app's own clients
(gaia.systems.ServesApp); the experiments drive them with the app's load tool. A server that is
not installed here (MongoDB: not in Debian) makes the factory raise SystemUnavailable, which
the runner records as "not run here".
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gaia.apps import listening, require_app
from gaia.cluster.procs import ManagedProcess, ProcessGroup, ProcessSpec, free_ports
from gaia.systems import ConsensusClient

HOST = "127.0.0.1"


class AppServer:
    """One server of `app` on loopback; its data directory is temporary, its logs in log_dir."""

    def __init__(
        self, replicas: int, log_dir: Path, *, app: str, start_timeout: float = 20.0
    ) -> None:
        if replicas != 1:
            raise ValueError(f"unreplicated {app} is a single server: replicas must be 1")
        self.app = require_app(app)
        self.name = app
        self.replicas = 1
        self.log_dir = log_dir.resolve()
        self.start_timeout = start_timeout
        self._group: ProcessGroup | None = None
        self._server: ManagedProcess | None = None
        self._workdir: Path | None = None
        self._port = 0

    def start(self) -> None:
        if self._group is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._group = ProcessGroup(self.log_dir)
        try:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"gaia-{self.name}-"))
            (self._port,) = free_ports(1)
            argv = self.app.argv(HOST, self._port, self._workdir)
            self._server = self._group.launch(
                ProcessSpec(self.name, tuple(argv), cwd=self._workdir)
            )
            server = self._server
            self._group.wait_ready(
                lambda: [] if listening(self._port) else [server],
                timeout=self.start_timeout,
                what=f"{self.name} (unreplicated)",
                interval=0.02,
            )
        except BaseException:
            self.stop()
            raise

    def app_address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError(f"{self.name} is not running")
        return HOST, self._port

    def client(self) -> ConsensusClient:
        raise RuntimeError(
            f"unreplicated {self.name} has no consensus client: drive it with its load tool "
            "(the definition's workload.tool)"
        )

    def stop(self) -> None:
        try:
            if self._group is not None:
                self._group.stop()
        finally:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def describe(self) -> Mapping[str, Any]:
        return {
            "system": self.name,
            "replicas": 1,
            "app": self.app.name,
            "argv": self.app.argv(HOST, self._port, Path("DATA")),
            "durability": self.app.durability,
        }


SYSTEMS: Mapping[str, Any] = MappingProxyType(
    {name: partial(AppServer, app=name) for name in ("redis", "memcached", "mongodb")}
)
