"""APUS as a system under test: N replica daemons on this host (shm or tcp transport).

The same life cycle and isolation as the baselines (gaia.cluster.ensemble): a cluster file in
the log directory, one `python -m gaia.apus.replica` per member (in its own network namespace
when isolated: the tcp transport then goes over the veths, while shm works as before since
/dev/shm is shared), ready once every replica answers STATUS and all follow one leader;
clients go to that leader. Shared-memory files are removed on stop, even after a crash.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gaia.apps import require_app
from gaia.apus.client import ApusClient, replica_status
from gaia.apus.config import ClusterConfig, Member, Timing
from gaia.apus.storage import check_durability
from gaia.cluster.ensemble import LocalEnsemble
from gaia.cluster.netns import Isolation
from gaia.cluster.procs import ManagedProcess, ProcessSpec, free_ports
from gaia.transport.shm import cleanup_shm


class ApusCluster(LocalEnsemble):
    def __init__(
        self,
        replicas: int,
        log_dir: Path,
        *,
        transport: str,
        durability: str = "memory",
        data_root: Path | None = None,
        start_timeout: float = 30.0,
        timing: Timing | Mapping[str, Any] | None = None,
        isolation: str | Isolation = "auto",
        app: str = "",
        output_period: int = 64,
        checkpoint_every: int = 0,
        status_timeout: float = 1.0,
        client_timeout: float = 10.0,
    ) -> None:
        """`status_timeout`: how long a replica may take to answer STATUS before it counts as
        down; `client_timeout`: how long the clients from `client()` wait for an input to be
        committed (both longer on a slow machine, like `start_timeout` and `timing`)."""
        super().__init__(replicas, log_dir, data_root, start_timeout, isolation)
        if app:
            require_app(app)  # SystemUnavailable where its server is not installed (MongoDB)
        self.name = f"apus-{transport}" + (f"-{app}" if app else "")
        self.app = app
        self.output_period = output_period
        self.checkpoint_every = checkpoint_every
        self.transport = transport
        self.durability = check_durability(durability)
        # a definition's params give timing as a mapping, e.g. {election_ticks: 300}
        self.timing = timing if isinstance(timing, Timing) else Timing(**(timing or {}))
        self.status_timeout = status_timeout
        self.client_timeout = client_timeout
        self.cluster_id = f"apus{secrets.token_hex(4)}"
        self.config: ClusterConfig | None = None

    @property
    def addresses(self) -> dict[int, tuple[str, int]]:
        assert self.config is not None, "not started"
        return {i: (m.host, m.client_port) for i, m in self.config.members.items()}

    def _server_specs(self, data_root: Path) -> list[ProcessSpec]:
        ports = free_ports(3 * self.replicas)
        self.config = ClusterConfig(
            cluster_id=self.cluster_id,
            transport=self.transport,
            durability=self.durability,
            data_dir=data_root,
            members={
                i: Member(self.host(i), *ports[3 * i : 3 * i + 3]) for i in range(self.replicas)
            },
            key=secrets.token_hex(16),
            timing=self.timing,
            app=self.app,
            output_period=self.output_period,
            checkpoint_every=self.checkpoint_every,
        )
        path = self.log_dir / "cluster.json"
        self.config.save(path)
        return [
            ProcessSpec(
                f"replica{i}",
                (sys.executable, "-m", "gaia.apus.replica", "--config", str(path), "--id", str(i)),
            )
            for i in range(self.replicas)
        ]

    @property
    def app_addresses(self) -> dict[int, tuple[str, int]]:
        """Where each replica's app server listens (only the leader's accepts clients)."""
        assert self.config is not None and self.app, "not started, or no app"
        return {i: (m.host, m.app_port) for i, m in self.config.members.items()}

    def app_address(self) -> tuple[str, int]:
        """Where the app's clients go now: the leader's server (gaia.systems.ServesApp)."""
        if not self.app:
            raise RuntimeError(f"{self.name} replicates no app: give it the parameter app")
        leader = self.leader()
        if leader is None:
            raise RuntimeError(f"{self.name}: the replicas agree on no leader")
        return self.app_addresses[leader]

    def input_counters(self) -> Mapping[str, float]:
        """The leader's cumulative counters (gaia.systems.CountsInputs); empty without one."""
        leader = self.leader()
        status = self.statuses().get(leader) if leader is not None else None
        return leader_counters(status) if status is not None else {}

    def statuses(self) -> dict[int, dict[str, Any] | None]:
        """Each replica's STATUS, None for one that does not answer."""
        out: dict[int, dict[str, Any] | None] = {}
        for i, address in self.addresses.items():
            try:
                out[i] = replica_status(address, self.status_timeout)
            except OSError:
                out[i] = None
        return out

    def leader(self) -> int | None:
        """The replica every live one follows, if they agree on one."""
        live = [s for s in self.statuses().values() if s is not None]
        leaders = {(s["view"], s["leader"]) for s in live}
        if len(leaders) == 1:
            (_, leader), *_ = leaders
            return None if leader is None else int(leader)
        return None

    def _not_ready(self) -> list[ManagedProcess]:
        statuses = self.statuses()
        if any(s is None for s in statuses.values()) or self.leader() is None:
            return [self.servers[i] for i, s in statuses.items() if s is None] or self.servers
        if self.app and not any(s and s.get("app", {}).get("serving") for s in statuses.values()):
            return self.servers  # the leader's server is not serving clients yet
        return []

    def restart(self, index: int) -> None:
        """Fault recovery: start replica `index` again (after `kill`) from its own log; its
        output goes to replicaN.K.* beside the earlier incarnations'."""
        if self._group is None or self.servers[index].running():
            raise RuntimeError(f"replica {index} is not down")
        spec = self.servers[index].spec
        incarnation = sum(p.spec.argv == spec.argv for p in self._group.processes) + 1
        self.servers[index] = self._group.launch(
            replace(spec, name=f"replica{index}.{incarnation}")
        )

    def client(self, first: int | None = None) -> ApusClient:
        return ApusClient(
            self.addresses,
            first=self.leader() if first is None else first,
            timeout=self.client_timeout,
        )

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.transport == "shm":
                cleanup_shm(self.cluster_id)

    def _details(self) -> Mapping[str, Any]:
        return {
            "transport": self.transport,
            "durability": self.durability,
            "app": self.app or None,
            "output_period": self.output_period if self.app else None,
            "checkpoint_every": self.checkpoint_every if self.app else None,
            "tick_ms": self.timing.tick_ms,
            "election_ticks": self.timing.election_ticks,
            "python": sys.version.split()[0],
        }


SOCKET_CALLS = ("connect", "data", "close")
"""The kinds of shim inputs that are socket calls (accept, read, close); OUTPUT entries are the
leader's own output checks."""


def leader_counters(status: Mapping[str, Any]) -> dict[str, float]:
    """A replica's STATUS as the cumulative counters of gaia.workload.InputBreakdown."""
    counters: dict[str, float] = {}
    totals = status.get("timing_totals")
    if totals is not None:
        counters.update(
            timed_inputs=totals["count"],
            storage_s=totals["storage_s"],
            first_ack_s=totals["first_ack_s"],
            quorum_s=totals["quorum_s"],
        )
    app = status.get("app")
    if app is not None:
        proposed = app.get("proposed", {})
        counters.update(
            consensus_inputs=sum(proposed.get(kind, 0) for kind in SOCKET_CALLS),
            input_calls=app["shim"]["calls"],
            input_bytes=app["shim"]["input_bytes"],
        )
    return counters


SYSTEMS: Mapping[str, Any] = MappingProxyType(
    {
        "apus-shm": partial(ApusCluster, transport="shm"),
        "apus-tcp": partial(ApusCluster, transport="tcp"),
        "apus-rdma": partial(ApusCluster, transport="rdma"),
    }
)
