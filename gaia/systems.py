"""The one narrow interface every replicated system under test implements (paxi style).

The experiment runner drives APUS, ZooKeeper, etcd, and later LibPaxos and DARE through these
two protocols only, so one workload generator and one latency recorder serve every system and
the comparison between them is like for like.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class SystemUnavailable(RuntimeError):
    """The system cannot run on this target (missing hardware or package); the message says why.

    The runner records such trials as "not run here" with this reason instead of failing the run.
    """


class ConsensusClient(Protocol):
    """One client connection. `submit` returns only once the payload is agreed (and made as
    durable as the system's durability policy says), so its wall time is the consensus latency."""

    def submit(self, payload: bytes) -> None: ...

    def close(self) -> None: ...


class ReplicatedSystem(Protocol):
    """A running group of replicas on some target.

    Lifecycle: `start()` launches every process (logs under `log_dir`) and returns when the group
    can serve; `client()` opens a new connection; `stop()` reaps every process, even after an
    error, and is safe to call twice. `describe()` returns what identifies the configuration in
    results files: versions, replica count, durability policy.
    """

    name: str
    replicas: int
    log_dir: Path

    def start(self) -> None: ...

    def client(self) -> ConsensusClient: ...

    def stop(self) -> None: ...

    def describe(self) -> Mapping[str, Any]: ...


@runtime_checkable
class ServesApp(Protocol):
    """A system that serves an unmodified application's own clients (Redis, memcached): the
    app experiments drive it with the app's load tool at `app_address()`, not with the
    consensus client."""

    def app_address(self) -> tuple[str, int]: ...


@runtime_checkable
class CountsInputs(Protocol):
    """A system whose leader counts what it agreed on, cumulatively: the keys of
    gaia.workload.InputBreakdown.COUNTERS (absent keys: not counted by this system)."""

    def input_counters(self) -> Mapping[str, float]: ...
