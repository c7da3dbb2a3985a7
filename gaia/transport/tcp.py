"""TCP transport: the "traditional" kernel network path, carrying (offset, bytes) frames.

One connection per pair of replicas, made and authenticated by `control.PeerLinks` (dialed by
the lower id, redialed after a peer restarts) and used in both directions. Frames are read and
applied by `wait` itself, in the owner's thread: handing them over from a receiver thread would
add two thread wake-ups and GIL hand-offs per message, a Python cost that would be charged to
the kernel path this transport exists to measure. It also means the region only changes while
its owner is inside `wait`.

Sends never block the owner: what the kernel does not take at once waits in the connection's
backlog and goes out when the socket is writable again (`wait` polls for that). A leader that
blocked on a peer whose packets are being dropped would stop heartbeating the healthy ones and
set off an election nobody needs. A peer that takes nothing for `write_timeout`, or falls
`BACKLOG_LIMIT` bytes behind, is failed and its connection dropped; the core retransmits what
it missed once the peer is linked again.

Every frame is authenticated (see `control`: per-connection keys, sequence-numbered tags), so a
frame cannot be forged, altered, replayed, reordered or reflected. A frame that is out of
bounds or fails its tag is rejected with a logged reason; the connection is dropped (the stream
cannot be trusted past that point) and the peer may reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from gaia.transport.base import (
    Buffer,
    ClusterSpec,
    PeerFailureCallback,
    Transport,
    copy_sealed,
)
from gaia.transport.control import (
    FRAME,
    TAG_BYTES,
    FrameError,
    Identity,
    PeerLinks,
    Session,
)

log = logging.getLogger(__name__)

_RECV_CHUNK = 256 * 1024
_SEND_FLAGS = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT

BACKLOG_LIMIT = 16 * 1024 * 1024
"""Bytes a peer may be behind (written, not yet taken by the kernel) before it is failed: more
than a whole catch-up burst (every log slot rewritten once), far less than a lost cause costs."""


@dataclass
class _Conn:
    sock: socket.socket
    session: Session
    fd: int
    rbuf: bytearray = field(default_factory=bytearray)
    backlog: bytearray = field(default_factory=bytearray)
    """sealed frames the kernel has not taken yet, in order"""
    progress: float = 0.0
    """when the backlog last became non-empty or last shrank"""
    polling_out: bool = False
    out_lock: threading.Lock = field(default_factory=threading.Lock)
    """`write` (the daemon's I/O thread) and `wait` (its main loop) both send the backlog"""


class TcpTransport(Transport):
    """Replicas anywhere on the network, writing into each other's regions through TCP frames.

    `write_timeout` is how long a peer may take nothing before it is failed (a dead peer fails
    at once: its connection errors); `connect_timeout` bounds one dial or handshake.
    """

    kind = "tcp"

    def __init__(
        self,
        me: int,
        region_size: int,
        cluster: ClusterSpec,
        *,
        mac: str = "blake2b",
        write_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        on_peer_failure: PeerFailureCallback | None = None,
    ) -> None:
        super().__init__(me, region_size, cluster, on_peer_failure=on_peer_failure)
        identity = Identity.of(me, cluster, region_size, mac)
        self._write_timeout = write_timeout
        self._mm = mmap.mmap(-1, region_size)
        self._region = memoryview(self._mm)
        self._by_fd: dict[int, _Conn] = {}
        self._epoll = select.epoll()
        self._closed = False
        self._links = PeerLinks(
            identity,
            cluster.members,
            establish=self._establish,
            retire=self._retire,
            activate=self._activate,
            on_up=self._mark_alive,
            on_lost=self._mark_failed,
            on_reject=self._reject,
            connect_timeout=connect_timeout,
        )

    @property
    def region(self) -> memoryview:
        return self._region

    # -- connections (PeerLinks' thread) ----------------------------------------------------

    def _establish(self, sock: socket.socket, session: Session) -> _Conn:
        """Turn a handshaken connection into the frame stream to its peer."""
        sock.settimeout(None)  # blocking, but every read and send passes MSG_DONTWAIT
        return _Conn(sock, session, sock.fileno())

    def _activate(self, conn: _Conn) -> None:
        """The connection is now the peer's: from now on `wait` reads it (`write` sends on it
        as soon as it is in `links`)."""
        self._by_fd[conn.fd] = conn
        self._epoll.register(conn.fd, select.EPOLLIN)

    def _retire(self, conn: _Conn) -> None:
        """Stop polling a connection PeerLinks is about to close."""
        if self._by_fd.get(conn.fd) is conn:
            del self._by_fd[conn.fd]
            self._epoll.unregister(conn.fd)

    def connect(self, timeout: float = 10.0) -> None:
        self._links.connect(timeout)

    def backlog(self, peer: int) -> int:
        """Bytes written to `peer` that the kernel has not taken yet (0 with no connection)."""
        conn = self._links.links.get(peer)
        return 0 if conn is None else len(conn.backlog)

    # -- data path (owner thread) -----------------------------------------------------------

    def _deliver(self, peer: int, offset: int, data: Buffer) -> bool:
        conn = self._links.links.get(peer)
        if conn is None:
            self._mark_failed(peer, self._links.why_not(peer))
            return False
        frame = conn.session.seal(offset, data)
        with conn.out_lock:
            try:
                if conn.backlog:
                    conn.backlog += frame
                    self._flush(conn)
                else:
                    self._send_or_keep(conn, frame)
            except OSError as exc:
                self._links.drop(peer, conn, f"send failed: {exc}")
                return False
            if conn.backlog:
                return self._keep_waiting(peer, conn)
        return True

    def _send_or_keep(self, conn: _Conn, frame: bytes) -> None:
        """Send a frame on an idle connection; what the kernel does not take is kept (out_lock
        held)."""
        try:
            sent = conn.sock.send(frame, _SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        if sent < len(frame):
            conn.backlog += memoryview(frame)[sent:]
            conn.progress = time.monotonic()
            self._poll_out(conn, True)

    def _flush(self, conn: _Conn) -> None:
        """Send as much of the backlog as the kernel takes now (out_lock held)."""
        while conn.backlog:
            try:
                sent = conn.sock.send(conn.backlog, _SEND_FLAGS)
            except BlockingIOError:
                break
            del conn.backlog[:sent]
            conn.progress = time.monotonic()
        self._poll_out(conn, bool(conn.backlog))

    def _keep_waiting(self, peer: int, conn: _Conn) -> bool:
        """Whether a peer with a backlog is still given time; else it is failed (out_lock held)."""
        stuck = time.monotonic() - conn.progress
        if stuck < self._write_timeout and len(conn.backlog) <= BACKLOG_LIMIT:
            return True
        waiting = len(conn.backlog)
        self._links.drop(
            peer, conn, f"it took nothing for {stuck:.2f} s ({waiting} bytes waiting to be sent)"
        )
        return False

    def _poll_out(self, conn: _Conn, want: bool, force: bool = False) -> None:
        """Have `wait` wake up when the socket can take more, while there is a backlog."""
        if conn.polling_out == want and not force:
            return
        conn.polling_out = want
        if self._by_fd.get(conn.fd) is not conn:
            return  # retired: nobody polls it any more (and its fd may be another's soon)
        mask = select.EPOLLIN | (select.EPOLLOUT if want else 0)
        with contextlib.suppress(OSError):  # retired meanwhile
            self._epoll.modify(conn.fd, mask)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            self.stats.sleeps += 1
            events = self._epoll.poll(remaining)
            for fd, mask in events:
                if mask & select.EPOLLOUT:
                    self._drain(fd)
            if sum(self._receive(fd) for fd, mask in events if mask & ~select.EPOLLOUT):
                self.stats.wakeups += 1
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _drain(self, fd: int) -> None:
        """The socket takes more: send the backlog on."""
        conn = self._by_fd.get(fd)
        if conn is None:
            return
        with conn.out_lock:
            try:
                self._flush(conn)
            except OSError as exc:
                self._links.drop(conn.session.peer, conn, f"send failed: {exc}")
                return
            if not conn.backlog:
                self._poll_out(conn, False, force=True)  # never spin on a writable socket

    def _receive(self, fd: int) -> int:
        """Read what one connection has and apply its complete frames; return how many."""
        conn = self._by_fd.get(fd)
        if conn is None:
            return 0
        peer = conn.session.peer
        try:
            chunk = conn.sock.recv(_RECV_CHUNK, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self._links.drop(peer, conn, f"receive failed: {exc}")
            return 0
        if not chunk:
            self._links.drop(peer, conn, "connection closed by the peer")
            return 0
        conn.rbuf += chunk
        applied = pos = 0
        try:
            with memoryview(conn.rbuf) as buf:
                while (frame := conn.session.open(buf, pos, self.region_size)) is not None:
                    offset, length = frame
                    body = pos + FRAME.size
                    copy_sealed(self._region, offset, buf[body : body + length])
                    pos = body + length + TAG_BYTES
                    applied += 1
        except FrameError as exc:
            self._reject(peer, str(exc))
            self._links.drop(peer, conn, f"rejected a frame: {exc}")
            return applied
        del conn.rbuf[:pos]
        return applied

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._links.close()
        self._epoll.close()
        self._region.release()
        try:
            self._mm.close()
        except BufferError:
            log.debug("tcp replica %d: region still referenced; freed when released", self.me)
