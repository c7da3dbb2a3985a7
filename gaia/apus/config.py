"""The cluster file every replica daemon reads: who the members are, how they talk, how durable.

One JSON file describes a cluster; `python -m gaia.apus.replica --config FILE --id N` starts
member N of it. Everything is validated on load with messages that name the field, because a
typo here would otherwise surface as a replica that silently never joins.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gaia.apps import APPS
from gaia.apus.core.types import CoreConfig
from gaia.apus.storage import Durability, check_durability
from gaia.transport.base import ClusterSpec, check_cluster_id

TRANSPORTS = ("shm", "tcp", "rdma")


class ConfigError(ValueError):
    """The cluster file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Member:
    host: str
    peer_port: int  # the tcp/rdma transports' listening port
    client_port: int  # where clients submit inputs
    app_port: int = 0  # where this replica's app server listens (clusters that run an app)


@dataclass(frozen=True)
class Timing:
    """Core timing in ticks of `tick_ms`: heartbeats every 5 ms, elections after 50-100 ms of
    silence, by default (a loaded 2-core machine must not see false failures)."""

    tick_ms: float = 1.0
    heartbeat_ticks: int = 5
    election_ticks: int = 60
    retransmit_ticks: int = 20


@dataclass(frozen=True)
class ClusterConfig:
    cluster_id: str
    transport: str
    durability: Durability
    data_dir: Path
    members: dict[int, Member]
    key: str = ""  # hex, authenticates tcp frames
    slots: int = 1024
    slot_size: int = 4096
    timing: Timing = field(default_factory=Timing)
    # passed to the transport, e.g. rdma: {"device": "mlx5_0", "port": 1, "gid_index": 3}
    transport_options: dict[str, Any] = field(default_factory=dict)
    # the unmodified server every replica runs (gaia.apps: "redis", "memcached"); "" for none
    app: str = ""
    # the leader checks a connection's output every this many inputs on it (0: never)
    output_period: int = 64
    # backups checkpoint their app server every this many replayed entries (0: never)
    checkpoint_every: int = 0

    def core(self, replica_id: int, seed: int = 0) -> CoreConfig:
        t = self.timing
        return CoreConfig(
            replica_id=replica_id,
            members=tuple(sorted(self.members)),
            max_members=max(16, max(self.members) + 1),
            slots=self.slots,
            slot_size=self.slot_size,
            heartbeat_ticks=t.heartbeat_ticks,
            election_ticks=t.election_ticks,
            retransmit_ticks=t.retransmit_ticks,
            seed=seed,
        )

    def spec(self) -> ClusterSpec:
        return ClusterSpec(
            self.cluster_id,
            {i: (m.host, m.peer_port) for i, m in self.members.items()},
            bytes.fromhex(self.key),
        )

    def log_path(self, replica_id: int) -> Path:
        return self.data_dir / f"replica{replica_id}.log"

    def save(self, path: Path) -> None:
        raw = asdict(self)
        raw["data_dir"] = str(self.data_dir)
        raw["members"] = {str(i): asdict(m) for i, m in self.members.items()}
        path.write_text(json.dumps(raw, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ClusterConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read cluster file: {e}") from e
        try:
            return cls.parse(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from e

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> ClusterConfig:
        missing = {"cluster_id", "transport", "durability", "data_dir", "members"} - raw.keys()
        if missing:
            raise ValueError(f"missing fields: {', '.join(sorted(missing))}")
        if raw["transport"] not in TRANSPORTS:
            raise ValueError(f"transport {raw['transport']!r}: choose one of {TRANSPORTS}")
        members = {int(i): Member(**m) for i, m in raw["members"].items()}
        if len(members) < 1:
            raise ValueError("members: at least one replica")
        return cls(
            cluster_id=check_cluster_id(raw["cluster_id"]),
            transport=raw["transport"],
            durability=check_durability(raw["durability"]),
            data_dir=Path(raw["data_dir"]),
            members=members,
            key=str(raw.get("key", "")),
            slots=int(raw.get("slots", 1024)),
            slot_size=int(raw.get("slot_size", 4096)),
            timing=Timing(**raw.get("timing", {})),
            transport_options=dict(raw.get("transport_options", {})),
            app=_checked_app(str(raw.get("app", "")), members),
            output_period=int(raw.get("output_period", 64)),
            checkpoint_every=int(raw.get("checkpoint_every", 0)),
        )


def _checked_app(app: str, members: dict[int, Member]) -> str:
    if app and app not in APPS:
        raise ValueError(f"app {app!r}: choose one of {', '.join(APPS)}")
    if app and (missing := sorted(i for i, m in members.items() if m.app_port <= 0)):
        raise ValueError(f"app {app!r}: members {missing} have no app_port")
    return app
