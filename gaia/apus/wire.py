"""The client protocol of a replica daemon: length-prefixed binary frames over TCP.

request:  op u8 | request id u64 | length u32 | body
response: status u8 | request id u64 | log index u64 | length u32 | body

SUBMIT's body is the input; the answer comes once it is committed (OK, with its log index), or
says NOT_LEADER (body: the leader's id, or -1 if unknown) or RETRY (lost in a view change:
submit again) or ERROR (body: why). STATUS answers with a JSON body describing the replica.
QUERY (clusters that run an app) sends its body to this replica's own server outside the log
and answers with the server's reply: for tests and operators comparing replicas, so it must be
read-only (Redis DEBUG DIGEST, a memcached get).
Frames larger than MAX_BODY are refused, so a garbage length cannot make a replica allocate
gigabytes.
"""

from __future__ import annotations

import socket
import struct
from enum import IntEnum

REQUEST = struct.Struct("<BQI")
RESPONSE = struct.Struct("<BQQI")
MAX_BODY = 1 << 20


class Op(IntEnum):
    SUBMIT = 1
    STATUS = 2
    QUERY = 3


class Status(IntEnum):
    OK = 0
    NOT_LEADER = 1
    RETRY = 2
    ERROR = 3


class ProtocolError(ConnectionError):
    """The peer sent something that is not a frame of this protocol, or hung up mid-frame."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ProtocolError("connection closed" if got == 0 else "connection closed mid-frame")
        got += k
    return bytes(buf)


def read_request(sock: socket.socket) -> tuple[Op, int, bytes]:
    op, rid, length = REQUEST.unpack(recv_exact(sock, REQUEST.size))
    if op not in Op.__members__.values():
        raise ProtocolError(f"unknown op {op}")
    if length > MAX_BODY:
        raise ProtocolError(f"body of {length} B exceeds {MAX_BODY} B")
    return Op(op), rid, recv_exact(sock, length) if length else b""


def read_response(sock: socket.socket) -> tuple[Status, int, int, bytes]:
    status, rid, index, length = RESPONSE.unpack(recv_exact(sock, RESPONSE.size))
    if status not in Status.__members__.values() or length > MAX_BODY:
        raise ProtocolError(f"malformed response header (status {status}, length {length})")
    return Status(status), rid, index, recv_exact(sock, length) if length else b""


def request(op: Op, rid: int, body: bytes = b"") -> bytes:
    return REQUEST.pack(op, rid, len(body)) + body


def response(status: Status, rid: int, index: int = 0, body: bytes = b"") -> bytes:
    return RESPONSE.pack(status, rid, index, len(body)) + body
