"""The byte layout of a replica's memory region, and the codecs that read and write it.

A region is what one replica exposes to its peers' one-sided writes:

    [header 64 B][ack slot x max_members][vote slot x max_members][log ring: slots x slot_size]

* header: written by the leader of the view into each backup (view, leader, commit, heartbeat,
  and the log index the leader (re)started writing at, `base`, with a sequence number);
* ack slot j: written by replica j into the leader's region (its durable match index, a
  rejection hint when its log does not match, the heartbeat it echoes, its output hash);
* vote slot j: written by replica j into any region (a vote request, or a vote granted);
* log slot i % slots: an entry written by the leader.

Every record carries a CRC32 over its bytes and ends with an 8-byte trailer written last, so a
torn or half-arrived write never reads as a record: the reader copies the bytes, then checks
the trailer and the checksum on its copy (so a concurrent overwrite cannot slip through either).
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

from gaia.apus.core.types import CoreConfig, Entry, EntryKind

RECORD = 64  # header and vote records each take one cache line
ACK_RECORD = 2 * RECORD  # an ack carries the backup's last few output reports too
OUTPUT_REPORTS = 5  # (index, digest) pairs per ack: reports made between two reads survive
_SEAL_MAGIC = 0xA9D5_0C3E

# header: view, leader+1 (0: none), commit, heartbeat, base, rewind_seq | crc32, pad
_HEADER = struct.Struct("<QQQQQQII")
# ack: view, match, hint, reject_seq, echo, OUTPUT_REPORTS x (out_index, out_digest) | crc32, pad
_ACK = struct.Struct("<QQQQQ" + "QQ" * OUTPUT_REPORTS + "II")
# vote: view, kind, candidate, last_index, last_view, attempt | crc32, seal
_VOTE = struct.Struct("<QQQQQQII")
# entry: index, view, prev_view, writer_view, commit, conn, kind, length; payload; crc32, seal
_ENTRY = struct.Struct("<QQQQQQII")
_TRAILER = struct.Struct("<II")

_KINDS = tuple(EntryKind)  # indexing beats EntryKind(k) on the read path

VOTE_REQUEST = 1
VOTE_GRANT = 2
PREVOTE_REQUEST = 3  # "would you vote for me in view v?": changes nobody's state
PREVOTE_GRANT = 4


class Header(NamedTuple):
    view: int
    leader: int | None
    commit: int
    heartbeat: int
    base: int
    rewind_seq: int


class Ack(NamedTuple):
    view: int
    match: int
    hint: int
    reject_seq: int
    echo: int
    # the newest output reports, (OUTPUT entry index, digest), newest last; a backup reports
    # one per OUTPUT entry it applies, and a single slot would lose the older of two reports
    # made before the leader looked
    reports: tuple[tuple[int, int], ...] = ()


class Vote(NamedTuple):
    view: int
    kind: int
    candidate: int
    last_index: int
    last_view: int
    attempt: int  # makes a repeated request (same view) a new record the voter reads again


class SlotEntry(NamedTuple):
    """An entry as found in a log slot, with the transport metadata the leader wrote with it."""

    entry: Entry
    prev_view: int
    writer_view: int
    commit: int


def _sealed(fmt: struct.Struct, *values: int) -> bytes:
    body = fmt.pack(*values, 0, 0)
    crc = zlib.crc32(body[: fmt.size - 8])
    return body[: fmt.size - 8] + struct.pack("<II", crc, crc ^ _SEAL_MAGIC)


def _open(fmt: struct.Struct, mem: memoryview, offset: int) -> tuple[int, ...] | None:
    raw = bytes(mem[offset : offset + fmt.size])
    values = fmt.unpack(raw)
    crc, seal = values[-2], values[-1]
    if seal != crc ^ _SEAL_MAGIC or zlib.crc32(raw[: fmt.size - 8]) != crc:
        return None
    if not any(values[:-2]):
        return None  # an all-zero record is "nothing written yet", not a record
    return values[:-2]


class Layout:
    """Offsets and codecs for one cluster's region geometry (shared by all its replicas)."""

    def __init__(self, cfg: CoreConfig) -> None:
        self.slots = cfg.slots
        self.slot_size = cfg.slot_size
        self.max_members = cfg.max_members
        self.ack_base = RECORD
        self.vote_base = self.ack_base + ACK_RECORD * cfg.max_members
        self.log_base = self.vote_base + RECORD * cfg.max_members
        self.size = self.log_base + cfg.slots * cfg.slot_size
        self.max_payload = cfg.slot_size - _ENTRY.size - _TRAILER.size

    # -- cheap change detection: a record's trailer (CRC + seal) changes whenever it does --
    @staticmethod
    def header_trailer(mem: memoryview) -> bytes:
        return bytes(mem[_HEADER.size - 8 : _HEADER.size])

    def ack_trailer(self, mem: memoryview, replica: int) -> bytes:
        end = self.ack_offset(replica) + _ACK.size
        return bytes(mem[end - 8 : end])

    # -- offsets --
    def ack_offset(self, replica: int) -> int:
        return self.ack_base + ACK_RECORD * replica

    def vote_offset(self, replica: int) -> int:
        return self.vote_base + RECORD * replica

    def slot_offset(self, index: int) -> int:
        return self.log_base + (index % self.slots) * self.slot_size

    # -- header --
    @staticmethod
    def encode_header(h: Header) -> bytes:
        leader = 0 if h.leader is None else h.leader + 1
        return _sealed(_HEADER, h.view, leader, h.commit, h.heartbeat, h.base, h.rewind_seq)

    @staticmethod
    def read_header(mem: memoryview) -> Header | None:
        v = _open(_HEADER, mem, 0)
        if v is None:
            return None
        return Header(v[0], None if v[1] == 0 else v[1] - 1, v[2], v[3], v[4], v[5])

    # -- acks --
    @staticmethod
    def encode_ack(a: Ack) -> bytes:
        if len(a.reports) > OUTPUT_REPORTS:
            raise ValueError(f"{len(a.reports)} output reports > {OUTPUT_REPORTS} per ack")
        pairs = [n for report in a.reports for n in report]
        pairs += [0] * (2 * OUTPUT_REPORTS - len(pairs))
        return _sealed(_ACK, *a[:5], *pairs)

    def read_ack(self, mem: memoryview, replica: int) -> Ack | None:
        v = _open(_ACK, mem, self.ack_offset(replica))
        if v is None:
            return None
        view, match, hint, reject_seq, echo, *pairs = v
        reports = tuple((pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2) if pairs[i])
        return Ack(view, match, hint, reject_seq, echo, reports)

    # -- votes --
    @staticmethod
    def encode_vote(v: Vote) -> bytes:
        return _sealed(_VOTE, *v)

    def read_vote(self, mem: memoryview, replica: int) -> Vote | None:
        v = _open(_VOTE, mem, self.vote_offset(replica))
        return None if v is None else Vote(*v)

    # -- log entries --
    def encode_entry(self, e: Entry, prev_view: int, writer_view: int, commit: int) -> bytes:
        n = len(e.payload)
        if n > self.max_payload:
            raise ValueError(f"payload of {n} B exceeds the slot's {self.max_payload} B")
        body = (
            _ENTRY.pack(e.index, e.view, prev_view, writer_view, commit, e.conn, e.kind, n)
            + e.payload
        )
        crc = zlib.crc32(body)
        return body + _TRAILER.pack(crc, (e.index & 0xFFFF_FFFF) ^ _SEAL_MAGIC)

    def read_slot(self, mem: memoryview, index: int) -> SlotEntry | None:
        """The entry `index` if its slot holds it, complete; None otherwise (nothing yet, an
        older lap of the ring, or a write still arriving)."""
        off = self.slot_offset(index)
        idx, *_, length = _ENTRY.unpack_from(mem, off)
        if idx != index:  # not arrived yet (an older lap, or nothing): skip the checksum
            return None
        if length > self.max_payload:
            return None
        end = off + _ENTRY.size + length
        raw = bytes(mem[off : end + _TRAILER.size])
        idx, view, prev_view, writer_view, commit, conn, kind, n = _ENTRY.unpack_from(raw)
        crc, seal = _TRAILER.unpack_from(raw, _ENTRY.size + length)
        if (
            n != length
            or seal != (idx & 0xFFFF_FFFF) ^ _SEAL_MAGIC
            or zlib.crc32(raw[: _ENTRY.size + length]) != crc
        ):
            return None
        entry = Entry(idx, view, _KINDS[kind], conn, raw[_ENTRY.size : _ENTRY.size + length])
        return SlotEntry(entry, prev_view, writer_view, commit)
