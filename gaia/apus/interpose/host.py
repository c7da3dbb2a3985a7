"""A replica's own app server: started with the shim preloaded, fed by the replayer, stopped
with the daemon, restored by the guard.

The server is the daemon's child (same process group, so the cluster's kill reaches it too), its
output goes to the daemon's stdout and stderr (the replica's logs). If it dies, the replica
cannot serve: `alive()` turns false and the daemon stops. It always starts from the guard's
newest checkpoint of this cluster (none: empty), at start and on `restore`.
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
from gaia.apus.interpose.guard import Guard
from gaia.apus.interpose.replay import Replayer
from gaia.apus.interpose.segment import AppSegment, L

log = logging.getLogger("gaia.apus.host")

START_TIMEOUT_S = 20.0


class Unrepairable(AppError):
    """A server whose output diverges even when rebuilt from the whole log (a nondeterministic
    app, e.g. conflicting writes from concurrent connections on a multithreaded server)."""


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
        checkpoint_every: int = 0,
    ) -> None:
        self.app = get_app(app)
        if shutil.which(self.app.binary) is None:
            raise AppError(f"{self.app.binary} is not installed: run ./invoke setup")
        self.address = address
        self.workdir = workdir
        self.segment = AppSegment(cluster_id, replica_id, max_data)
        self.proc: subprocess.Popen[bytes] | None = None
        self.replayer: Replayer | None = None
        self.guard = Guard(app, cluster_id, workdir, self.query)
        self.checkpoint_every = checkpoint_every
        self.restores = 0
        self.started_from = 0  # the log index the running server's snapshot held
        self._restored_from = -1
        self._last_agreed = 0  # the newest output check this replica's server passed
        # leader side: the shim's connection entry -> the connection id agreed at CONNECT
        self.conn_ids: dict[int, int] = {}
        self._next_conn = 0

    def start(
        self,
        report_output: Callable[[int, int], None],
        upto: int | None = None,
    ) -> int:
        """Start the server from the newest checkpoint (at or before `upto`; shim preloaded,
        role NONE: it refuses clients until told); return the log index the server holds."""
        self._report_output = report_output
        checkpoint = self.guard.latest(upto)
        self.guard.stage(checkpoint)
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, LD_PRELOAD=str(shim_library()), GAIA_SHIM_SEGMENT=self.segment.name)
        argv = self.app.argv(*self.address, self.workdir)
        log.info(
            "starting %s from %s: %s",
            self.app.name,
            f"the checkpoint at {checkpoint.index}" if checkpoint else "nothing",
            " ".join(argv),
        )
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, cwd=self.workdir)
        wait_listening(self.address[1], START_TIMEOUT_S, self.alive)
        if self.segment.server_pid != self.proc.pid:
            raise AppError(f"{self.app.name} runs, but the shim did not attach to it")
        self.replayer = Replayer(
            self.segment,
            self.address,
            report_output,
            guard=self.guard,
            checkpoint_every=self.checkpoint_every,
            start=checkpoint,
        )
        self.started_from = checkpoint.index if checkpoint is not None else 0
        return self.started_from

    def restore(self) -> int:
        """Restart the server of a backup whose output diverged; return the index the new
        server holds: replay every entry after it again.

        A replica cannot tell when its state went wrong, so a checkpoint newer than its last
        agreeing output check may hold the fault already: a restore starts from the newest
        checkpoint at or before that check, and if that is the checkpoint the last restore
        started from (the fault came back), the checkpoints are dropped and it replays the
        whole log from an empty server. Diverging again after that is not this replica's
        state but nondeterminism a restore cannot repair: Unrepairable, and the server is left
        running as it is."""
        if self.replayer is not None:
            self._last_agreed = max(self._last_agreed, self.replayer.stats.last_agreed)
        latest = self.guard.latest(upto=self._last_agreed)
        start = latest.index if latest is not None else 0
        if self.restores and start == self._restored_from == 0:
            raise Unrepairable("diverged again after replaying the whole log")
        self._stop_server()
        if self.restores and start == self._restored_from:
            log.warning("the checkpoint at %d diverged again: dropping the checkpoints", start)
            self.guard.discard()
            start = 0
        self.restores += 1
        self._restored_from = start
        return self.start(self._report_output, upto=self._last_agreed)

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
            if leading:
                self.segment.open_orders()
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
        latest = self.guard.latest()
        info["checkpoint_index"] = latest.index if latest is not None else None
        info["restores"] = self.restores
        info["started_from"] = self.started_from
        return info

    def stop(self) -> None:
        self._stop_server()
        self.segment.close()

    def _stop_server(self) -> None:
        if self.replayer is not None:
            self.replayer.stop()
            self.replayer = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
