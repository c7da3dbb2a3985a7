"""Values the APUS core exchanges with its caller: entries, configuration, events' data, actions.

Everything here is immutable and cheap to build (NamedTuples), because one of each is made per
committed input on the hot path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple


class EntryKind(IntEnum):
    """What an input is. The replay side turns CONNECT/DATA/CLOSE back into socket calls."""

    NOOP = 0  # a new leader's first entry: commits the previous views' entries (Raft section 5.4.2)
    CONNECT = 1
    DATA = 2
    CLOSE = 3
    OUTPUT = 4  # the leader's hash of a connection's output, for the output checker
    CONFIG = 5  # a new member list (one change at a time)
    BATCH = 6  # several DATA inputs, on distinct connections, that became ready together
    VERDICT = 7  # the leader's verdict on an output check: the backups that differ restore


class Entry(NamedTuple):
    """One agreed input. (index, view) names an entry uniquely: two logs that hold the same
    (index, view) hold the same entry and the same prefix (the log matching property)."""

    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: the log's word
    view: int
    kind: EntryKind
    conn: int
    payload: bytes


class HardState(NamedTuple):
    """What must survive a crash before the replica may speak again: a vote is only sent once
    the (view, voted_for) pair that grants it is durable, so a restart cannot vote twice."""

    view: int
    voted_for: int | None


class SnapshotMeta(NamedTuple):
    """The log position an application snapshot stands for, and the membership in force there."""

    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: the log's word
    view: int
    members: tuple[int, ...]


class Recovered(NamedTuple):
    """What a restarting replica read back from its durable storage."""

    hard_state: HardState
    snapshot: SnapshotMeta | None
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class CoreConfig:
    """Static parameters of one replica. Times are in ticks; the caller decides how long a tick is.

    `slots` bounds both the ring of every region and the number of entries in flight to a peer,
    so the ring never overwrites an entry that peer has not yet persisted.
    """

    replica_id: int
    members: tuple[int, ...]  # initial membership; () for a replica that joins later
    max_members: int = 16  # ids 0..max_members-1 have ack and vote slots in every region
    slots: int = 256
    slot_size: int = 1024
    heartbeat_ticks: int = 2
    election_ticks: int = 12  # silence before a view change; randomised in [t, 2t)
    retransmit_ticks: int = 6  # no ack progress for this long: rewrite from the peer's match
    output_timeout_ticks: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.replica_id < self.max_members:
            raise ValueError(f"replica id {self.replica_id} outside 0..{self.max_members - 1}")
        bad = [m for m in self.members if not 0 <= m < self.max_members]
        if bad:
            raise ValueError(f"member ids {bad} outside 0..{self.max_members - 1}")
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"duplicate member ids in {self.members}")
        if self.slots < 2 or self.slot_size < 128:
            raise ValueError("need at least 2 slots of at least 128 bytes")
        if self.heartbeat_ticks >= self.election_ticks:
            raise ValueError("heartbeats must come more often than the election timeout")


# --- actions: what the caller must do --------------------------------------------------------


class RemoteWrite(NamedTuple):
    """A one-sided write of `data` at `offset` into `peer`'s region (RDMA WRITE, memcpy, frame)."""

    peer: int
    offset: int
    data: bytes


class Persist(NamedTuple):
    """Make these changes durable, in this order, then report `persist_done(seq)`.

    The caller must complete Persist actions in the order of their `seq` (an append-only log
    does so naturally). `snapshot` drops every entry up to its index; `truncate_after` drops
    entries after that index; then `entries` are appended.
    """

    seq: int
    hard_state: HardState | None
    snapshot: SnapshotMeta | None
    truncate_after: int | None
    entries: tuple[Entry, ...]


class Apply(NamedTuple):
    """Committed entries, in log order, each delivered exactly once per incarnation."""

    entries: tuple[Entry, ...]


class SendSnapshot(NamedTuple):
    """`peer` is behind the leader's compacted log: ship it the latest snapshot out of band; its
    runtime calls `install_snapshot` once it has stored it."""

    peer: int
    meta: SnapshotMeta


class RoleChange(NamedTuple):
    """This replica's role or its view's leader changed (for the runtime: redirect clients)."""

    role: str
    view: int
    leader: int | None


class OutputVerdict(IntEnum):
    AGREE = 0  # every member returned the leader's hash
    MINORITY_DIFFERS = 1  # a majority agrees with the leader; `divergent` lists the others
    LEADER_DIFFERS = 2  # a majority agrees on a hash that is not the leader's
    NO_MAJORITY = 3  # no hash has a majority (or too few answers before the timeout)


class OutputDecision(NamedTuple):
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: the log's word
    conn: int
    verdict: OutputVerdict
    divergent: tuple[int, ...]


Action = RemoteWrite | Persist | Apply | SendSnapshot | RoleChange | OutputDecision


# --- errors ------------------------------------------------------------------------------------


class NotLeader(RuntimeError):
    """Proposals go to the leader; `leader` is the best guess of who that is (None: unknown)."""

    def __init__(self, leader: int | None) -> None:
        super().__init__(f"not the leader (leader: {leader})")
        self.leader = leader


class Backpressure(RuntimeError):
    """As many entries are in flight as the ring holds: retry after commits advance."""


class SafetyViolation(AssertionError):
    """The core found its own state contradicting an invariant (a bug, or a broken rule)."""


# --- payload helpers for OUTPUT and CONFIG entries ---------------------------------------------

_OUTPUT = struct.Struct("<QQ")


def encode_output(upto: int, digest: int) -> bytes:
    """OUTPUT payload: a connection's output hash covering its first `upto` bytes."""
    return _OUTPUT.pack(upto, digest)


def decode_output(payload: bytes) -> tuple[int, int]:
    upto, digest = _OUTPUT.unpack_from(payload)
    return upto, digest


_BATCHED = struct.Struct("<QI")


def encode_batch(inputs: list[tuple[int, bytes]]) -> bytes:
    """BATCH payload: (connection, bytes) inputs in the order their server executes them."""
    return b"".join(_BATCHED.pack(conn, len(data)) + data for conn, data in inputs)


def batch_size(inputs: int, data_bytes: int) -> int:
    """The payload size of a BATCH of `inputs` inputs carrying `data_bytes` bytes in all."""
    return inputs * _BATCHED.size + data_bytes


def decode_batch(payload: bytes) -> list[tuple[int, bytes]]:
    """The inputs of a BATCH payload; ValueError if it is not one (truncated, overlong)."""
    inputs: list[tuple[int, bytes]] = []
    off = 0
    while off < len(payload):
        if off + _BATCHED.size > len(payload):
            raise ValueError(f"a BATCH record header is cut off at byte {off}")
        conn, n = _BATCHED.unpack_from(payload, off)
        off += _BATCHED.size
        if off + n > len(payload):
            raise ValueError(f"a BATCH record of {n} B at byte {off} runs past the payload")
        inputs.append((conn, payload[off : off + n]))
        off += n
    return inputs


_VERDICT = struct.Struct("<Q")


def encode_verdict(index: int, divergent: tuple[int, ...]) -> bytes:
    """VERDICT payload: the OUTPUT entry's index and the replicas whose output differed."""
    return _VERDICT.pack(index) + bytes(divergent)


def decode_verdict(payload: bytes) -> tuple[int, tuple[int, ...]]:
    (index,) = _VERDICT.unpack_from(payload)
    return index, tuple(payload[_VERDICT.size :])


def encode_members(members: tuple[int, ...]) -> bytes:
    return bytes(members)


def decode_members(payload: bytes) -> tuple[int, ...]:
    return tuple(payload)


@dataclass
class OutputRound:
    """The leader's open output check for one OUTPUT entry."""

    conn: int
    digest: int
    deadline: int
    responses: dict[int, int] = field(default_factory=dict)
