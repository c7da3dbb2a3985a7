"""TCP transport: the "traditional" kernel network path, carrying (offset, bytes) frames.

One connection per pair of replicas, made and authenticated by `control.PeerLinks` (dialed by
the lower id, redialed after a peer restarts) and used in both directions. Frames are read and
applied by `wait` itself, in the owner's thread: handing them over from a receiver thread would
add two thread wake-ups and GIL hand-offs per message, a Python cost that would be charged to
the kernel path this transport exists to measure. It also means the region only changes while
its owner is inside `wait`.

Every frame is authenticated (see `control`: per-connection keys, sequence-numbered tags), so a
frame cannot be forged, altered, replayed, reordered or reflected. A frame that is out of
bounds or fails its tag is rejected with a logged reason; the connection is dropped (the stream
cannot be trusted past that point) and the peer may reconnect.
"""

from __future__ import annotations

import logging
import mmap
import select
import socket
import struct
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

_TIMEVAL = struct.Struct("@ll")
_RECV_CHUNK = 256 * 1024


@dataclass
class _Conn:
    sock: socket.socket
    session: Session
    fd: int
    rbuf: bytearray = field(default_factory=bytearray)


class TcpTransport(Transport):
    """Replicas anywhere on the network, writing into each other's regions through TCP frames.

    `write_timeout` bounds a send to a peer that stopped reading (kernel SO_SNDTIMEO); a dead
    peer fails at once. `connect_timeout` bounds one dial or handshake.
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
        sock.settimeout(None)  # blocking: reads pass MSG_DONTWAIT, sends are bounded below
        seconds = int(self._write_timeout)
        micros = int((self._write_timeout - seconds) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(seconds, micros))
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

    # -- data path (owner thread) -----------------------------------------------------------

    def _deliver(self, peer: int, offset: int, data: Buffer) -> bool:
        conn = self._links.links.get(peer)
        if conn is None:
            self._mark_failed(peer, self._links.why_not(peer))
            return False
        try:
            conn.sock.sendall(conn.session.seal(offset, data), socket.MSG_NOSIGNAL)
        except OSError as exc:
            self._links.drop(peer, conn, f"send failed: {exc}")
            return False
        return True

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            self.stats.sleeps += 1
            events = self._epoll.poll(remaining)
            if sum(self._receive(fd) for fd, _ in events):
                self.stats.wakeups += 1
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

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
