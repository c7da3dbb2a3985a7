"""`local-fsync`: the single-node durability floor, a real system every experiment can run.

No replication and no network: a submit appends the payload to one log and, under the `fsync`
policy, fsyncs it before returning (entries are serialized by a lock, one fsync each, no group
commit); under `memory` it only appends to an in-memory log. Whatever a replicated system adds on
top of this line is the cost of agreement (and of its transport), which is why the figure draws
it as a reference. It also gives the experiment machinery a real system to run in tests.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from gaia.experiments.registry import SystemFactory

NAME = "local-fsync"
DATA_FILE = "local-fsync.log"


class LocalLog:
    """A ReplicatedSystem of one node. The log file lives in `log_dir` while running, so it is
    on the same file system as the results (ext4 here: a real fsync), and is removed at stop:
    it holds only benchmark payloads, and `describe()` keeps its size."""

    def __init__(
        self, replicas: int, log_dir: Path, *, durability: Literal["fsync", "memory"] = "fsync"
    ) -> None:
        if replicas != 1:
            raise ValueError(f"{NAME} is a single node: replicas must be 1, not {replicas}")
        if durability not in ("fsync", "memory"):
            raise ValueError(f"{NAME} durability must be 'fsync' or 'memory', not {durability!r}")
        self.name = NAME
        self.replicas = replicas
        self.log_dir = log_dir
        self.durability = durability
        self._lock = threading.Lock()
        self._running = False
        self._fd: int | None = None
        self._memory = bytearray()
        self._entries = 0
        self._bytes = 0

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.durability == "fsync":
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
            self._fd = os.open(self.log_dir / DATA_FILE, flags, 0o644)
        self._running = True

    def client(self) -> LocalClient:
        return LocalClient(self)

    def append(self, payload: bytes) -> None:
        """One entry, durable as the policy says when this returns."""
        with self._lock:
            if not self._running:
                raise RuntimeError(f"{NAME} is not running")
            if self._fd is not None:
                os.write(self._fd, payload)
                os.fsync(self._fd)
            else:
                self._memory += payload
            self._entries += 1
            self._bytes += len(payload)

    def stop(self) -> None:
        with self._lock:
            self._running = False
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                (self.log_dir / DATA_FILE).unlink(missing_ok=True)
            self._memory = bytearray()

    def describe(self) -> Mapping[str, Any]:
        return {
            "system": NAME,
            "replicas": self.replicas,
            "durability": self.durability,
            "entries": self._entries,
            "bytes": self._bytes,
        }


class LocalClient:
    """A connection to the local log: submits go straight to `LocalLog.append`."""

    def __init__(self, log: LocalLog) -> None:
        self._log = log

    def submit(self, payload: bytes) -> None:
        self._log.append(payload)

    def close(self) -> None:
        """Nothing to release: the log is shared by every client."""


SYSTEMS: Mapping[str, SystemFactory] = {NAME: LocalLog}
