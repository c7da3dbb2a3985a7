"""Shared-memory transport: every replica maps its peers' regions and writes into them directly.

Files (all in `shm_dir`, /dev/shm by default, named after the cluster id so `cleanup_shm` can
remove a crashed cluster's leftovers with one glob):

- `gaia.<cluster>.<id>.seg`: one page of transport header, then the replica's region (so the
  region is page-aligned, as registered RDMA memory would be). Header words: magic, state
  (OPEN/CLOSED), member count, the owner's "sleeping" flag, and one write counter per member.
  A writer bumps its own counter in the peer's header after each write; the peer's `wait`
  returns when any counter moved. Each counter has a single writer, so no atomic
  read-modify-write is needed.
- `gaia.<cluster>.<id>.bell`: the owner's doorbell, a named FIFO. Measured alternatives
  (benchmarks/doorbell_choice.py: ping-pong through the doorbell alone, 2-vCPU VM, median
  round trip over several runs): FIFO 6.1-8.7 µs, eventfd 7.2-7.5 µs, Unix datagram socket
  9.3-10.2 µs. The eventfd is no faster than the FIFO, and an unrelated process can only get
  it through an extra rendezvous (SCM_RIGHTS over a socket served by some thread). The
  FIFO needs nothing but its path, and it doubles as a liveness probe: opening it for writing
  fails with ENXIO, writing fails with EPIPE and poll reports POLLERR once its reader (the
  owner) is gone, so a dead peer is noticed without any extra protocol. The owner holds it
  open read-write, so it never sees EOF.

Lost wake-ups. The writer stores data and its counter, then reads the reader's sleeping flag,
and rings only if it is set. The reader sets the flag, then re-reads the counters, then sleeps.
Both sides put a full memory fence between their store and their load (x86-TSO lets a load
pass an earlier store, which would let each side miss the other's store); with the fences at
least one side sees the other, so either the reader finds the change or the writer rings.
CPython has no fence, so it comes from libatomic's `atomic_thread_fence` via ctypes (~0.35 µs).
The data stores rely on the CPU keeping stores in program order (x86-TSO: data, then seal,
then counter become visible in that order); a weakly ordered CPU (arm64) would also need a
release fence before the counter store.

Spinning. `wait` polls for `spin` seconds before sleeping, calling sched_yield between polls.
Without the yield, a spinner whose writer shares its core (the scheduler puts a woken task
next to its waker; other work holds the second core) burns its whole budget before the writer
runs: 2 replicas on 2 vCPUs with other load took 2 x spin + 30 µs per round trip (130 µs for
50 µs of spin, 22 µs without spinning; PLATFORM.md saw milliseconds for two pure pollers on one
core). With the yield, 50 µs of spin beat no spin at every size measured on 2 vCPUs under
background load (medians: 2 replicas 14-16 vs 17-21 µs, 3: 35 vs 49-55, 5: 98 vs 155, 7: 147
vs 229; benchmarks/transport_roundtrip.py), hence the default.

Restarts. A replica starting under an id whose files exist checks whether the doorbell still
has a reader (then another live process owns the id: error), else marks the stale segment
CLOSED, unlinks it and publishes fresh files, the segment by an atomic rename once initialized.
Writers probe their attachments every `probe_interval`: a CLOSED state or a reader-less
doorbell detaches the peer (reported as failed) and the next probe maps the new incarnation.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gaia.transport.base import (
    Buffer,
    ClusterSpec,
    CounterWatch,
    PeerFailureCallback,
    PeersUnreachable,
    Transport,
    TransportUnavailable,
    check_cluster_id,
    copy_sealed,
)

log = logging.getLogger(__name__)

DEFAULT_SHM_DIR = Path("/dev/shm")

_HEADER = mmap.PAGESIZE
_MAGIC = b"GAIASHM1"
# Header word indices. Words are accessed through a "Q"-cast memoryview: one aligned 8-byte
# store each (struct.pack_into would store byte by byte), in host byte order (never leaves it).
_STATE = 1
_MEMBERS = 2
_SLEEPING = 8  # own cache line: written by the reader, read by every writer
_COUNTERS = 16
_MAX_MEMBERS = _HEADER // 8 - _COUNTERS
_OPEN, _CLOSED = 1, 2
_SEQ_CST = 5  # C11 memory_order_seq_cst
DEFAULT_SPIN = 50e-6


def segment_path(shm_dir: Path, cluster_id: str, replica: int) -> Path:
    return shm_dir / f"gaia.{check_cluster_id(cluster_id)}.{replica}.seg"


def bell_path(shm_dir: Path, cluster_id: str, replica: int) -> Path:
    return shm_dir / f"gaia.{check_cluster_id(cluster_id)}.{replica}.bell"


def cleanup_shm(cluster_id: str, shm_dir: Path = DEFAULT_SHM_DIR) -> list[Path]:
    """Remove every segment, doorbell and half-created file of `cluster_id`; return them.

    For the cluster launcher after its replicas exited or were killed (a SIGKILLed replica
    cannot unlink its own files). Live replicas keep working on their mappings, but peers can
    no longer attach to them, so call it once the cluster is down.
    """
    removed = []
    for path in shm_dir.glob(f"gaia.{check_cluster_id(cluster_id)}.*"):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


@functools.cache
def _load_fence() -> Callable[[int], None]:
    try:
        lib = ctypes.CDLL("libatomic.so.1")
    except OSError as exc:
        raise TransportUnavailable(
            "the shm transport needs libatomic.so.1 for a full memory fence "
            "(Debian: apt install libatomic1)"
        ) from exc
    fence: Callable[[int], None] = lib.atomic_thread_fence
    return fence


class _NotReady(Exception):
    """A peer's segment cannot be attached (yet); the message says why."""


@dataclass
class _PeerSegment:
    """My mapping of one peer's segment and the write end of its doorbell."""

    mm: mmap.mmap
    words: memoryview
    region: memoryview
    bell_fd: int
    count: int
    """my write counter in this peer's header (I am its only writer)"""

    def close(self) -> None:
        self.words.release()
        self.region.release()
        self.mm.close()
        os.close(self.bell_fd)


def _map(path: Path, size: int | None) -> mmap.mmap:
    """Map `path` shared; with `size`, create it exclusively at that size first."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if size is not None else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if size is not None:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _unlink_if(path: Path, inode: int) -> None:
    """Unlink `path` only if it is still the file we created, not a newer incarnation's."""
    try:
        if os.stat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


class ShmTransport(Transport):
    """Replicas on one host, each writing straight into its peers' shared-memory segments.

    `spin` is how long `wait` polls (yielding the CPU between polls) before it sleeps on the
    doorbell; 0 goes straight to sleep.
    `probe_interval` bounds how long a dead or restarted peer goes unnoticed by its writers.
    """

    kind = "shm"

    def __init__(
        self,
        me: int,
        region_size: int,
        cluster: ClusterSpec,
        *,
        spin: float = DEFAULT_SPIN,
        probe_interval: float = 0.05,
        shm_dir: Path = DEFAULT_SHM_DIR,
        on_peer_failure: PeerFailureCallback | None = None,
    ) -> None:
        super().__init__(me, region_size, cluster, on_peer_failure=on_peer_failure)
        ids = cluster.ids
        if len(ids) > _MAX_MEMBERS:
            raise ValueError(f"shm transport supports at most {_MAX_MEMBERS} members")
        self._fence = _load_fence()
        self._probe_interval = probe_interval
        self._shm_dir = shm_dir
        self._counter = _COUNTERS + ids.index(me)
        self._segments: dict[int, _PeerSegment] = {}
        self._why_not: dict[int, str] = {}
        self._liveness = select.poll()
        self._peer_of_bell: dict[int, int] = {}
        self._next_probe = 0.0
        self._closed = False

        self._bell_path = bell_path(shm_dir, cluster.cluster_id, me)
        self._seg_path = segment_path(shm_dir, cluster.cluster_id, me)
        self._retire_stale_incarnation()
        os.mkfifo(self._bell_path, 0o600)
        self._bell_fd = os.open(self._bell_path, os.O_RDWR | os.O_NONBLOCK)
        self._bell_inode = os.fstat(self._bell_fd).st_ino
        try:
            self._mm, self._seg_inode = self._publish_segment(len(ids))
        except BaseException:
            os.close(self._bell_fd)
            _unlink_if(self._bell_path, self._bell_inode)
            raise
        self._words = memoryview(self._mm)[:_HEADER].cast("Q")
        self._region = memoryview(self._mm)[_HEADER:]
        self._counters = self._words[_COUNTERS : _COUNTERS + len(ids)]
        self._watch = CounterWatch(self._counters, self.stats, spin)
        self._bell_poll = select.poll()
        self._bell_poll.register(self._bell_fd, select.POLLIN)

    def _retire_stale_incarnation(self) -> None:
        """Take over this replica id's files from a dead predecessor, or refuse if it lives."""
        try:
            fd = os.open(self._bell_path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENXIO):
                raise
        else:
            os.close(fd)
            raise RuntimeError(
                f"replica {self.me} of cluster {self.cluster.cluster_id} is already running "
                f"(its doorbell {self._bell_path} has a reader)"
            )
        try:
            stale = _map(self._seg_path, None)
        except (FileNotFoundError, ValueError):  # ValueError: empty file
            pass
        else:
            with stale:
                if len(stale) >= _HEADER:
                    with memoryview(stale)[:_HEADER].cast("Q") as words:
                        words[_STATE] = _CLOSED
            log.info("shm replica %d: retired a stale segment %s", self.me, self._seg_path)
        self._seg_path.unlink(missing_ok=True)
        self._bell_path.unlink(missing_ok=True)

    def _publish_segment(self, members: int) -> tuple[mmap.mmap, int]:
        """Create and fill the segment under a temporary name, then rename it into place, so a
        peer that can open it always finds a complete header."""
        tmp = self._seg_path.with_name(f"{self._seg_path.name}.tmp{os.getpid()}")
        mm = _map(tmp, _HEADER + self.region_size)
        mm[: len(_MAGIC)] = _MAGIC
        with memoryview(mm)[:_HEADER].cast("Q") as words:
            words[_MEMBERS] = members
            words[_STATE] = _OPEN
        inode = os.stat(tmp).st_ino
        os.rename(tmp, self._seg_path)
        return mm, inode

    @property
    def region(self) -> memoryview:
        return self._region

    def connect(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._probe(force=True)
            missing = {p: self._why_not.get(p, "?") for p in self.peers if p not in self._segments}
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise PeersUnreachable(self.me, missing, timeout)
            time.sleep(0.005)

    def _probe(self, *, force: bool = False) -> None:
        """Detach peers that closed or died, attach peers that (re)appeared; rate-limited."""
        now = time.monotonic()
        if not force and now < self._next_probe:
            return
        self._next_probe = now + self._probe_interval
        for fd, _ in self._liveness.poll(0):
            self._detach(self._peer_of_bell[fd], "its doorbell lost its reader (process gone)")
        for peer, seg in list(self._segments.items()):
            if seg.words[_STATE] != _OPEN:
                self._detach(peer, "its owner closed the segment")
        for peer in self.peers:
            if peer not in self._segments:
                try:
                    self._attach(peer)
                except _NotReady as exc:
                    self._why_not[peer] = str(exc)

    def _attach(self, peer: int) -> None:
        path = segment_path(self._shm_dir, self.cluster.cluster_id, peer)
        try:
            mm = _map(path, None)
        except (FileNotFoundError, ValueError) as exc:  # ValueError: empty file
            raise _NotReady(f"no segment at {path} ({exc})") from exc
        try:
            self._check_peer_segment(mm)
            bell = os.open(
                bell_path(self._shm_dir, self.cluster.cluster_id, peer), os.O_WRONLY | os.O_NONBLOCK
            )
        except (_NotReady, OSError) as exc:
            mm.close()
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise _NotReady(f"{path}: {why}") from exc
        words = memoryview(mm)[:_HEADER].cast("Q")
        count = words[self._counter]  # continue where my previous incarnation stopped
        self._segments[peer] = _PeerSegment(mm, words, memoryview(mm)[_HEADER:], bell, count)
        self._peer_of_bell[bell] = peer
        self._liveness.register(bell, 0)  # POLLERR is always reported: no reader left
        self._why_not.pop(peer, None)
        self._mark_alive(peer)

    def _check_peer_segment(self, mm: mmap.mmap) -> None:
        if len(mm) < _HEADER or mm[: len(_MAGIC)] != _MAGIC:
            raise _NotReady("not a GAIA shm segment")
        expected = (_HEADER + self.region_size, len(self.cluster.ids), _OPEN)
        with memoryview(mm)[:_HEADER].cast("Q") as words:
            found = (len(mm), words[_MEMBERS], words[_STATE])
        if found != expected:
            raise _NotReady(f"(size, members, state) is {found}, expected {expected}")

    def _detach(self, peer: int, reason: str) -> None:
        seg = self._segments.pop(peer)
        self._liveness.unregister(seg.bell_fd)
        del self._peer_of_bell[seg.bell_fd]
        seg.close()
        self._why_not[peer] = reason
        self._mark_failed(peer, reason)

    def _deliver(self, peer: int, offset: int, data: Buffer) -> bool:
        self._probe()
        seg = self._segments.get(peer)
        if seg is None:
            self._mark_failed(peer, self._why_not.get(peer, "not attached"))
            return False
        copy_sealed(seg.region, offset, data)
        seg.count += 1
        seg.words[self._counter] = seg.count
        self._fence(_SEQ_CST)
        if not seg.words[_SLEEPING]:
            return True
        self.stats.doorbells += 1
        try:
            os.write(seg.bell_fd, b"\0")
        except BlockingIOError:
            pass  # the FIFO is full of earlier rings: the reader will wake anyway
        except BrokenPipeError:
            self._detach(peer, "its doorbell lost its reader (process gone)")
            return False
        return True

    def _changed(self) -> bool:
        return self._watch.changed()

    def wait(self, timeout: float | None = None) -> bool:
        changed, deadline = self._watch.look(timeout)
        if changed:
            return True
        # Announce the sleep, then look once more: a writer either stored its counter before
        # our fence (we see it now) or loads the flag after it (and rings).
        self._words[_SLEEPING] = 1
        self._fence(_SEQ_CST)
        try:
            while not self._changed():
                if deadline is None:
                    wait_ms = None
                else:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        return False
                    wait_ms = max(1, int(remaining * 1000 + 0.999))
                self.stats.sleeps += 1
                if self._bell_poll.poll(wait_ms):
                    os.read(self._bell_fd, 65536)  # drain: one byte per ring, stale ones too
            return True
        finally:
            self._words[_SLEEPING] = 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._words[_STATE] = _CLOSED
        _unlink_if(self._seg_path, self._seg_inode)
        _unlink_if(self._bell_path, self._bell_inode)
        os.close(self._bell_fd)
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
        for view in (self._counters, self._words, self._region):
            view.release()
        try:
            self._mm.close()
        except BufferError:
            log.debug("shm replica %d: region still referenced; unmapped when released", self.me)
