"""Durable storage of a replica: an append-only log file of the core's Persist actions.

Each record is one Persist action (hard state, snapshot marker, truncation, entries), framed
as [length u32][crc32 u32][body]. Recovery replays the records in order; a torn last record
(a crash mid-write) fails its CRC, is reported and cut off, never read. What "durable" means is
the replica's durability policy, recorded with every experiment:

* ``fsync``: fsync after every Persist action (the core merges appends made in one step, so
  this is one fsync per batch of inputs the leader or a backup handles at once);
* ``group-commit``: one fsync per event-loop round, however many actions it carried;
* ``no-fsync``: written to the file (page cache) but never fsynced: survives a process crash,
  not a machine crash;
* ``memory``: nothing written (the APUS paper's storage time was a few µs: it did not sync).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

from gaia.apus.core.types import Entry, EntryKind, HardState, Persist, Recovered, SnapshotMeta

log = logging.getLogger(__name__)

Durability = Literal["fsync", "group-commit", "no-fsync", "memory"]
DURABILITIES: tuple[str, ...] = get_args(Durability)

_FRAME = struct.Struct("<II")  # length, crc32 of the body
_OP = struct.Struct("<BqqBqqqI")  # flags, view, voted_for, -, snap index, snap view, trunc, n
_ENTRY = struct.Struct("<QQBQI")  # index, view, kind, conn, length
_HAS_HS, _HAS_SNAP, _HAS_TRUNC = 1, 2, 4


def check_durability(name: str) -> Durability:
    if name not in DURABILITIES:
        raise ValueError(f"unknown durability {name!r}; choose one of {', '.join(DURABILITIES)}")
    return name  # type: ignore[return-value]


def encode(op: Persist) -> bytes:
    """One Persist action as a record body (snapshot members follow the entry list)."""
    hs, snap, trunc = op.hard_state, op.snapshot, op.truncate_after
    flags = (
        (_HAS_HS if hs else 0)
        | (_HAS_SNAP if snap else 0)
        | (_HAS_TRUNC if trunc is not None else 0)
    )
    parts = [
        _OP.pack(
            flags,
            hs.view if hs else 0,
            -1 if hs is None or hs.voted_for is None else hs.voted_for,
            0,
            snap.index if snap else 0,
            snap.view if snap else 0,
            trunc if trunc is not None else 0,
            len(op.entries),
        )
    ]
    for e in op.entries:
        parts.append(_ENTRY.pack(e.index, e.view, e.kind, e.conn, len(e.payload)))
        parts.append(e.payload)
    if snap:
        parts.append(bytes([len(snap.members), *snap.members]))
    return b"".join(parts)


def decode(body: bytes) -> Persist:
    flags, view, voted, _, s_index, s_view, trunc, n = _OP.unpack_from(body)
    pos = _OP.size
    entries = []
    for _ in range(n):
        index, e_view, kind, conn, length = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        entries.append(Entry(index, e_view, EntryKind(kind), conn, body[pos : pos + length]))
        pos += length
    snap = None
    if flags & _HAS_SNAP:
        count = body[pos]
        snap = SnapshotMeta(s_index, s_view, tuple(body[pos + 1 : pos + 1 + count]))
    return Persist(
        0,
        HardState(view, None if voted < 0 else voted) if flags & _HAS_HS else None,
        snap,
        trunc if flags & _HAS_TRUNC else None,
        tuple(entries),
    )


class LogStore:
    """The replica's log file (none for ``memory``). Not thread-safe: one owner."""

    def __init__(self, path: Path | None, durability: Durability) -> None:
        self.durability = check_durability(durability)
        self.path = None if durability == "memory" else path
        if durability != "memory" and path is None:
            raise ValueError(f"durability {durability!r} needs a log file path")
        self._fd: int | None = None
        self.syncs = 0
        self.bytes_written = 0

    def load(self) -> Recovered:
        """Replay the file into what the core needs to restart; cut off a torn tail."""
        hard, snap, entries = HardState(0, None), None, list[Entry]()
        if self.path is None or not self.path.exists():
            return Recovered(hard, snap, ())
        data = self.path.read_bytes()
        pos = 0
        while pos + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, pos)
            body = data[pos + _FRAME.size : pos + _FRAME.size + length]
            if len(body) < length or zlib.crc32(body) != crc:
                break
            op = decode(body)
            pos += _FRAME.size + length
            if op.hard_state is not None:
                hard = op.hard_state
            if op.snapshot is not None:
                snap = op.snapshot
                entries = [e for e in entries if e.index > snap.index]
            if op.truncate_after is not None:
                entries = [e for e in entries if e.index <= op.truncate_after]
            entries.extend(op.entries)
        if pos < len(data):
            log.warning("%s: cut off %d bytes of a torn last record", self.path, len(data) - pos)
            with self.path.open("r+b") as f:
                f.truncate(pos)
        return Recovered(hard, snap, tuple(entries))

    def _open(self) -> int:
        if self._fd is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return self._fd

    def write(self, ops: Iterable[Persist]) -> None:
        """Append these actions; make them as durable as the policy says before returning."""
        if self.path is None:
            return
        fd = self._open()
        for op in ops:
            body = encode(op)
            os.write(fd, _FRAME.pack(len(body), zlib.crc32(body)) + body)
            self.bytes_written += _FRAME.size + len(body)
            if self.durability == "fsync":
                os.fsync(fd)
                self.syncs += 1
        if self.durability == "group-commit":
            os.fsync(fd)
            self.syncs += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
