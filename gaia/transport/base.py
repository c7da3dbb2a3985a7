"""The one-sided "remote write" interface every APUS transport implements.

A replica owns one memory region. Other replicas change it by writing bytes at an offset; the
owner never receives a message, it notices that its region changed. The consensus core only
sees `region`, `write` and `wait`, so the same core runs over shared memory, kernel TCP and
(later) RDMA, and the cost of each medium is measured rather than assumed.

Failures are data, not exceptions: a write to a peer that is dead, unreachable or cut is
dropped, counted and reported (log, `failed_peers`, optional callback), because the core
tolerates lost writes and must keep running its loop. Only caller bugs (unknown peer, write
outside the region) raise.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from gaia.systems import SystemUnavailable

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
"""What `write` accepts: a contiguous buffer of bytes (memoryviews in format "B")."""

SEAL_BYTES = 8
"""Entries and acks end with an 8-byte seal word; transports store it after the body."""

_CLUSTER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_cluster_id(cluster_id: str) -> str:
    """Return `cluster_id` if it is safe inside file names and globs, else raise ValueError."""
    if not _CLUSTER_ID.fullmatch(cluster_id):
        raise ValueError(
            f"cluster_id {cluster_id!r}: use 1-64 characters from [A-Za-z0-9_-] "
            "(it becomes part of file names)"
        )
    return cluster_id


class PeersUnreachable(TimeoutError):
    """`connect` timed out: `reasons` maps each peer that could not be reached to the last error."""

    def __init__(self, me: int, reasons: Mapping[int, str], timeout: float) -> None:
        self.missing = frozenset(reasons)
        detail = "; ".join(f"{peer}: {why}" for peer, why in sorted(reasons.items()))
        super().__init__(f"replica {me}: peers not reachable after {timeout:.1f} s ({detail})")


class TransportUnavailable(SystemUnavailable):
    """This transport cannot run on this target (missing hardware, library or implementation)."""


@dataclass(frozen=True)
class ClusterSpec:
    """What all replicas of one cluster agree on, as far as transports are concerned.

    `members` maps each replica id to the (host, port) its TCP transport listens on; the shm
    transport only uses the ids. `cluster_id` names the shared-memory files and is mixed into
    the TCP handshake, so two clusters on one host never cross. `key` authenticates TCP frames.
    """

    cluster_id: str
    members: Mapping[int, tuple[str, int]]
    key: bytes = b""

    def __post_init__(self) -> None:
        check_cluster_id(self.cluster_id)
        if len(self.members) < 2 or any(i < 0 for i in self.members):
            raise ValueError(f"need at least 2 members with ids >= 0, got {sorted(self.members)}")

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.members))


@dataclass
class TransportStats:
    """Counters for benchmarks and fault tests; plain ints, read them at any time."""

    writes: int = 0
    """writes handed to the medium"""
    bytes_written: int = 0
    dropped_cut: int = 0
    """writes dropped because the link was cut by fault injection"""
    dropped_failed: int = 0
    """writes dropped because the peer was dead or unreachable"""
    wakeups: int = 0
    """`wait` calls that returned True"""
    sleeps: int = 0
    """times `wait` blocked in the kernel (shm: after the spin budget ran out)"""
    doorbells: int = 0
    """shm: doorbell syscalls made as a writer (only when the reader slept)"""
    rejected: int = 0
    """tcp: handshakes and frames rejected (bad tag, out of bounds, malformed)"""


PeerFailureCallback = Callable[[int, str], None]


def copy_sealed(dst: memoryview, offset: int, data: Buffer) -> None:
    """Copy `data` into `dst` at `offset`: the body first, the final `SEAL_BYTES` last.

    A reader that sees the seal of an entry therefore never sees an older body under it (on a
    store-ordered CPU); the seal's checksum still catches a concurrent overwrite. Plain slice
    statements: wrapping `data` in a memoryview first costs more than the copy for small writes.
    """
    end = offset + len(data)
    seal = end - SEAL_BYTES
    if seal > offset:
        dst[offset:seal] = data[:-SEAL_BYTES]
        dst[seal:end] = data[-SEAL_BYTES:]
    else:
        dst[offset:end] = data


class Transport(ABC):
    """One replica's end of a transport: its own region plus write access to its peers'.

    Threading: call `write` and `wait` from one thread (the replica's loop). Lifecycle:
    construct (creates the region, starts listening), `connect` (wait for the peers), use,
    `close` (idempotent). Usable as a context manager.
    """

    kind: str

    def __init__(
        self,
        me: int,
        region_size: int,
        cluster: ClusterSpec,
        *,
        on_peer_failure: PeerFailureCallback | None = None,
    ) -> None:
        if me not in cluster.members:
            raise ValueError(f"replica {me} is not a member of {sorted(cluster.members)}")
        if region_size <= 0:
            raise ValueError(f"region_size must be positive, got {region_size}")
        self.me = me
        self.region_size = region_size
        self.cluster = cluster
        self.peers: tuple[int, ...] = tuple(i for i in cluster.ids if i != me)
        self.stats = TransportStats()
        self._on_peer_failure = on_peer_failure
        self._cut: set[int] = set()
        self._failed: set[int] = set()
        self._unreported: set[int] = set()
        """failed, but not logged and reported yet: not in failed_peers until they are"""
        self._failed_lock = threading.Lock()

    @property
    @abstractmethod
    def region(self) -> memoryview:
        """My own region, writable: what peers' writes land in. Do not use it after `close`."""

    @abstractmethod
    def connect(self, timeout: float = 10.0) -> None:
        """Block until every peer is reachable; raise `PeersUnreachable` after `timeout`.

        Writes before `connect` returns are best effort (dropped if the peer is not there yet).
        """

    @abstractmethod
    def wait(self, timeout: float | None = None) -> bool:
        """Return True once my region may have changed since the previous True, False on timeout.

        A write that lands before or during the call is never missed; a True without a visible
        change (spurious wake-up) is allowed.
        """

    @abstractmethod
    def close(self) -> None:
        """Release everything this replica created; safe to call twice."""

    @abstractmethod
    def _deliver(self, peer: int, offset: int, data: Buffer) -> bool:
        """Carry one validated write; False if it was dropped (the failure is reported)."""

    def write(self, peer: int, offset: int, data: Buffer) -> None:
        """Write `data` at `offset` of `peer`'s region, body first and final 8 bytes last.

        Never blocks for long and never raises for a dead peer: the write is dropped and the
        peer reported (see `failed_peers`). Raises ValueError for an unknown peer or a range
        outside the region, which are caller bugs.
        """
        size = len(data)
        if peer not in self.peers:
            raise ValueError(f"replica {self.me}: unknown peer {peer} (peers {self.peers})")
        if size == 0 or offset < 0 or offset + size > self.region_size:
            raise ValueError(
                f"write of {size} bytes at {offset} outside region of {self.region_size}"
            )
        if peer in self._cut:
            self.stats.dropped_cut += 1
            return
        if self._deliver(peer, offset, data):
            self.stats.writes += 1
            self.stats.bytes_written += size
        else:
            self.stats.dropped_failed += 1

    def cut(self, peer: int) -> None:
        """Fault injection: drop every write to `peer` until `heal(peer)`. One direction only:
        cut on both replicas for a partition, on one for an asymmetric link failure."""
        self._cut.add(peer)

    def heal(self, peer: int) -> None:
        """Undo `cut(peer)`."""
        self._cut.discard(peer)

    @property
    def failed_peers(self) -> frozenset[int]:
        """Peers whose last contact failed (dead, restarting, unreachable); cleared on recovery.
        A peer shows here only once its failure is logged and reported (`on_peer_failure`)."""
        with self._failed_lock:
            return frozenset(self._failed - self._unreported)

    def _mark_failed(self, peer: int, reason: str) -> None:
        """Record a failure once per transition to failed, so a dead peer does not flood logs.
        The failure is logged and reported before it shows in `failed_peers` (whoever finds it
        there finds the report made), without holding a lock over the callback: a failure seen
        again meanwhile, even from the callback, is the same transition, and a recovery
        meanwhile still counts."""
        with self._failed_lock:
            if peer in self._failed:
                return
            self._failed.add(peer)
            self._unreported.add(peer)
        try:
            log.warning("%s replica %d: peer %d failed: %s", self.kind, self.me, peer, reason)
            if self._on_peer_failure is not None:
                self._on_peer_failure(peer, reason)
        finally:
            with self._failed_lock:
                self._unreported.discard(peer)

    def _reject(self, peer: int | None, reason: str) -> None:
        """Count a refused handshake or frame. It is logged before it is counted, so whoever
        watches `stats.rejected` finds the reason in the log the moment the counter moves."""
        who = "unknown peer" if peer is None else f"peer {peer}"
        log.warning("%s replica %d: rejected %s: %s", self.kind, self.me, who, reason)
        with self._failed_lock:
            self.stats.rejected += 1

    def _mark_alive(self, peer: int) -> None:
        with self._failed_lock:
            if peer not in self._failed:
                return
            self._failed.discard(peer)
        log.info("%s replica %d: peer %d reachable again", self.kind, self.me, peer)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CounterWatch:
    """Notices peers' writes by their counter words (one per member, bumped by the writer after
    each write), and spins for a change before the caller sleeps. Shared by the transports
    whose region lives in memory peers write directly (shm, rdma)."""

    def __init__(self, counters: memoryview, stats: TransportStats, spin: float) -> None:
        self.counters = counters
        self.stats = stats
        self.spin_budget = spin
        self._seen = counters.tobytes()

    def changed(self) -> bool:
        now = self.counters.tobytes()
        if now == self._seen:
            return False
        self._seen = now
        self.stats.wakeups += 1
        return True

    def look(self, timeout: float | None) -> tuple[bool, float | None]:
        """The first part of every `wait`: look, then spin for up to the budget (never past the
        timeout). Returns whether something changed, and the deadline to sleep until."""
        if self.changed():
            return True, None
        start = time.perf_counter()
        deadline = None if timeout is None else start + timeout
        return self.spin(start, deadline), deadline

    def spin(self, start: float, deadline: float | None) -> bool:
        """Poll for up to the spin budget (never past `deadline`); True if something changed.
        Yields the CPU between looks: a writer sharing this core runs now, not after us."""
        until = start + self.spin_budget
        if deadline is not None:
            until = min(until, deadline)
        while time.perf_counter() < until:
            if self.changed():
                return True
            os.sched_yield()
        return False
