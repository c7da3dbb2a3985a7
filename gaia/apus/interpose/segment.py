"""The daemon's side of the segment it shares with the shim inside its server (shim_layout.h).

The daemon creates the segment, names it to the server through GAIA_SHIM_SEGMENT, and then:
takes each input the shim submits (`take`), answers it once it is committed or lost
(`answer`), sets the role the shim acts in, beats so the shim knows it is alive, registers the
source ports of its replay connections, and reads the shim's per-connection counters (bytes in,
bytes out and the crc32 of the output) for replay ordering and the output checker.

The offsets and constants come from shim_layout.h itself, so the C and Python sides share one
definition. Waiting uses futexes on the shared words (the same ones the shim wakes).
"""

from __future__ import annotations

import ast
import ctypes
import functools
import mmap
import operator
import os
import platform
import re
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from gaia.transport.base import check_cluster_id

LAYOUT_HEADER = Path(__file__).resolve().parent / "shim_layout.h"
SHM_DIR = Path("/dev/shm")


@functools.cache
def layout() -> dict[str, int]:
    """Every GAIA_* constant of shim_layout.h, its expressions evaluated in order."""
    ops: dict[type, Callable[[int, int], int]] = {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv,
        ast.Div: operator.floordiv,
    }
    values: dict[str, int] = {}

    def evaluate(node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](evaluate(node.left), evaluate(node.right))
        raise ValueError(f"{LAYOUT_HEADER.name}: cannot evaluate {ast.dump(node)}")

    for line in LAYOUT_HEADER.read_text().splitlines():
        m = re.match(r"#define\s+(GAIA_\w+)\s+(.+?)\s*(/\*.*)?$", line)
        if m is None or m.group(1) == "GAIA_SHIM_LAYOUT_H":
            continue
        text = re.sub(r"(0x[0-9a-fA-F]+|\d+)U?L*L?\b", r"\1", m.group(2))
        values[m.group(1)] = evaluate(ast.parse(text, mode="eval").body)
    return values


L = layout()

# --- futexes on shared words, through libc's syscall (ctypes releases the GIL while it waits)
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine(), 202)
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex(address: int, op: int, value: int, timeout: float | None = None) -> None:
    ts = None
    if timeout is not None:
        ts = _Timespec(int(timeout), int((timeout - int(timeout)) * 1e9))
    _libc.syscall(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(address),
        ctypes.c_int(op),
        ctypes.c_uint(value & 0xFFFFFFFF),
        ctypes.byref(ts) if ts is not None else None,
        None,
        ctypes.c_int(0),
    )


class Input(NamedTuple):
    """One input the shim submitted: which slot to answer, what it is, on which connection."""

    slot: int
    kind: int
    conn: int
    payload: bytes


class ConnOutput(NamedTuple):
    """What a server wrote on one connection so far: byte count and zlib crc32 of the bytes."""

    nbytes: int
    crc: int


NO_OUTPUT = ConnOutput(0, 0)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def segment_name(cluster_id: str, replica_id: int) -> str:
    """The shm_open name (under /dev/shm): cleanup_shm(cluster_id) removes it with the rest."""
    return f"/gaia.{check_cluster_id(cluster_id)}.app{replica_id}"


class AppSegment:
    """The shared segment of one replica and its server; created here, unlinked by `close`."""

    def __init__(self, cluster_id: str, replica_id: int, max_data: int) -> None:
        self.name = segment_name(cluster_id, replica_id)
        self.path = SHM_DIR / self.name.lstrip("/")
        size = L["GAIA_SEGMENT_SIZE"]
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.mem = memoryview(self._map)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self._base = ctypes.addressof(self._anchor)
        # first in, first out: an entry is reused as late as possible, long after the server
        # closed its end of the connection that last held it
        self._free_replay = deque(range(L["GAIA_CONNS"] // 2, L["GAIA_CONNS"]))
        self._next_order = 0
        _U32.pack_into(self.mem, L["GAIA_HDR_VERSION"], L["GAIA_VERSION"])
        _U32.pack_into(self.mem, L["GAIA_HDR_MAX_DATA"], min(max_data, L["GAIA_DATA_CAP"]))
        _U64.pack_into(self.mem, L["GAIA_HDR_MAGIC"], L["GAIA_MAGIC"])  # last: now it is valid

    # -- header
    def _u32(self, offset: int) -> int:
        return int(_U32.unpack_from(self.mem, offset)[0])

    def _u64(self, offset: int) -> int:
        return int(_U64.unpack_from(self.mem, offset)[0])

    @property
    def role(self) -> int:
        return self._u32(L["GAIA_HDR_ROLE"])

    @role.setter
    def role(self, value: int) -> None:
        _U32.pack_into(self.mem, L["GAIA_HDR_ROLE"], value)

    def beat(self) -> None:
        """Tell the shim the daemon is alive (it gives up on inputs after 3 s of silence)."""
        offset = L["GAIA_HDR_BEAT"]
        _U64.pack_into(self.mem, offset, self._u64(offset) + 1)

    @property
    def server_pid(self) -> int:
        """The server process that attached (0: none yet)."""
        return self._u32(L["GAIA_HDR_PID"])

    def counters(self) -> dict[str, int]:
        """The shim's totals: input calls that delivered agreed bytes and those bytes, waits
        for agreement (a batch agreed at epoll_wait is one), inputs agreed there ahead of the
        server's read, clients refused, inputs lost, agreed bytes the server never read."""
        return {
            "calls": self._u64(L["GAIA_HDR_CALLS"]),
            "input_bytes": self._u64(L["GAIA_HDR_BYTES"]),
            "rounds": self._u64(L["GAIA_HDR_ROUNDS"]),
            "ahead": self._u64(L["GAIA_HDR_AHEAD"]),
            "refused": self._u64(L["GAIA_HDR_REFUSED"]),
            "lost": self._u64(L["GAIA_HDR_LOST"]),
            "discarded_bytes": self._u64(L["GAIA_HDR_DISCARDED"]),
            "out_of_turn": self._u64(L["GAIA_HDR_OUT_OF_TURN"]),
            "out_of_order": self._u64(L["GAIA_HDR_OUT_OF_ORDER"]),
        }

    # -- inputs
    def doorbell(self) -> int:
        return self._u32(L["GAIA_HDR_DOORBELL"])

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep until the shim rings after `seen` (the doorbell value read before scanning)."""
        _futex(self._base + L["GAIA_HDR_DOORBELL"], _FUTEX_WAIT, seen, timeout)

    def _slot(self, i: int) -> int:
        return L["GAIA_SLOTS_OFFSET"] + i * L["GAIA_SLOT_SIZE"]

    def take(self) -> list[Input]:
        """The inputs submitted since the last look, in the order they were submitted (a batch
        the shim agrees at epoll_wait is executed in that order); each is marked taken (answer
        it later)."""
        taken: list[tuple[int, Input]] = []
        for i in range(L["GAIA_SLOTS"]):
            base = self._slot(i)
            if self._u32(base + L["GAIA_SLOT_STATE"]) != L["GAIA_SLOT_SUBMITTED"]:
                continue
            kind = self._u32(base + L["GAIA_SLOT_KIND"])
            conn = self._u32(base + L["GAIA_SLOT_CONN"])
            n = self._u32(base + L["GAIA_SLOT_LEN"])
            seq = self._u32(base + L["GAIA_SLOT_SEQ"])
            data = base + L["GAIA_SLOT_DATA"]
            payload = bytes(self.mem[data : data + n])
            _U32.pack_into(self.mem, base + L["GAIA_SLOT_STATE"], L["GAIA_SLOT_TAKEN"])
            taken.append((seq, Input(i, kind, conn, payload)))
        if not taken:
            return []
        # sequence numbers wrap at 2**32: order by distance from the first one seen, which
        # is within a few dozen of every other in flight
        first = taken[0][0]
        taken.sort(key=lambda t: (t[0] - first + (1 << 31)) & 0xFFFFFFFF)
        return [i for _, i in taken]

    def next_order(self) -> int:
        """Number the next input proposed (call in log order): the shim hands it to the server
        only once every input numbered before it has executed."""
        order = self._next_order
        self._next_order = (order + 1) & 0xFFFFFFFF
        if self._next_order == L["GAIA_NO_ORDER"]:
            self._next_order = 0
        return order

    def open_orders(self) -> None:
        """Before the server serves clients: inputs execute from the next number on (those of
        an earlier leadership are gone with their clients)."""
        _U32.pack_into(self.mem, L["GAIA_HDR_RELEASED"], self._next_order)

    def answer(
        self, slot: int, committed: bool, index: int = 0, order: int | None = None
    ) -> None:
        """Release the shim's call: deliver the input (committed) or fail it (lost); `order`
        is its number from `next_order` if it was proposed."""
        base = self._slot(slot)
        result = L["GAIA_RESULT_OK"] if committed else L["GAIA_RESULT_LOST"]
        _U32.pack_into(self.mem, base + L["GAIA_SLOT_RESULT"], result)
        _U64.pack_into(self.mem, base + L["GAIA_SLOT_INDEX"], index)
        numbered = L["GAIA_NO_ORDER"] if order is None else order
        _U32.pack_into(self.mem, base + L["GAIA_SLOT_ORDER"], numbered)
        _U32.pack_into(self.mem, base + L["GAIA_SLOT_STATE"], L["GAIA_SLOT_DONE"])
        _futex(self._base + base + L["GAIA_SLOT_STATE"], _FUTEX_WAKE, 1)

    # -- connections
    def _conn(self, i: int) -> int:
        return L["GAIA_CONNS_OFFSET"] + i * L["GAIA_CONN_SIZE"]

    def output(self, conn: int) -> ConnOutput:
        base = self._conn(conn)
        nbytes = self._u64(base + L["GAIA_CONN_OUT_BYTES"])
        return ConnOutput(nbytes, self._u32(base + L["GAIA_CONN_OUT_CRC"]))

    def input_bytes(self, conn: int) -> int:
        """Bytes the server has read from connection entry `conn`."""
        return self._u64(self._conn(conn) + L["GAIA_CONN_IN_BYTES"])

    def register_replay(
        self, port: int, output: ConnOutput = NO_OUTPUT, *, ordered: bool = False
    ) -> int:
        """Reserve a replay entry for a connection about to come from local `port`, its output
        counted on from `output` (a connection reopened by a restore). An `ordered` one (the
        replayer's) is read by the server only in its turns; any other (a query) freely."""
        if not self._free_replay:
            raise RuntimeError(f"all {L['GAIA_CONNS'] // 2} replay connection entries in use")
        i = self._free_replay.popleft()
        base = self._conn(i)
        _U64.pack_into(self.mem, base + L["GAIA_CONN_IN_BYTES"], 0)
        _U32.pack_into(self.mem, base + L["GAIA_CONN_ORDERED"], int(ordered))
        self.seed_output(i, output)
        _U32.pack_into(self.mem, base + L["GAIA_CONN_PORT"], port)
        _U32.pack_into(self.mem, base + L["GAIA_CONN_STATE"], L["GAIA_CONN_REGISTERED"])
        return i

    def seed_output(self, conn: int, output: ConnOutput) -> None:
        """Set what entry `conn`'s output counts on from (the server writes nothing meanwhile)."""
        base = self._conn(conn)
        _U64.pack_into(self.mem, base + L["GAIA_CONN_OUT_BYTES"], output.nbytes)
        _U32.pack_into(self.mem, base + L["GAIA_CONN_OUT_CRC"], output.crc)

    def release_replay(self, conn: int) -> None:
        base = self._conn(conn)
        _U32.pack_into(self.mem, base + L["GAIA_CONN_STATE"], L["GAIA_CONN_FREE"])
        _U32.pack_into(self.mem, base + L["GAIA_CONN_PORT"], 0)
        self._free_replay.append(conn)

    # -- turns: the order a backup's server reads its replay connections in
    def reset_turns(self) -> None:
        """Forget the turns a previous server did not take (a new server starts where the shim
        found the head at attach)."""
        _U32.pack_into(self.mem, L["GAIA_HDR_TURN_TAIL"], self._u32(L["GAIA_HDR_TURN_HEAD"]))

    def turns_pending(self) -> int:
        """Turns announced that the server has not read in full yet."""
        tail, head = self._u32(L["GAIA_HDR_TURN_TAIL"]), self._u32(L["GAIA_HDR_TURN_HEAD"])
        return (tail - head) & 0xFFFFFFFF

    def announce_turn(self, conn: int, nbytes: int) -> bool:
        """The next `nbytes` the server reads on replay connections come from entry `conn`:
        False (nothing announced) while the ring is full."""
        if self.turns_pending() >= L["GAIA_TURNS"]:
            return False
        tail = self._u32(L["GAIA_HDR_TURN_TAIL"])
        base = L["GAIA_TURNS_OFFSET"] + (tail % L["GAIA_TURNS"]) * L["GAIA_TURN_SIZE"]
        _U32.pack_into(self.mem, base + L["GAIA_TURN_CONN"], conn)
        _U32.pack_into(self.mem, base + L["GAIA_TURN_LEN"], nbytes)
        _U32.pack_into(self.mem, L["GAIA_HDR_TURN_TAIL"], (tail + 1) & 0xFFFFFFFF)  # then: valid
        return True

    def close(self) -> None:
        """Unmap and unlink (the server keeps its own mapping until it exits)."""
        if self._base == 0:
            return
        self._base = 0
        del self._anchor
        self.mem.release()
        self._map.close()
        self.path.unlink(missing_ok=True)
