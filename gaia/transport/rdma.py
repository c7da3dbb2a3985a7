"""RDMA transport: one-sided IBV_WR_RDMA_WRITE into peers' registered regions (pyverbs).

This is the medium APUS was designed for: a write lands in the peer's memory without its CPU,
and the peer notices it by polling. One protection domain, one memory region covering a header
page and the region, one RC queue pair per peer. Queue-pair details (QP number, PSN, GID, LID,
MTU, rkey, region address) are exchanged over a `control.PeerLinks` connection, authenticated
with the cluster key like the tcp transport's; that connection then carries nothing, but its
closing tells a replica at once that a peer's process died.

A write is posted as a chain of WRs on the peer's QP, in order: the body (in chunks of at most
a quarter of the staging ring), the final 8 bytes (the record's seal), and an increment of my
counter word in the peer's header page. RC executes the WRs of one QP in order and, in
practice (NICs and rxe alike), places one write's data before the next one's, which
RDMA-based replication relies on; within one WR, though, the spec leaves the byte placement
order open, so a single WR could make the seal visible before the body: hence body and seal
go as two WRs, the rule `copy_sealed` follows in memory. (The consensus core checks every
record's checksum and seal anyway, so a torn write is never mistaken for a record.) The
counter is what `wait` watches: it scans one word per member instead of the whole region, and
a counter that moved means everything written before it has landed.

Sources must be registered memory that stays unchanged until the WR completes, so each write
is copied into a per-peer staging ring (a second MR). Only every `signal_every`-th WR is
signalled (plus any that fills the queue or half the ring since the last signal), and each
completion frees the ring bytes and queue slots of its WR and all earlier ones (`SendWindow`).
A write that finds no room polls the peer's completion queue for at most `write_timeout`.

Failures: no device, or a port that is not ACTIVE, raises TransportUnavailable with the reason.
A completion with an error status (IBV_WC_REM_ACCESS_ERR for a bad rkey, IBV_WC_RETRY_EXC_ERR
for a peer that vanished, ...) or a closed control connection drops the peer's link: the peer
goes to `failed_peers`, `on_peer_failure` is called, later writes to it are dropped, and the
link is made again when the peer comes back. Nothing blocks for longer than `write_timeout`
(writes) or `connect_timeout` (connection set-up, in the background thread).

`wait` cannot be woken by a peer (no CPU is involved at this end): it polls the counters,
yielding the CPU for `spin` seconds, then sleeps in steps growing to `max_sleep`, which bounds
the extra latency of an idle replica.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import ipaddress
import itertools
import logging
import mmap
import os
import secrets
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from gaia.transport.base import (
    SEAL_BYTES,
    Buffer,
    ClusterSpec,
    CounterWatch,
    PeerFailureCallback,
    Transport,
    TransportUnavailable,
)
from gaia.transport.control import (
    MISMATCH_BACKOFF,
    FrameError,
    HandshakeError,
    Identity,
    PeerLinks,
    Session,
    recv_message,
    send_message,
)

log = logging.getLogger(__name__)

HEADER = mmap.PAGESIZE
"""Bytes before the region in my memory region: one 8-byte write counter per member."""
_COUNT = struct.Struct("<Q")
_MAX_MEMBERS = HEADER // _COUNT.size
DEFAULT_SYSFS = Path("/sys/class/infiniband")
DEFAULT_SPIN = 50e-6
_READY = b"GAIA-RDMA-READY!"
_MTUS = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
"""ibv_mtu enum -> bytes"""


# -- GID selection (pure: reads a sysfs tree) -------------------------------------------------


@dataclass(frozen=True)
class Gid:
    """One entry of a port's GID table, as sysfs shows it."""

    index: int
    raw: bytes
    kind: str
    """gid_attrs/types: "RoCE v2", "IB/RoCE v1", or "" when not shown"""

    @property
    def address(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(self.raw)

    @property
    def text(self) -> str:
        """Eight groups of four hex digits, the form pyverbs' GID takes."""
        return self.address.exploded


def read_gids(port_dir: Path) -> list[Gid]:
    """The non-empty GIDs of a port (`/sys/class/infiniband/DEV/ports/N`). Reading an unused
    entry fails with EINVAL on some drivers and gives zeros on others: both are skipped."""
    found = []
    for path in sorted((port_dir / "gids").glob("*"), key=lambda p: int(p.name)):
        try:
            address = ipaddress.IPv6Address(path.read_text().strip())
        except (OSError, ValueError):
            continue
        if address.packed == bytes(16):
            continue
        try:
            kind = (port_dir / "gid_attrs" / "types" / path.name).read_text().strip()
        except OSError:
            kind = ""
        found.append(Gid(int(path.name), address.packed, kind))
    return found


def choose_gid(port_dir: Path, index: int | Literal["auto"] = "auto") -> Gid:
    """The GID to address peers with: `index` if given, else on InfiniBand the port GID
    (index 0), else (RoCE) a RoCE v2 GID carrying an IPv4 address, else a RoCE v2 GID with a
    routable IPv6 address. RoCE v2 rides on UDP/IP, which every RoCE network routes; an
    IPv4-mapped GID is what a RoCE deployment (and rxe on an IPv4 netdev) normally uses."""
    gids = read_gids(port_dir)
    listing = ", ".join(f"{g.index}: {g.address} ({g.kind or '?'})" for g in gids) or "none"
    if index != "auto":
        for gid in gids:
            if gid.index == index:
                return gid
        raise TransportUnavailable(f"GID index {index} of {port_dir} is empty (GIDs: {listing})")
    try:
        link_layer = (port_dir / "link_layer").read_text().strip()
    except OSError:
        link_layer = ""
    if link_layer == "InfiniBand" and gids:
        return gids[0]
    v2 = [gid for gid in gids if gid.kind == "RoCE v2"]
    for gid in v2:
        if gid.address.ipv4_mapped is not None:
            return gid
    for gid in v2:
        if not gid.address.is_link_local:
            return gid
    raise TransportUnavailable(
        f"no RoCE v2 GID with an IP address on {port_dir} (give gid_index; GIDs: {listing})"
    )


# -- connection details (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class LinkInfo:
    """What one end of a queue-pair connection tells the other, in one control message."""

    qpn: int
    psn: int
    lid: int
    mtu: int
    """ibv_mtu enum of the port's active MTU"""
    gid: bytes
    rkey: int
    addr: int
    """address of the sender's memory region (header page, then the region)"""
    count: int
    """where the receiver's write counter in the sender's header stands: continue from it"""

    _WIRE = struct.Struct("<IIHB16sIQQ")
    SIZE = _WIRE.size

    def pack(self) -> bytes:
        return self._WIRE.pack(
            self.qpn, self.psn, self.lid, self.mtu, self.gid, self.rkey, self.addr, self.count
        )

    @classmethod
    def unpack(cls, raw: bytes) -> LinkInfo:
        if len(raw) != cls.SIZE:
            raise FrameError(f"link info is {len(raw)} bytes, expected {cls.SIZE}")
        info = cls(*cls._WIRE.unpack(raw))
        if info.mtu not in _MTUS or info.psn >= 1 << 24:
            raise FrameError(f"implausible link info: MTU enum {info.mtu}, PSN {info.psn}")
        return info


# -- send bookkeeping (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """Room for one WR: its id, where its bytes go in the staging ring, whether to signal it."""

    wr_id: int
    offset: int
    signal: bool


@dataclass
class SendWindow:
    """Which send WRs to signal, and when staging bytes and send-queue slots are free again.

    WR ids count up from 1. RC completes a QP's WRs in order, so the completion of a signalled
    WR retires it and every earlier one. Signalling every `every`-th WR keeps reclaiming
    without blocking; signalling the WR that fills the queue, or that brings the unsignalled
    bytes to half the ring, guarantees that a full window always has a signalled WR in flight
    whose completion frees room (claims are at most a quarter of the ring, so the padding at
    the ring's end cannot eat the rest).
    """

    depth: int
    ring: int
    every: int
    posted: int = 0
    retired: int = 0
    head: int = 0
    """staging bytes handed out so far (a position on an unbounded tape; offset = head % ring)"""
    tail: int = 0
    """staging bytes free again"""
    _signalled: deque[tuple[int, int]] = field(default_factory=deque)
    """(wr id, head after it) of signalled WRs not completed yet"""
    _since_wr: int = 0
    _since_head: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.every <= self.depth or self.ring < 4 * SEAL_BYTES:
            raise ValueError(f"bad window: depth {self.depth}, every {self.every}, {self.ring} B")

    @property
    def max_claim(self) -> int:
        return self.ring // 4

    @property
    def in_flight(self) -> int:
        return self.posted - self.retired

    def claim(self, size: int) -> Claim | None:
        """Room for a WR of `size` bytes, or None until a completion frees some."""
        if not 0 < size <= self.max_claim:
            raise ValueError(f"claims are 1..{self.max_claim} bytes, not {size}")
        if self.in_flight >= self.depth:
            return None
        start = self.head
        if start % self.ring + size > self.ring:  # does not fit before the end: wrap
            start += self.ring - start % self.ring
        if start + size - self.tail > self.ring:
            return None
        self.head = start + size
        self.posted += 1
        signal = (
            self.posted - self._since_wr >= self.every
            or self.in_flight == self.depth
            or self.head - self._since_head >= self.ring // 2
        )
        if signal:
            self._signalled.append((self.posted, self.head))
            self._since_wr, self._since_head = self.posted, self.head
        return Claim(self.posted, start % self.ring, signal)

    def completed(self, wr_id: int) -> None:
        """A signalled WR completed: it and every WR before it are done."""
        while self._signalled and self._signalled[0][0] <= wr_id:
            self.retired, self.tail = self._signalled.popleft()

    @property
    def waiting_for_completion(self) -> bool:
        """True if a signalled WR is in flight (so polling the CQ will eventually free room)."""
        return bool(self._signalled)


def pieces(size: int, max_piece: int) -> list[tuple[int, int]]:
    """(start, length) of the WRs carrying `size` bytes, in posting order: the body in pieces
    of at most `max_piece` bytes, then the final SEAL_BYTES alone (small writes: one piece)."""
    if size <= SEAL_BYTES:
        return [(0, size)]
    body = size - SEAL_BYTES
    return [(s, min(max_piece, body - s)) for s in range(0, body, max_piece)] + [
        (body, SEAL_BYTES)
    ]


# -- verbs ---------------------------------------------------------------------------------


@functools.cache
def _pyverbs_modules() -> SimpleNamespace:
    names = ("device", "pd", "mr", "cq", "qp", "wr", "addr", "enums", "pyverbs_error")
    return SimpleNamespace(**{n: importlib.import_module(f"pyverbs.{n}") for n in names})


def load_pyverbs() -> SimpleNamespace:
    """pyverbs' modules, imported on first use so GAIA imports without them."""
    try:
        return _pyverbs_modules()
    except ImportError as exc:
        raise TransportUnavailable(
            f"pyverbs is not importable ({exc}): install Debian's python3-pyverbs "
            "(invoke setup --only rdma), which the project links into its venv"
        ) from exc


def open_device(pv: SimpleNamespace, name: str) -> tuple[str, Any]:
    """(name, Context) of device `name`, or of the first device for "auto"."""
    try:
        devices = pv.device.get_device_list()
    except pv.pyverbs_error.PyverbsError as exc:
        raise TransportUnavailable(f"no RDMA device: {exc}") from exc
    names = [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devices]
    if not names:
        raise TransportUnavailable("no RDMA device: the verbs library lists none")
    if name == "auto":
        name = names[0]
    elif name not in names:
        raise TransportUnavailable(f"no RDMA device {name!r} (present: {', '.join(names)})")
    return name, pv.device.Context(name=name)


def _wc_status_names(pv: SimpleNamespace) -> dict[int, str]:
    return {
        getattr(pv.enums, n): n
        for n in dir(pv.enums)
        if n.startswith("IBV_WC_") and (n.endswith("_ERR") or n == "IBV_WC_SUCCESS")
    }


_CONFIG_ERRORS = frozenset(
    {"IBV_WC_REM_ACCESS_ERR", "IBV_WC_REM_INV_REQ_ERR", "IBV_WC_LOC_PROT_ERR",
     "IBV_WC_LOC_ACCESS_ERR", "IBV_WC_LOC_LEN_ERR"}
)  # fmt: skip
"""Completion errors that reconnecting at once will not fix: redial after MISMATCH_BACKOFF."""


class _Failed(Exception):
    """A link broke while in use; `retry_after` says when to redial."""

    def __init__(self, reason: str, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass
class _Link:
    """My connected queue pair to one peer and what I know of its memory region."""

    peer: int
    qp: Any
    cq: Any
    rkey: int
    addr: int
    window: SendWindow
    staging: int
    """offset of this peer's ring in my staging memory"""
    count: int
    """my write counter in the peer's header"""


class RdmaTransport(Transport):
    """Replicas with an RDMA device, writing into each other's registered regions.

    `device` ("auto": the first one), `port` and `gid_index` ("auto": see `choose_gid`) select
    the local end; the path MTU is the smaller active MTU of the two ports. `queue_depth`,
    `signal_every` and `staging_bytes` (per peer) size the send side; `qp_timeout` and
    `retry_count` are the RC ack timeout (4.096 µs * 2^qp_timeout) and retries after which an
    unreachable peer fails with IBV_WC_RETRY_EXC_ERR (defaults: ~0.5 s).
    """

    kind = "rdma"

    def __init__(
        self,
        me: int,
        region_size: int,
        cluster: ClusterSpec,
        *,
        device: str = "auto",
        port: int = 1,
        gid_index: int | Literal["auto"] = "auto",
        mac: str = "blake2b",
        connect_timeout: float = 2.0,
        write_timeout: float = 1.0,
        queue_depth: int = 128,
        signal_every: int = 16,
        staging_bytes: int = 256 * 1024,
        qp_timeout: int = 14,
        retry_count: int = 7,
        spin: float = DEFAULT_SPIN,
        max_sleep: float = 0.001,
        sysfs: Path = DEFAULT_SYSFS,
        on_peer_failure: PeerFailureCallback | None = None,
    ) -> None:
        super().__init__(me, region_size, cluster, on_peer_failure=on_peer_failure)
        if len(cluster.ids) > _MAX_MEMBERS:
            raise ValueError(f"rdma transport supports at most {_MAX_MEMBERS} members")
        identity = Identity.of(me, cluster, region_size, mac, protocol="rdma")
        SendWindow(queue_depth, staging_bytes, signal_every)  # refuse a bad window now
        self._window_args = (queue_depth, staging_bytes, signal_every)
        self._write_timeout = write_timeout
        self._qp_timeout = qp_timeout
        self._retry_count = retry_count
        self._spin = spin
        self._max_sleep = max_sleep
        self._slot = {peer: i for i, peer in enumerate(cluster.ids)}
        self._closed = False

        pv = self._pv = load_pyverbs()
        self._status_names = _wc_status_names(pv)
        self.device, self._ctx = open_device(pv, device)
        try:
            self._open(port, gid_index, sysfs, staging_bytes)
            self._links: PeerLinks[_Link] = PeerLinks(
                identity,
                cluster.members,
                establish=self._establish,
                retire=self._retire,
                on_up=self._mark_alive,
                on_lost=self._mark_failed,
                on_reject=self._reject,
                connect_timeout=connect_timeout,
                watch=True,
            )
        except BaseException:
            self._ctx.close()  # and with it whatever was made on it (PD, MRs)
            raise

    def _open(
        self, port: int, gid_index: int | Literal["auto"], sysfs: Path, staging_bytes: int
    ) -> None:
        """Check the port, pick the GID, register my region and the staging memory."""
        pv, region_size = self._pv, self.region_size
        where = f"RDMA port {self.device}:{port}"
        try:
            attr = self._ctx.query_port(port)
        except pv.pyverbs_error.PyverbsError as exc:
            raise TransportUnavailable(f"{where}: cannot query it ({exc})") from exc
        if attr.state != pv.enums.IBV_PORT_ACTIVE:
            state = pv.device.port_state_to_str(attr.state)
            raise TransportUnavailable(f"{where} is {state}, not ACTIVE (link down?)")
        self.port = port
        self.mtu = attr.active_mtu
        self._lid = attr.lid
        self.gid = choose_gid(sysfs / self.device / "ports" / str(port), gid_index)
        self._pd = pv.pd.PD(self._ctx)
        access = pv.enums.IBV_ACCESS_LOCAL_WRITE | pv.enums.IBV_ACCESS_REMOTE_WRITE
        self._access = access
        self._mm = mmap.mmap(-1, HEADER + region_size)
        self._base = _address(self._mm)
        self._mr = pv.mr.MR(self._pd, HEADER + region_size, access, address=self._base)
        self._staging_mm = mmap.mmap(-1, staging_bytes * len(self.peers))
        self._staging_base = _address(self._staging_mm)
        self._staging_mr = pv.mr.MR(
            self._pd, len(self._staging_mm), pv.enums.IBV_ACCESS_LOCAL_WRITE,
            address=self._staging_base,
        )  # fmt: skip
        self._staging = memoryview(self._staging_mm)
        self._region = memoryview(self._mm)[HEADER:]
        self._counters = memoryview(self._mm)[: _COUNT.size * len(self.cluster.ids)]
        self._watch = CounterWatch(self._counters, self.stats, self._spin)
        log.info(
            "rdma replica %d: %s port %d, GID %d %s (%s), MTU %d",
            self.me, self.device, port, self.gid.index, self.gid.address, self.gid.kind,
            _MTUS.get(self.mtu, 0),
        )  # fmt: skip

    @property
    def region(self) -> memoryview:
        return self._region

    # -- links (PeerLinks' thread) ----------------------------------------------------------

    def _establish(self, sock: socket.socket, session: Session) -> _Link:
        """Create a queue pair for the peer, swap details, connect it (RTR, RTS) and confirm
        that both ends are connected before either writes."""
        pv, peer = self._pv, session.peer
        try:
            cq = pv.cq.CQ(self._ctx, self._window_args[0])
            cap = pv.qp.QPCap(
                max_send_wr=self._window_args[0], max_recv_wr=1, max_send_sge=1, max_recv_sge=1
            )
            init = pv.qp.QPInitAttr(
                qp_type=pv.enums.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0
            )
            attr = pv.qp.QPAttr(port_num=self.port)
            attr.qp_access_flags = self._access
            qp = pv.qp.QP(self._pd, init, attr)
        except pv.pyverbs_error.PyverbsError as exc:
            raise HandshakeError(f"cannot create a queue pair: {exc}") from exc
        try:
            mine = self._link_info(qp, peer)
            send_message(sock, session, mine.pack())
            theirs = LinkInfo.unpack(recv_message(sock, session, LinkInfo.SIZE))
            self._connect_qp(qp, mine, theirs)
            send_message(sock, session, _READY)
            if recv_message(sock, session, len(_READY)) != _READY:
                raise FrameError("peer did not confirm its queue pair")
        except BaseException as exc:
            qp.close()
            cq.close()
            if isinstance(exc, pv.pyverbs_error.PyverbsError):
                raise HandshakeError(f"cannot connect the queue pair: {exc}") from exc
            raise
        return _Link(
            peer=peer,
            qp=qp,
            cq=cq,
            rkey=theirs.rkey,
            addr=theirs.addr,
            window=SendWindow(*self._window_args),
            staging=self._window_args[1] * self.peers.index(peer),
            count=theirs.count,
        )

    def _link_info(self, qp: Any, peer: int) -> LinkInfo:
        """What I tell `peer` about my end of our new queue pair and my region."""
        return LinkInfo(
            qpn=qp.qp_num,
            psn=secrets.randbits(24),
            lid=self._lid,
            mtu=self.mtu,
            gid=self.gid.raw,
            rkey=self._mr.rkey,
            addr=self._base,
            count=_COUNT.unpack_from(self._counters, _COUNT.size * self._slot[peer])[0],
        )

    def _connect_qp(self, qp: Any, mine: LinkInfo, theirs: LinkInfo) -> None:
        pv = self._pv
        attr = pv.qp.QPAttr(port_num=self.port)
        attr.qp_access_flags = self._access
        attr.path_mtu = min(mine.mtu, theirs.mtu)
        attr.dest_qp_num = theirs.qpn
        attr.rq_psn = theirs.psn
        attr.max_dest_rd_atomic = 1
        attr.min_rnr_timer = 12
        route = pv.addr.GlobalRoute(
            dgid=pv.addr.GID(Gid(0, theirs.gid, "").text), sgid_index=self.gid.index,
            hop_limit=64,
        )  # fmt: skip
        attr.ah_attr = pv.addr.AHAttr(port_num=self.port, is_global=1, gr=route, dlid=theirs.lid)
        attr.timeout = self._qp_timeout
        attr.retry_cnt = self._retry_count
        attr.rnr_retry = 7
        attr.sq_psn = mine.psn
        attr.max_rd_atomic = 1
        qp.to_rts(attr)

    def _retire(self, link: _Link) -> None:
        """Destroy a link's queue pair (its in-flight WRs are flushed) and completion queue."""
        link.qp.close()
        link.cq.close()

    def connect(self, timeout: float = 10.0) -> None:
        self._links.connect(timeout)

    # -- data path (owner thread) -----------------------------------------------------------

    def _deliver(self, peer: int, offset: int, data: Buffer) -> bool:
        with self._links.lock:  # the connection thread must not retire the link meanwhile
            link = self._links.links.get(peer)
            if link is None:
                failure = _Failed(self._links.why_not(peer))
            else:
                try:
                    self._post(link, offset, data)
                except _Failed as exc:
                    failure = exc
                else:
                    return True
        # Reported outside the lock: dropping a link takes it, and so may the callback.
        if link is None:
            self._mark_failed(peer, str(failure))
        else:
            self._links.drop(peer, link, str(failure), failure.retry_after)
        return False

    def _post(self, link: _Link, offset: int, data: Buffer) -> None:
        """Stage and post the WRs of one write (see the module docstring); raise _Failed."""
        self._reap(link)
        window = link.window
        remote = link.addr + HEADER + offset
        counter = link.addr + _COUNT.size * self._slot[self.me]
        link.count += 1
        plan = [(start, n, remote + start) for start, n in pieces(len(data), window.max_claim)]
        plan.append((-1, _COUNT.size, counter))  # start -1: the counter, not a piece of data
        chain: list[Any] = []
        for start, length, target in plan:
            while (claim := window.claim(length)) is None:
                self._post_chain(link, chain)
                chain = []
                self._reap_until_room(link)
            at = link.staging + claim.offset
            if start < 0:
                _COUNT.pack_into(self._staging, at, link.count)
            else:
                self._staging[at : at + length] = data[start : start + length]
            chain.append(self._work_request(link, claim, at, length, target))
        self._post_chain(link, chain)

    def _work_request(self, link: _Link, claim: Claim, at: int, length: int, target: int) -> Any:
        pv = self._pv
        wr = pv.wr.SendWR(
            wr_id=claim.wr_id,
            opcode=pv.enums.IBV_WR_RDMA_WRITE,
            num_sge=1,
            sg=[pv.wr.SGE(self._staging_base + at, length, self._staging_mr.lkey)],
            send_flags=pv.enums.IBV_SEND_SIGNALED if claim.signal else 0,
        )
        wr.set_wr_rdma(link.rkey, target)
        return wr

    def _post_chain(self, link: _Link, chain: list[Any]) -> None:
        if not chain:
            return
        for wr, following in itertools.pairwise(chain):
            wr.next_wr = following
        try:
            link.qp.post_send(chain[0])
        except self._pv.pyverbs_error.PyverbsError as exc:
            raise _Failed(f"posting an RDMA write failed: {exc}") from exc

    def _reap(self, link: _Link) -> None:
        """Retire what completed on the link; raise _Failed on an error completion."""
        _, completions = link.cq.poll(num_entries=16)
        for wc in completions:
            if wc.status != self._pv.enums.IBV_WC_SUCCESS:
                name = self._status_names.get(wc.status, f"status {wc.status}")
                retry = MISMATCH_BACKOFF if name in _CONFIG_ERRORS else 0.0
                raise _Failed(f"RDMA write completed with {name}", retry)
            link.window.completed(wc.wr_id)

    def _reap_until_room(self, link: _Link) -> None:
        """Poll until a completion frees room; a peer that gives none for `write_timeout`
        (and no error either) is treated as failed rather than blocking the replica."""
        deadline = time.monotonic() + self._write_timeout
        retired = link.window.retired
        while link.window.retired == retired:
            if not link.window.waiting_for_completion or time.monotonic() > deadline:
                raise _Failed(f"no send completion for {self._write_timeout} s")
            os.sched_yield()
            self._reap(link)

    def _reap_all(self) -> None:
        """Reclaim send room and notice failed links while idle (called from `wait`)."""
        broken = []
        with self._links.lock:
            for peer, link in self._links.links.items():
                try:
                    self._reap(link)
                except _Failed as exc:
                    broken.append((peer, link, exc))
        for peer, link, failure in broken:
            self._links.drop(peer, link, str(failure), failure.retry_after)

    def _changed(self) -> bool:
        return self._watch.changed()

    def wait(self, timeout: float | None = None) -> bool:
        changed, deadline = self._watch.look(timeout)
        if changed:
            return True
        nap = min(50e-6, self._max_sleep)
        while not self._changed():
            self._reap_all()
            if deadline is not None:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    return False
                nap = min(nap, remaining)
            self.stats.sleeps += 1
            time.sleep(nap)
            nap = min(2 * nap, self._max_sleep)
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._links.close()
        for view in (self._counters, self._region, self._staging):
            view.release()
        self._mr.close()
        self._staging_mr.close()
        self._pd.close()
        self._ctx.close()
        self._staging_mm.close()
        try:
            self._mm.close()
        except BufferError:
            log.debug("rdma replica %d: region still referenced; freed when released", self.me)


def _address(mm: mmap.mmap) -> int:
    """The address of an anonymous mapping, to register it (the mapping outlives the MR)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))
