"""The APUS replica daemon: the pure core wired to a transport, a log file and clients.

    python -m gaia.apus.replica --config cluster.json --id N

Threads: the main loop waits on the transport (a peer wrote into our region) or the next tick,
and feeds the core; one thread per client connection proposes inputs and waits for their
commit. One lock guards the core, the log and outgoing writes, so the core stays the
single-threaded state machine it is written as. Proposing in the client's thread means a new
input goes to the backups (L3) at once, without waking the main loop first.

On the leader each committed input gets the APUS paper's Table II/III timings: storage time
(L2: the local log write, fsync included per policy), first ack and majority ack (quorum), all
from the proposal. STATUS reports their medians. SIGTERM stops cleanly; a restarted replica
recovers its log and catches up from the leader.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gaia.apus.config import ClusterConfig, ConfigError
from gaia.apus.core.layout import Layout
from gaia.apus.core.replica import LEADER, Replica
from gaia.apus.core.types import (
    Apply,
    Backpressure,
    Entry,
    EntryKind,
    NotLeader,
    OutputDecision,
    Persist,
    RemoteWrite,
    RoleChange,
    SendSnapshot,
)
from gaia.apus.storage import LogStore
from gaia.apus.wire import Op, ProtocolError, Status, read_request, response
from gaia.transport.base import PeersUnreachable
from gaia.transport.factory import make_transport

log = logging.getLogger("gaia.apus.replica")

SUBMIT_TIMEOUT_S = 10.0


@dataclass
class Pending:
    """An input this replica proposed, waiting to be applied; whoever applies it answers the
    client at once on `conn` (no hand-off back to the client's thread)."""

    view: int
    proposed: float
    conn: socket.socket
    rid: int
    deadline: float
    stored: float = 0.0
    first_ack: float = 0.0


class ReplicaDaemon:
    def __init__(self, config: ClusterConfig, replica_id: int) -> None:
        if replica_id not in config.members:
            raise ConfigError(f"replica {replica_id} is not a member {sorted(config.members)}")
        self.config = config
        self.id = replica_id
        core_cfg = config.core(replica_id, seed=int(time.time_ns()) & 0xFFFF)
        self.store = LogStore(config.log_path(replica_id), config.durability)
        recovered = self.store.load()
        self.transport = make_transport(
            config.transport,
            replica_id,
            Layout(core_cfg).size,
            config.spec(),
            **config.transport_options,
        )
        self.core = Replica(core_cfg, self.transport.region, recovered)
        self.lock = threading.Lock()  # the core and the pending inputs
        self.io_lock = threading.Lock()  # one thread at a time carries out actions, in order
        self.stopping = threading.Event()
        self.pending: dict[int, Pending] = {}
        self._replies: list[tuple[socket.socket, bytes]] = []
        self.timings: deque[tuple[float, float, float]] = deque(maxlen=200_000)
        log.info(
            "replica %d: recovered view %d, %d entries (%s, %s)",
            replica_id,
            recovered.hard_state.view,
            len(recovered.entries),
            config.transport,
            config.durability,
        )

    # ------------------------------------------------------------------ core plumbing
    def _pump(self) -> None:
        """Carry out the core's actions until it has none left.

        One thread at a time does the I/O (writes into peers' regions, the log write and its
        fsync), and it does it without holding the core lock: other clients keep proposing
        meanwhile, and the next round carries all their inputs in one Persist, one fsync
        (group commit) and one write per backup each."""
        with self.io_lock:
            while True:
                with self.lock:
                    actions = self.core.ready()
                    for a in actions:
                        if isinstance(a, Apply):
                            self._apply(a.entries)
                if not actions:
                    break
                persists: list[Persist] = []
                for a in actions:
                    match a:
                        case RemoteWrite():
                            self.transport.write(a.peer, a.offset, a.data)
                        case Persist():
                            persists.append(a)
                        case RoleChange():
                            log.info("replica %d: %s in view %d (leader %s)", self.id, *a)
                        case SendSnapshot():
                            log.warning("replica %d: peer %d needs a snapshot", self.id, a.peer)
                        case OutputDecision():
                            log.info("replica %d: output check %s", self.id, a)
                if persists:
                    self.store.write(persists)
                    with self.lock:
                        self.core.persist_done(persists[-1].seq)
        self._send_replies()

    def _apply(self, entries: tuple[Entry, ...]) -> None:
        """Committed entries (lock held): answer the clients waiting for them."""
        now = time.perf_counter()
        for e in entries:
            p = self.pending.pop(e.index, None)
            if p is None:
                continue
            if e.view != p.view:  # another leader's entry took this index: ours was lost
                self._replies.append((p.conn, response(Status.RETRY, p.rid, e.index)))
                continue
            stored = p.stored or now
            first_ack = p.first_ack or now
            self.timings.append((stored - p.proposed, first_ack - p.proposed, now - p.proposed))
            self._replies.append((p.conn, response(Status.OK, p.rid, e.index)))

    def _expire(self) -> None:
        """Inputs not committed in time (lock held) are answered RETRY."""
        now = time.monotonic()
        while self.pending:
            index, p = next(iter(self.pending.items()))
            if p.deadline > now:
                return
            del self.pending[index]
            self._replies.append((p.conn, response(Status.RETRY, p.rid, index, b"timed out")))

    def _send_replies(self) -> None:
        with self.lock:
            replies, self._replies = self._replies, []
        for conn, data in replies:
            try:
                conn.sendall(data)
            except OSError as e:  # the client went away; its input is agreed all the same
                log.info("replica %d: could not answer a client: %s", self.id, e)

    def _note_first_acks(self) -> None:
        if self.core.role != LEADER or not self.pending:
            return
        acked = max(self.core.match.values(), default=0)
        now = time.perf_counter()
        for index, p in self.pending.items():
            if index <= acked and not p.first_ack:
                p.first_ack = now

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        try:
            self.transport.connect(timeout=5.0)
        except PeersUnreachable as e:
            log.warning("%s; carrying on: the core treats them as failed until they answer", e)
        server = self._serve_clients()
        tick = self.config.timing.tick_ms / 1000
        next_tick = time.monotonic() + tick
        try:
            while not self.stopping.is_set():
                changed = self.transport.wait(max(0.0, next_tick - time.monotonic()))
                with self.lock:
                    if changed:
                        self.core.memory_changed()
                        self._note_first_acks()
                    now = time.monotonic()
                    if now >= next_tick:
                        self.core.tick()
                        self._expire()
                        next_tick = max(next_tick + tick, now - 5 * tick)
                self._pump()
        finally:
            server.close()
            with self.io_lock, self.lock:
                self.transport.close()
                self.store.close()

    # ------------------------------------------------------------------ clients
    def _serve_clients(self) -> socket.socket:
        m = self.config.members[self.id]
        server = socket.create_server((m.host, m.client_port), reuse_port=False)
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return server

    def _accept(self, server: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    op, rid, body = read_request(conn)
                    if op == Op.STATUS:
                        conn.sendall(
                            response(Status.OK, rid, 0, json.dumps(self.status()).encode())
                        )
                    elif (refusal := self._submit(conn, rid, body)) is not None:
                        conn.sendall(refusal)
            except (ProtocolError, OSError) as e:
                if not isinstance(e, ProtocolError) or "closed" not in str(e):
                    log.warning("replica %d: dropping a client: %s", self.id, e)

    def _submit(self, conn: socket.socket, rid: int, payload: bytes) -> bytes | None:
        """Propose `payload`; None once it is on its way (the applier will answer), else the
        refusal to send back."""
        deadline = time.monotonic() + SUBMIT_TIMEOUT_S
        while True:
            with self.lock:
                t0 = time.perf_counter()
                try:
                    index = self.core.propose(EntryKind.DATA, rid, payload)
                except NotLeader as e:
                    leader = -1 if e.leader is None else e.leader
                    return response(Status.NOT_LEADER, rid, 0, str(leader).encode())
                except ValueError as e:
                    return response(Status.ERROR, rid, 0, str(e).encode())
                except Backpressure:
                    index = 0
                if index:
                    p = Pending(self.core.view, t0, conn, rid, deadline)
                    self.pending[index] = p
                    break
            if time.monotonic() > deadline:
                return response(Status.ERROR, rid, 0, b"backpressure: log full for 10 s")
            time.sleep(0.0002)
        self._pump()
        p.stored = time.perf_counter()
        return None

    def status(self) -> dict[str, Any]:
        with self.lock:
            c = self.core
            timings = list(self.timings)
            info: dict[str, Any] = {
                "id": self.id,
                "role": c.role,
                "view": c.view,
                "leader": c.leader,
                "commit": c.commit,
                "applied": c.applied,
                "last_index": c.last_index,
                "durable_index": c.durable_index,
                "members": list(c.members),
                "transport": self.config.transport,
                "durability": self.config.durability,
                "log_syncs": self.store.syncs,
                "transport_stats": vars(self.transport.stats).copy(),
                "failed_peers": sorted(self.transport.failed_peers),
            }
        if timings:
            storage, first_ack, quorum = zip(*timings, strict=True)
            info["timings_us"] = {
                "count": len(timings),
                "storage_median": statistics.median(storage) * 1e6,
                "first_ack_median": statistics.median(first_ack) * 1e6,
                "quorum_median": statistics.median(quorum) * 1e6,
            }
        return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m gaia.apus.replica", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--config", type=Path, required=True, help="the cluster file (JSON)")
    ap.add_argument("--id", type=int, required=True, help="this replica's id in it")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        daemon = ReplicaDaemon(ClusterConfig.load(args.config), args.id)
    except (ConfigError, OSError) as e:
        print(f"gaia.apus.replica: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: daemon.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: daemon.stopping.set())
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
