"""A replica's own app server: started with the shim preloaded, fed by the replayer, stopped
with the daemon.

The server is the daemon's child (same process group, so the cluster's kill reaches it too), its
output goes to the daemon's stdout and stderr (the replica's logs). If it dies, the replica
cannot serve: `alive()` turns false and the daemon stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from gaia.apps import AppError, get_app, wait_listening
from gaia.apus.interpose.build import shim_library
from gaia.apus.interpose.replay import Replayer
from gaia.apus.interpose.segment import AppSegment, L

log = logging.getLogger("gaia.apus.host")

START_TIMEOUT_S = 20.0


class AppHost:
    def __init__(
        self,
        app: str,
        *,
        cluster_id: str,
        replica_id: int,
        address: tuple[str, int],
        workdir: Path,
        max_data: int,
    ) -> None:
        self.app = get_app(app)
        if shutil.which(self.app.binary) is None:
            raise AppError(f"{self.app.binary} is not installed: run ./invoke setup")
        self.address = address
        self.workdir = workdir
        self.segment = AppSegment(cluster_id, replica_id, max_data)
        self.proc: subprocess.Popen[bytes] | None = None
        self.replayer: Replayer | None = None
        # leader side: the shim's connection entry -> the connection id agreed at CONNECT
        self.conn_ids: dict[int, int] = {}
        self._next_conn = 0

    def start(self, report_output: Callable[[int, int], None]) -> None:
        """Start the server (shim preloaded, role NONE: it refuses clients until told)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, LD_PRELOAD=str(shim_library()), GAIA_SHIM_SEGMENT=self.segment.name)
        argv = self.app.argv(*self.address, self.workdir)
        log.info("starting %s: %s", self.app.name, " ".join(argv))
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, cwd=self.workdir)
        wait_listening(self.address[1], START_TIMEOUT_S, self.alive)
        if self.segment.server_pid != self.proc.pid:
            raise AppError(f"{self.app.name} runs, but the shim did not attach to it")
        self.replayer = Replayer(self.segment, self.address, report_output)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def new_conn_id(self, view: int) -> int:
        """A connection id no other leader can have chosen: unique per (view, counter)."""
        self._next_conn += 1
        return (view << 24) | (self._next_conn & 0xFFFFFF)

    @property
    def serving(self) -> bool:
        return self.segment.role == L["GAIA_ROLE_LEADER"]

    def serve(self, leading: bool) -> None:
        role = L["GAIA_ROLE_LEADER"] if leading else L["GAIA_ROLE_BACKUP"]
        if self.segment.role != role:
            log.info("%s now %s", self.app.name, "serves clients" if leading else "replays")
            self.segment.role = role

    def query(self, request: bytes, timeout: float = 2.0, quiet: float = 0.05) -> bytes:
        """Send a read-only request to this replica's server outside the log (on a registered
        connection, so even a backup's shim admits it) and return what it answered, read until
        it has been silent for `quiet` seconds."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((self.address[0], 0))
            entry = self.segment.register_replay(sock.getsockname()[1])
            try:
                sock.settimeout(timeout)
                sock.connect(self.address)
                sock.sendall(request)
                reply = bytearray(sock.recv(1 << 20))
                sock.settimeout(quiet)
                with contextlib.suppress(TimeoutError):
                    while chunk := sock.recv(1 << 20):
                        reply += chunk
                return bytes(reply)
            finally:
                self.segment.release_replay(entry)

    def status(self) -> dict[str, object]:
        info: dict[str, object] = {
            "app": self.app.name,
            "address": list(self.address),
            "serving": self.serving,
            "shim": self.segment.counters(),
        }
        if self.replayer is not None:
            info["replay"] = vars(self.replayer.stats).copy()
            info["replayed_index"] = self.replayer.applied
        return info

    def stop(self) -> None:
        if self.replayer is not None:
            self.replayer.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.segment.close()
