"""A client of an APUS cluster: submits inputs to the leader, follows redirects.

Implements gaia.systems.ConsensusClient, so the experiment runner drives APUS exactly as it
drives ZooKeeper and etcd. A RETRY answer (the input was lost in a view change) is resubmitted,
so an input may be agreed twice: at-least-once, as a benchmark client needs and no more.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Mapping
from typing import Any

from gaia.apus.wire import Op, ProtocolError, Status, read_response, request


class ApusError(RuntimeError):
    """The cluster did not take the input in time, or refused it (the message says why)."""


class ApusClient:
    def __init__(
        self, members: Mapping[int, tuple[str, int]], first: int | None = None, timeout: float = 10
    ) -> None:
        self.members = dict(members)
        self.timeout = timeout
        self._target = first if first is not None else min(self.members)
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self.last_index = 0

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(self.members[self._target], timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def _drop(self, next_target: int | None = None) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        ids = sorted(self.members)
        self._target = (
            next_target
            if next_target in self.members
            else ids[(ids.index(self._target) + 1) % len(ids)]
        )

    def _call(self, op: Op, body: bytes) -> tuple[Status, int, bytes]:
        rid = next(self._ids)
        sock = self._connect()
        sock.sendall(request(op, rid, body))
        status, got, index, reply = read_response(sock)
        if got != rid:
            raise ProtocolError(f"answer to request {got}, expected {rid}")
        return status, index, reply

    def submit(self, payload: bytes) -> None:
        deadline = time.monotonic() + self.timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status, index, reply = self._call(Op.SUBMIT, payload)
            except (OSError, ProtocolError) as e:
                last = f"replica {self._target}: {e}"
                self._drop()
                time.sleep(0.01)
                continue
            if status == Status.OK:
                self.last_index = index
                return
            if status == Status.NOT_LEADER:
                hint = int(reply or b"-1")
                last = f"replica {self._target} is not the leader (hint {hint})"
                self._drop(hint)
                if hint < 0:
                    time.sleep(0.02)  # an election is on
            elif status == Status.RETRY:
                last = f"replica {self._target}: {reply.decode(errors='replace')}"
            else:
                raise ApusError(f"replica {self._target} refused the input: {reply.decode()}")
        raise ApusError(f"input not committed within {self.timeout:.0f} s: {last}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _ask(address: tuple[str, int], op: Op, body: bytes, timeout: float) -> bytes:
    client = ApusClient({0: address}, timeout=timeout)
    try:
        status, _, answer = client._call(op, body)
    finally:
        client.close()
    if status != Status.OK:
        raise ProtocolError(f"{op.name} answered {status.name}: {answer.decode(errors='replace')}")
    return answer


def replica_status(address: tuple[str, int], timeout: float = 1.0) -> dict[str, Any]:
    """One replica's STATUS (role, view, leader, commit, timings...); raises OSError if down."""
    result: dict[str, Any] = json.loads(_ask(address, Op.STATUS, b"", timeout))
    return result


def query_app(address: tuple[str, int], request: bytes, timeout: float = 5.0) -> bytes:
    """Send a read-only request to one replica's own app server, outside the log (see
    gaia.apus.wire: QUERY), and return the server's raw reply."""
    return _ask(address, Op.QUERY, request, timeout)
