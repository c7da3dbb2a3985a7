"""Replay of committed inputs into a backup's own unmodified server, in log order.

CONNECT opens a connection to the local server (from a source port registered in the segment
first, so the backup's shim admits it and nothing else), DATA sends the same bytes the leader's
server read, CLOSE closes it. The server's replies are read and discarded: its shim keeps their
byte count and crc32, which is what the output checker compares.

Order across connections: before sending on another connection than the last one, the replayer
waits until the server has read everything sent on that last one (the shim counts the bytes the
server read), so the server sees its reads in the leader's order, as far as one event loop can
tell. A server that does not read within ORDER_WAIT_S is counted and replay goes on.

OUTPUT entries carry the leader's output (byte count, crc32) on a connection up to that point in
the log; the replayer waits until its server has written as much on its connection and reports
its own digest, which the core sends back to the leader with its next ack.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gaia.apus.core.types import Entry, EntryKind, decode_output
from gaia.apus.interpose.segment import AppSegment, ConnOutput

log = logging.getLogger("gaia.apus.replay")

ORDER_WAIT_S = 1.0
OUTPUT_WAIT_S = 1.0


def output_digest(out: ConnOutput) -> int:
    """One number for "this many bytes with this crc32": equal digests, equal output."""
    return (out.nbytes << 32) | out.crc


@dataclass
class _Replayed:
    sock: socket.socket
    entry: int  # the segment's connection entry
    sent: int = 0


@dataclass
class ReplayStats:
    entries: int = 0
    connections: int = 0
    bytes: int = 0
    order_timeouts: int = 0
    unknown_conn: int = 0
    output_checks: int = 0


@dataclass
class Replayer:
    """Replays entries given to `put` on a thread of its own; `applied` is the last index done."""

    segment: AppSegment
    server: tuple[str, int]
    report_output: Callable[[int, int], None]
    stats: ReplayStats = field(default_factory=ReplayStats)
    applied: int = 0  # the last entry replayed
    given: int = 0  # the last entry handed to `put`

    def __post_init__(self) -> None:
        self._queue: queue.SimpleQueue[Entry | None] = queue.SimpleQueue()
        self._conns: dict[int, _Replayed] = {}
        self._last: _Replayed | None = None
        self._thread = threading.Thread(target=self._run, name="replay", daemon=True)
        self._thread.start()

    def put(self, entry: Entry) -> None:
        self.given = max(self.given, entry.index)
        self._queue.put(entry)

    def idle(self) -> bool:
        """Everything handed over so far has been replayed."""
        return self.applied >= self.given

    def close_all(self, index: int) -> None:
        """A new leader's clients start afresh: close every replayed connection (after what is
        queued), as the CLOSE entries it proposes for them make the backups do."""
        for conn in self.open_connections():
            self.put(Entry(index, 0, EntryKind.CLOSE, conn, b""))

    def open_connections(self) -> list[int]:
        """The connection ids replayed and not yet closed (a new leader closes them)."""
        return list(self._conns)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        for c in self._conns.values():
            c.sock.close()

    def _run(self) -> None:
        while (entry := self._queue.get()) is not None:
            try:
                self._replay(entry)
            except OSError as e:  # the server went away: the daemon notices and stops
                log.error("replay of entry %d failed: %s", entry.index, e)
            self.applied = max(self.applied, entry.index)
            self.stats.entries += 1

    def _replay(self, e: Entry) -> None:
        if e.kind == EntryKind.CONNECT:
            self._connect(e.conn)
            return
        if e.kind not in (EntryKind.DATA, EntryKind.CLOSE, EntryKind.OUTPUT):
            return
        c = self._conns.get(e.conn)
        if c is None:  # opened before the log this replica holds (it started from a snapshot)
            self.stats.unknown_conn += 1
            return
        if e.kind == EntryKind.DATA:
            self._in_order(c)
            c.sock.sendall(e.payload)
            c.sent += len(e.payload)
            self.stats.bytes += len(e.payload)
            self._last = c
        elif e.kind == EntryKind.OUTPUT:
            self._check_output(e, c)
        else:
            self._in_order(c)
            del self._conns[e.conn]
            c.sock.close()
            self.segment.release_replay(c.entry)
            if self._last is c:
                self._last = None
        self._drain()

    def _connect(self, conn: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.server[0], 0))
        entry = self.segment.register_replay(sock.getsockname()[1])
        try:
            sock.connect(self.server)
        except OSError:
            self.segment.release_replay(entry)
            sock.close()
            raise
        self._conns[conn] = _Replayed(sock, entry)
        self.stats.connections += 1

    def _in_order(self, nxt: _Replayed) -> None:
        """Let the server read all of the previous connection's input before `nxt` gets more."""
        last = self._last
        if last is None or last is nxt:
            return
        if not self._until(lambda: self.segment.input_bytes(last.entry) >= last.sent, ORDER_WAIT_S):
            self.stats.order_timeouts += 1

    def _check_output(self, e: Entry, c: _Replayed) -> None:
        upto, _ = decode_output(e.payload)
        self._in_order(c)
        self._until(lambda: self.segment.output(c.entry).nbytes >= upto, OUTPUT_WAIT_S)
        self.stats.output_checks += 1
        self.report_output(e.index, output_digest(self.segment.output(c.entry)))

    def _until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait for `done`, draining replies meanwhile: spin briefly, then sleep in short steps."""
        deadline = time.monotonic() + timeout
        spins = 0
        while not done():
            if time.monotonic() > deadline:
                return False
            self._drain()
            spins += 1
            time.sleep(0 if spins < 50 else 0.0002)
        return True

    def _drain(self) -> None:
        """Read and drop whatever the server answered, so it never blocks writing to us."""
        for c in self._conns.values():
            try:
                while c.sock.recv(65536, socket.MSG_DONTWAIT):
                    pass
            except (BlockingIOError, InterruptedError):
                continue
