"""Replay of committed inputs into a backup's own unmodified server, in log order.

CONNECT opens a connection to the local server (from a source port registered in the segment
first, so the backup's shim admits it and nothing else), DATA sends the same bytes the leader's
server read, CLOSE closes it; a BATCH is its DATA inputs one after the other. The server's
replies are read and discarded: its shim keeps their byte count and crc32, which is what the
output checker compares.

Order across connections: before sending an input the replayer announces it to the server's
shim as a turn (connection, length), in log order, and the shim lets the server read a replay
connection only in its turn (shim.c). So the server reads its inputs in the leader's order
across connections whatever order the kernel and epoll hand them over in, and the replayer sends
on without waiting. Only a CLOSE and an output check first wait until the server has taken
every turn announced; a server that does not within ORDER_WAIT_S is counted and replay goes on.

OUTPUT entries carry the leader's output (byte count, crc32) on a connection up to that point in
the log; the replayer waits until its server has written as much on its connection and reports
its own digest, which the core sends back to the leader with its next ack (waiting only as long
as the server still writes: a server that wrote less than the leader and went quiet answers at
once). A digest that is not the leader's is logged and counted; whether this replica or the
leader is the one that differs is the leader's verdict on all the answers (a VERDICT entry
names the backups to restore; a leader that differs steps down).

Every `checkpoint_every` entries it asks the guard for a checkpoint (taken only where the server
is quiet: see guard.py), and a replayer started from a checkpoint reopens the connections that
were open there and skips the entries the snapshot already holds.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gaia.apus.core.types import Entry, EntryKind, decode_batch, decode_output
from gaia.apus.interpose.guard import Checkpoint, Guard, SavedConn, resp
from gaia.apus.interpose.segment import NO_OUTPUT, AppSegment, ConnOutput, L

log = logging.getLogger("gaia.apus.replay")

ORDER_WAIT_S = 1.0
OUTPUT_WAIT_S = 1.0
OUTPUT_QUIET_S = 0.02


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
    diverged: int = 0
    agreed: int = 0
    last_agreed: int = 0  # the log index of the newest output check that agreed
    checkpoints: int = 0


@dataclass
class Replayer:
    """Replays entries given to `put` on a thread of its own; `applied` is the last index done."""

    segment: AppSegment
    server: tuple[str, int]
    report_output: Callable[[int, int], None]
    guard: Guard | None = None
    checkpoint_every: int = 0
    start: Checkpoint | None = None  # the snapshot the server started from
    stats: ReplayStats = field(default_factory=ReplayStats)
    applied: int = 0  # the last entry replayed
    given: int = 0  # the last entry handed to `put`

    def __post_init__(self) -> None:
        self._queue: queue.SimpleQueue[Entry | None] = queue.SimpleQueue()
        self._conns: dict[int, _Replayed] = {}
        self._replies = select.epoll()  # the replay connections, to drain what the server answers
        self._by_fd: dict[int, _Replayed] = {}
        self._stopping = threading.Event()
        self._skip_upto = self.start.index if self.start is not None else 0
        self._checkpointed = self._skip_upto
        self.applied = self.given = self._skip_upto
        self.segment.reset_turns()  # turns a previous server left untaken are not this one's
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
        """Stop at once (what is queued is dropped: whoever restarts replay feeds it again)."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            raise RuntimeError("the replay thread did not stop")
        for c in self._conns.values():
            self._forget(c)
        self._conns.clear()
        self._replies.close()

    def _run(self) -> None:
        try:
            for saved in self.start.conns if self.start is not None else ():
                self._reopen(saved)
        except OSError as e:
            log.error("could not reopen the checkpoint's connections: %s", e)
        while (entry := self._queue.get()) is not None and not self._stopping.is_set():
            if entry.index <= self._skip_upto:  # the snapshot holds it already
                continue
            try:
                self._replay(entry)
                self._maybe_checkpoint(entry.index)
            except OSError as e:  # the server went away: the daemon notices and stops
                log.error("replay of entry %d failed: %s", entry.index, e)
            self.applied = max(self.applied, entry.index)
            self.stats.entries += 1

    def _maybe_checkpoint(self, index: int) -> None:
        if self.guard is None or not self.checkpoint_every:
            return
        if index - self._checkpointed < self.checkpoint_every:
            return
        if not all(self.segment.input_bytes(c.entry) >= c.sent for c in self._conns.values()):
            return  # bytes still in flight to the server: not a point a snapshot can stand for

        def outputs() -> tuple[tuple[int, ConnOutput, int], ...]:
            return tuple(
                (conn, self.segment.output(c.entry), c.sock.getsockname()[1])
                for conn, c in self._conns.items()
            )

        if self.guard.take(index, outputs) is not None:
            self._checkpointed = index
            self.stats.checkpoints += 1

    def _replay(self, e: Entry) -> None:
        if e.kind == EntryKind.CONNECT:
            self._connect(e.conn)
            return
        if e.kind == EntryKind.BATCH:
            for conn, data in decode_batch(e.payload):
                self._replay(Entry(e.index, e.view, EntryKind.DATA, conn, data))
            return
        if e.kind not in (EntryKind.DATA, EntryKind.CLOSE, EntryKind.OUTPUT):
            return
        c = self._conns.get(e.conn)
        if c is None:  # opened before the log this replica holds (it started from a snapshot)
            self.stats.unknown_conn += 1
            return
        if e.kind == EntryKind.DATA:
            self._send(c, e.payload)
            self.stats.bytes += len(e.payload)
        elif e.kind == EntryKind.OUTPUT:
            self._check_output(e, c)
        else:
            self._read_by_server()
            del self._conns[e.conn]
            self._forget(c)
        self._drain()

    def _reopen(self, saved: SavedConn) -> None:
        """A connection that was open at the checkpoint, in the protocol it spoke there; its
        output counts on from the checkpoint's (the HELLO's own reply is not the client's)."""
        self._connect(saved.conn, saved.output)
        if saved.protocol == 2:
            return
        c = self._conns[saved.conn]
        self._send(c, resp("HELLO", str(saved.protocol)))
        got, deadline = 0, time.monotonic() + OUTPUT_WAIT_S
        # read the greeting until nothing more comes and the shim has counted all of it (it
        # counts a write just after making it)
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to HELLO {saved.protocol} in {OUTPUT_WAIT_S} s")
            if select.select([c.sock], [], [], 0.005)[0]:
                data = c.sock.recv(65536)
                if not data:
                    raise ConnectionError("the server closed a reopened connection")
                got += len(data)
            elif got and self.segment.output(c.entry).nbytes - saved.output.nbytes >= got:
                break
        self.segment.seed_output(c.entry, saved.output)

    def _connect(self, conn: int, output: ConnOutput = NO_OUTPUT) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.server[0], 0))
        entry = self.segment.register_replay(sock.getsockname()[1], output, ordered=True)
        try:
            sock.connect(self.server)
        except OSError:
            self.segment.release_replay(entry)
            sock.close()
            raise
        c = self._conns[conn] = _Replayed(sock, entry)
        self._by_fd[sock.fileno()] = c
        self._replies.register(sock.fileno(), select.EPOLLIN)
        self.stats.connections += 1

    def _forget(self, c: _Replayed) -> None:
        self._by_fd.pop(c.sock.fileno(), None)
        c.sock.close()  # which also takes it out of the epoll set
        self.segment.release_replay(c.entry)

    def _send(self, c: _Replayed, data: bytes) -> None:
        """Announce `data` as the next turn, then send it."""
        if not self._until(lambda: self.segment.announce_turn(c.entry, len(data)), ORDER_WAIT_S):
            raise TimeoutError(f"the server took none of its {L['GAIA_TURNS']} turns in time")
        c.sock.sendall(data)
        c.sent += len(data)

    def _read_by_server(self) -> None:
        """Wait until the server has read everything announced so far."""
        if not self._until(lambda: self.segment.turns_pending() == 0, ORDER_WAIT_S):
            self.stats.order_timeouts += 1
            if not self._stopping.is_set():
                log.warning(
                    "the server did not read its replayed input within %.1f s: replay goes "
                    "on, and its order across connections may differ from the leader's",
                    ORDER_WAIT_S,
                )

    def _check_output(self, e: Entry, c: _Replayed) -> None:
        upto, leaders = decode_output(e.payload)
        self._read_by_server()
        self._until(self._output_settled(c, upto), OUTPUT_WAIT_S)
        if self._stopping.is_set():  # cut short: no verdict
            return
        self.stats.output_checks += 1
        mine = output_digest(self.segment.output(c.entry))
        self.report_output(e.index, mine)
        if mine == leaders:
            self.stats.agreed += 1
            self.stats.last_agreed = e.index
        else:
            self.stats.diverged += 1
            log.warning(
                "output check at %d: %d bytes, crc %08x here; the leader had %d, %08x",
                e.index, mine >> 32, mine & 0xFFFFFFFF, leaders >> 32, leaders & 0xFFFFFFFF,
            )  # fmt: skip

    def _output_settled(self, c: _Replayed, upto: int) -> Callable[[], bool]:
        """True once the server wrote `upto` bytes on `c`, or stopped writing short of it for
        OUTPUT_QUIET_S (its answer differs; waiting longer only makes it late)."""
        last = [self.segment.output(c.entry).nbytes, time.monotonic()]

        def settled() -> bool:
            n = self.segment.output(c.entry).nbytes
            if n >= upto:
                return True
            if n != last[0]:
                last[:] = [n, time.monotonic()]
            return time.monotonic() - last[1] > OUTPUT_QUIET_S

        return settled

    def _until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait for `done`, draining replies meanwhile: spin briefly, then sleep in short steps."""
        deadline = time.monotonic() + timeout
        spins = 0
        while not done():
            if time.monotonic() > deadline or self._stopping.is_set():
                return False
            self._drain()
            spins += 1
            time.sleep(0 if spins < 50 else 0.0002)
        return True

    def _drain(self) -> None:
        """Read and drop whatever the server answered, so it never blocks writing to us."""
        for fd, _ in self._replies.poll(0):
            c = self._by_fd.get(fd)
            if c is None:
                continue
            try:
                while c.sock.recv(65536, socket.MSG_DONTWAIT):
                    pass
            except (BlockingIOError, InterruptedError):
                continue
