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

With an app in the cluster file (redis, memcached) the replica also runs that unmodified server
with the interposition shim preloaded (gaia.apus.interpose). On the leader an intake thread
proposes each input the shim hands over and answers it once committed; on the others, every
committed entry of a view this replica did not lead is replayed into its server. A new leader
first replays everything before its NOOP and closes the replayed connections of the old
leader's clients, and only then lets its server accept clients. Every `output_period` inputs
on a connection the leader proposes an OUTPUT entry with its server's output so far; the
backups answer with theirs and the core decides. Backups found different are named in a
VERDICT entry and restore their servers when they apply it; a leader found different steps
down and restores its own. Clients of an app cluster talk to the app; SUBMIT is refused.
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
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gaia.apps import AppError
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
    batch_size,
    decode_verdict,
    encode_batch,
    encode_output,
    encode_verdict,
)
from gaia.apus.interpose.host import AppHost, Unrepairable
from gaia.apus.interpose.replay import output_digest
from gaia.apus.interpose.segment import Input
from gaia.apus.storage import LogStore
from gaia.apus.wire import Op, ProtocolError, Status, read_request, response
from gaia.transport.base import PeersUnreachable
from gaia.transport.factory import make_transport

log = logging.getLogger("gaia.apus.replica")

SUBMIT_TIMEOUT_S = 10.0


Answer = Callable[[Status, int, bytes], None]


@dataclass
class Pending:
    """An input this replica proposed, waiting to be applied; whoever applies it calls `answer`
    at once (no hand-off back to the proposing thread). `deadline` None: never expires (the
    shim's inputs: once proposed, only the log can say whether they count)."""

    view: int
    proposed: float
    answer: Answer
    deadline: float | None
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
        self.max_payload = Layout(core_cfg).max_payload
        self.lock = threading.Lock()  # the core and the pending inputs
        self.io_lock = threading.Lock()  # one thread at a time carries out actions, in order
        self.stopping = threading.Event()
        self.pending: dict[int, Pending] = {}
        self._replies: list[tuple[socket.socket, bytes]] = []
        self.timings: deque[tuple[float, float, float]] = deque(maxlen=200_000)
        # since start, unbounded: count and sums of storage, first-ack and quorum seconds, so
        # that two STATUS snapshots give the exact means of the inputs between them
        self.timing_totals = [0, 0.0, 0.0, 0.0]
        self.exit_code = 0
        self.app: AppHost | None = None
        if config.app:
            member = config.members[replica_id]
            self.app = AppHost(
                config.app,
                cluster_id=config.cluster_id,
                replica_id=replica_id,
                address=(member.host, member.app_port),
                workdir=config.data_dir / f"app{replica_id}",
                max_data=self.max_payload,
                checkpoint_every=config.checkpoint_every,
            )
        self._led_views: set[int] = set()  # my server executed these views' entries itself
        self._leading_view = -1  # the view _steer_app last saw this replica lead
        self._serving_from = 0  # that view's first index (the NOOP): the server waits for it
        self._inputs_on: Counter[int] = Counter()  # per connection entry, for output checks
        self.proposed_inputs: Counter[str] = Counter()  # the shim's inputs proposed, by kind
        self.output_verdicts: Counter[str] = Counter()
        self._restore_wanted = threading.Event()  # a verdict found this server's output differs
        self._restoring = False  # the server is being restarted: _apply must not feed it
        self.unrepairable = False  # diverged even when rebuilt from the whole log
        # the last entry _apply was given: the core's `applied` runs ahead of it until the
        # Apply action is taken from ready(), and replay must follow what was handed over
        self._delivered = 0
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
                            if a.role == LEADER:
                                with self.lock:
                                    self._led_views.add(a.view)
                        case SendSnapshot():
                            log.warning("replica %d: peer %d needs a snapshot", self.id, a.peer)
                        case OutputDecision():
                            self.output_verdicts[a.verdict.name.lower()] += 1
                            level = logging.INFO if not a.divergent else logging.WARNING
                            log.log(level, "replica %d: output check %s", self.id, a)
                            if self.id in a.divergent:
                                self._step_down_diverged()
                            elif a.divergent:
                                self._propose_verdict(a.index, a.divergent)
                if persists:
                    self.store.write(persists)
                    with self.lock:
                        self.core.persist_done(persists[-1].seq)
        self._send_replies()

    def _apply(self, entries: tuple[Entry, ...]) -> None:
        """Committed entries (lock held): answer the inputs waiting for them; with an app,
        replay what this replica's server has not executed itself."""
        now = time.perf_counter()
        replayer = self.app.replayer if self.app is not None and not self._restoring else None
        if entries:
            self._delivered = entries[-1].index
        for e in entries:
            if e.kind == EntryKind.VERDICT and self.app is not None:
                self._take_verdict(*decode_verdict(e.payload))
            if replayer is not None and e.view not in self._led_views:
                replayer.put(e)
            p = self.pending.pop(e.index, None)
            if p is None:
                continue
            if e.view != p.view:  # another leader's entry took this index: ours was lost
                p.answer(Status.RETRY, e.index, b"")
                continue
            stored = p.stored or now
            first_ack = p.first_ack or now
            timing = (stored - p.proposed, first_ack - p.proposed, now - p.proposed)
            self.timings.append(timing)
            totals = self.timing_totals
            totals[0] += 1
            for i, seconds in enumerate(timing, start=1):
                totals[i] += seconds
            p.answer(Status.OK, e.index, b"")

    def _expire(self) -> None:
        """Client inputs not committed in time (lock held) are answered RETRY."""
        now = time.monotonic()
        for index, p in list(self.pending.items()):
            if p.deadline is not None and p.deadline <= now:
                del self.pending[index]
                p.answer(Status.RETRY, index, b"timed out")

    def _client_answer(self, conn: socket.socket, rid: int) -> Answer:
        def answer(status: Status, index: int, body: bytes) -> None:
            self._replies.append((conn, response(status, rid, index, body)))

        return answer

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
        if self.app is not None:
            self.app.start(self._report_output)
            threading.Thread(target=self._intake, name="intake", daemon=True).start()
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
                        if self.app is not None:
                            self._steer_app(self.app)
                self._pump()
        finally:
            server.close()
            self.stopping.set()
            if self.app is not None:
                self.app.stop()
            with self.io_lock, self.lock:
                self.transport.close()
                self.store.close()

    # ------------------------------------------------------------------ the app
    def _first_index_of_view(self) -> int:
        """The index of the current view's first entry (a new leader's NOOP), lock held."""
        c = self.core
        index = c.last_index
        while index > c.snap_index + 1 and c.view_at(index - 1) == c.view:
            index -= 1
        return index

    def _steer_app(self, app: AppHost) -> None:
        """Each tick (lock held): keep the server alive and in the role the core is in. A new
        leader serves only once its NOOP is applied and everything before it replayed, after
        closing the old leader's clients' replayed connections everywhere."""
        app.segment.beat()
        if self._restoring:  # the restore thread owns the server and the replayer for now
            return
        if not app.alive():
            log.error("replica %d: the %s server died: stopping", self.id, app.app.name)
            self.exit_code = 3
            self.stopping.set()
            return
        replayer = app.replayer
        assert replayer is not None
        if self.core.role != LEADER:
            app.serve(False)
            if self._restore_wanted.is_set() and not self.unrepairable:
                self._restoring = True
                threading.Thread(target=self._restore, args=(app,), name="restore").start()
            return
        if self._leading_view != self.core.view:  # newly elected (maybe re-elected): start over
            self._leading_view = self.core.view
            self._led_views.add(self.core.view)
            self._serving_from = self._first_index_of_view()
            app.serve(False)
            return
        if app.serving or self._delivered < self._serving_from or not replayer.idle():
            return
        for conn in replayer.open_connections():
            self.core.propose(EntryKind.CLOSE, conn, b"")
        replayer.close_all(self._serving_from)
        app.conn_ids.clear()
        app.serve(True)

    def _take_verdict(self, index: int, divergent: tuple[int, ...]) -> None:
        """A committed VERDICT (lock held): if it names this replica, its server is restored."""
        if self.id in divergent and not self.unrepairable:
            log.warning("replica %d: the check at %d found my server different", self.id, index)
            self._restore_wanted.set()

    def _propose_verdict(self, index: int, divergent: tuple[int, ...]) -> None:
        """Tell the backups whose output differed from the majority's, through the log: each
        restores its server when it applies the VERDICT entry naming it."""
        with self.lock:
            try:
                self.core.propose(EntryKind.VERDICT, 0, encode_verdict(index, divergent))
            except (NotLeader, Backpressure) as e:  # the next check will find it again
                log.warning("replica %d: verdict on %d not proposed: %s", self.id, index, e)

    def _step_down_diverged(self) -> None:
        """This leader's server answered differently from a majority of backups: it stops
        leading (its clients are dropped, another replica is elected) and restores its server
        like a diverged backup's, from the log."""
        if self.app is None or self.unrepairable:
            return
        log.warning("replica %d: my server's output differs: stepping down", self.id)
        with self.lock:
            self.core.step_down()
        self._restore_wanted.set()

    def _restore(self, app: AppHost) -> None:
        """The guard's repair of a backup whose server diverged: restart the server from its
        newest checkpoint (outside the core lock: it takes a while) and replay everything
        committed after it, from this replica's own log."""
        log.warning("replica %d: restoring the %s server", self.id, app.app.name)
        try:
            held = app.restore()
        except Unrepairable as error:
            log.error("replica %d: %s: no more restores; its output is not checked", self.id, error)
            self.unrepairable = True
            self._restoring = False
            return
        except AppError as error:
            log.error("replica %d: restore failed: %s: stopping", self.id, error)
            self.exit_code = 3
            self.stopping.set()
            return
        # what the old replayer reported until it stopped is answered by this restore; the new
        # one has replayed nothing yet, so a divergence it finds from now on asks again
        self._restore_wanted.clear()
        with self.lock:
            c = self.core
            if held < c.snap_index:
                log.error("replica %d: the log after %d is compacted: cannot replay", self.id, held)
            assert app.replayer is not None
            for entry in c.entries[max(held - c.snap_index, 0) : self._delivered - c.snap_index]:
                app.replayer.put(entry)
            self._led_views.clear()  # the new server executed nothing by itself
            self._restoring = False
            upto = self._delivered
        log.warning("replica %d: restored from index %d, replaying to %d", self.id, held, upto)

    def _report_output(self, index: int, digest: int) -> None:
        with self.lock:
            self.core.report_output(index, digest)
        self._pump()

    def _intake(self) -> None:
        """The leader's intake: propose what the shim submits, answer it when committed."""
        assert self.app is not None
        segment = self.app.segment
        while not self.stopping.is_set():
            seen = segment.doorbell()
            inputs = segment.take()
            if not inputs:
                segment.wait(seen, 0.05)
                continue
            proposed = [self._propose_inputs(self.app, g) for g in self._entries_for(inputs)]
            self._pump()  # the log write (L2) and the writes to the backups (L3)
            stored = time.perf_counter()
            with self.lock:
                for index in proposed:
                    if (p := self.pending.get(index)) is not None:
                        p.stored = stored

    def _entries_for(self, inputs: list[Input]) -> Iterator[list[Input]]:
        """The inputs of one look, grouped by the entry that carries them: a run of DATA inputs
        on distinct connections (a batch the shim agreed at epoll_wait, or reads of several
        server threads) goes into one BATCH entry as far as a log slot holds it, so a round
        costs one entry however many clients it serves; anything else is an entry of its own."""
        group: list[Input] = []
        size = 0
        for i in inputs:
            if i.kind != EntryKind.DATA:
                if group:
                    yield group
                    group, size = [], 0
                yield [i]
                continue
            fits = batch_size(len(group) + 1, size + len(i.payload)) <= self.max_payload
            if group and (not fits or any(g.conn == i.conn for g in group)):
                yield group
                group, size = [], 0
            group.append(i)
            size += len(i.payload)
        if group:
            yield group

    def _propose_inputs(self, app: AppHost, group: list[Input]) -> int:
        """Propose one entry's inputs; its log index, or 0 if they were answered already."""
        deadline = time.monotonic() + SUBMIT_TIMEOUT_S
        while True:
            with self.lock:
                if self.core.role != LEADER:
                    break
                if self.core.room() > self._checks_due(app, group):
                    return self._propose_locked(app, group)
            if time.monotonic() > deadline:
                break
            time.sleep(0.0002)
        for i in group:
            app.segment.answer(i.slot, committed=False)
        return 0

    def _output_due(self, i: Input) -> bool:
        """Whether input `i` is its connection's `output_period`-th (lock held): an OUTPUT
        entry with the output so far goes before it."""
        period = self.config.output_period
        return (
            bool(period)
            and i.kind == EntryKind.DATA
            and (self._inputs_on[i.conn] + 1) % period == 0
        )

    def _checks_due(self, app: AppHost, group: list[Input]) -> int:
        """How many OUTPUT entries `_propose_locked` puts before these inputs (lock held)."""
        return sum(1 for i in group if i.conn in app.conn_ids and self._output_due(i))

    def _propose_locked(self, app: AppHost, group: list[Input]) -> int:
        """Propose one entry's shim inputs (lock held, room checked): its log index, or 0 if
        they were all answered here (their connections are unknown). Every
        `output_period`-th input on a connection is preceded by an OUTPUT entry with the output
        so far: the server is blocked reading this very input, or in epoll_wait where the shim
        agrees a batch of inputs for it, so that output is complete."""
        carried: list[tuple[Input, int]] = []
        for i in group:
            if i.kind == EntryKind.CONNECT:
                conn = app.conn_ids[i.conn] = app.new_conn_id(self.core.view)
                self._inputs_on[i.conn] = 0
            elif (known := app.conn_ids.get(i.conn)) is not None:
                conn = known
            else:  # accepted under an earlier leadership of mine: that client is gone
                app.segment.answer(i.slot, committed=False)
                continue
            if self._output_due(i):
                out = app.segment.output(i.conn)
                self.core.propose(
                    EntryKind.OUTPUT, conn, encode_output(out.nbytes, output_digest(out))
                )
            if i.kind == EntryKind.DATA:
                self._inputs_on[i.conn] += 1
            carried.append((i, conn))
            self.proposed_inputs[EntryKind(i.kind).name.lower()] += 1
        if not carried:
            return 0
        t0 = time.perf_counter()
        if len(carried) == 1:
            ((one, conn),) = carried
            index = self.core.propose(EntryKind(one.kind), conn, one.payload)
        else:
            batch = encode_batch([(conn, i.payload) for i, conn in carried])
            index = self.core.propose(EntryKind.BATCH, 0, batch)
            self.proposed_inputs["batch_entries"] += 1
        numbered = [
            (i.slot, app.segment.next_order() if i.kind == EntryKind.DATA else None)
            for i, _ in carried
        ]  # in log order: the order the server executes them in

        def answer(status: Status, at: int, _body: bytes) -> None:
            for slot, order in numbered:
                app.segment.answer(slot, committed=status == Status.OK, index=at, order=order)

        self.pending[index] = Pending(self.core.view, t0, answer, None)
        if group[0].kind == EntryKind.CLOSE:
            del app.conn_ids[group[0].conn]
        return index

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
                    elif op == Op.QUERY:
                        conn.sendall(self._query(rid, body))
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
            if self.app is not None:
                why = f"this cluster replicates {self.app.app.name}: send inputs to it".encode()
                return response(Status.ERROR, rid, 0, why)
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
                    p = Pending(self.core.view, t0, self._client_answer(conn, rid), deadline)
                    self.pending[index] = p
                    break
            if time.monotonic() > deadline:
                return response(Status.ERROR, rid, 0, b"backpressure: log full for 10 s")
            time.sleep(0.0002)
        self._pump()
        p.stored = time.perf_counter()
        return None

    def _query(self, rid: int, request: bytes) -> bytes:
        if self.app is None:
            return response(Status.ERROR, rid, 0, b"this cluster runs no app")
        try:
            return response(Status.OK, rid, 0, self.app.query(request))
        except OSError as e:
            return response(Status.ERROR, rid, 0, f"query failed: {e}".encode())

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
            if self.app is not None:
                replayer = self.app.replayer
                idle = replayer is None or replayer.idle()
                if self._restoring or (self._restore_wanted.is_set() and not self.unrepairable):
                    # the server is known to differ and about to be rebuilt, or being rebuilt:
                    # it holds only the snapshot it started from (the new replayer may not be
                    # fed yet)
                    replayed = self.app.started_from
                elif idle or replayer is None:
                    replayed = self._delivered
                else:
                    replayed = replayer.applied
                info["app"] = {
                    **self.app.status(),
                    "proposed": dict(self.proposed_inputs),
                    "output_checks": dict(self.output_verdicts),
                    "unrepairable": self.unrepairable,
                    # every applied entry up to here is in this replica's server
                    "replayed_upto": replayed,
                }
            count, storage_s, first_ack_s, quorum_s = self.timing_totals
            info["timing_totals"] = {
                "count": count,
                "storage_s": storage_s,
                "first_ack_s": first_ack_s,
                "quorum_s": quorum_s,
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
    try:
        daemon.run()
    except AppError as e:
        print(f"gaia.apus.replica: {e}", file=sys.stderr)
        return 3
    return daemon.exit_code


if __name__ == "__main__":
    sys.exit(main())
