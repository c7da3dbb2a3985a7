"""A deterministic world for APUS cores: simulated memory network, disks, crashes and clients.

Everything random comes from one seeded generator, so a seed replays exactly. Each step is one
tick: writes due are applied into their target regions (possibly torn), disk writes due
complete in FIFO order, every live replica ticks and reads its memory, the client proposes, and
faults strike. The checker (`invariants.Checker`) sees every applied entry and every new
leader and raises `Violation` on the first broken safety property.
"""

from __future__ import annotations

import heapq
import random
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gaia.apus.core.layout import Layout
from gaia.apus.core.replica import LEADER, Replica
from gaia.apus.core.types import (
    Action,
    Apply,
    Backpressure,
    CoreConfig,
    Entry,
    EntryKind,
    HardState,
    NotLeader,
    OutputDecision,
    Persist,
    Recovered,
    RemoteWrite,
    RoleChange,
    SafetyViolation,
    SendSnapshot,
    SnapshotMeta,
    decode_output,
    encode_members,
    encode_output,
)
from gaia.apus.sim.invariants import Checker, Violation

FAULT_KINDS = (
    "delay", "drop", "tear", "crash", "partition", "slow", "snapshot", "reconfig", "stepdown"
)  # fmt: skip


@dataclass(frozen=True)
class Faults:
    """Which faults strike during the fault phase (all stop for the recovery phase)."""

    kinds: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Faults:
        if text in ("all", ""):
            return cls(frozenset(FAULT_KINDS) if text == "all" else frozenset())
        if text == "none":
            return cls(frozenset())
        kinds = frozenset(k.strip() for k in text.split(","))
        unknown = kinds - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: all, none, {FAULT_KINDS}")
        return cls(kinds)

    def __contains__(self, kind: str) -> bool:
        return kind in self.kinds

    def without(self, kind: str) -> Faults:
        return Faults(self.kinds - {kind})

    def __str__(self) -> str:
        return ",".join(k for k in FAULT_KINDS if k in self.kinds) or "none"


@dataclass
class Disk:
    """What survives a crash: hard state, the latest snapshot (meta and application state) and
    the log after it. Persist actions land here only when their simulated write completes."""

    hard_state: HardState = field(default_factory=lambda: HardState(0, None))
    snapshot: SnapshotMeta | None = None
    snapshot_state: tuple[Entry, ...] = ()
    entries: list[Entry] = field(default_factory=list)

    def apply(self, p: Persist) -> None:
        if p.hard_state is not None:
            self.hard_state = p.hard_state
        if p.snapshot is not None:
            self.entries = [e for e in self.entries if e.index > p.snapshot.index]
        if p.truncate_after is not None:
            self.entries = [e for e in self.entries if e.index <= p.truncate_after]
        self.entries.extend(p.entries)

    def recovered(self) -> Recovered:
        snap = self.snapshot
        entries = tuple(e for e in self.entries if snap is None or e.index > snap.index)
        return Recovered(self.hard_state, snap, entries)


@dataclass
class Node:
    """One simulated machine: a core (None while crashed), its region, disk and application."""

    id: int
    cfg: CoreConfig
    region: bytearray
    disk: Disk = field(default_factory=Disk)
    core: Replica | None = None
    applied: list[Entry] = field(default_factory=list)  # the application's state: what it ran
    persists: deque[tuple[int, Persist]] = field(default_factory=deque)  # (done at tick, op)
    dirty: bool = False
    slow: bool = False
    down_since: int = 0
    incarnation: int = 0

    @property
    def durable_view(self) -> int:
        return self.disk.hard_state.view

    def boot(self) -> None:
        self.region[:] = bytes(len(self.region))
        rec = self.disk.recovered()
        self.core = Replica(self.cfg, memoryview(self.region), rec)
        self.applied = list(self.disk.snapshot_state)
        self.persists.clear()
        self.incarnation += 1


@dataclass(frozen=True)
class SimParams:
    replicas: int
    seed: int
    faults: Faults
    fault_ticks: int = 220
    recovery_ticks: int = 260
    spares: int = 1
    slots: int = 16
    slot_size: int = 256
    propose_rate: float = 0.5
    output_every: int = 25
    corrupt_output: int | None = None  # this replica's application computes wrong outputs


@dataclass
class Stats:
    steps: int = 0
    commits: int = 0
    view_changes: int = 0
    crashes: int = 0
    snapshots: int = 0
    reconfigs: int = 0
    stepdowns: int = 0  # a leader stopped leading (its app's output differed)
    acked: int = 0


class World:
    """Runs one seed. `run()` returns Stats or raises Violation."""

    def __init__(self, p: SimParams, trace: Callable[[str], None] | None = None) -> None:
        self.p = p
        self.rng = random.Random(p.seed)
        self.now = 0
        self.stats = Stats()
        self._trace = trace
        members = tuple(range(p.replicas))
        self.nodes: dict[int, Node] = {}
        for i in range(p.replicas + p.spares):
            cfg = CoreConfig(
                replica_id=i,
                members=members if i < p.replicas else (),
                max_members=p.replicas + p.spares,
                slots=p.slots,
                slot_size=p.slot_size,
                seed=p.seed,
            )
            self.nodes[i] = Node(i, cfg, bytearray(Layout(cfg).size))
        self.active = set(range(p.replicas))  # machines that are switched on (spares join later)
        for i in self.active:
            self.nodes[i].boot()
        self.spare_ids = list(range(p.replicas, p.replicas + p.spares))
        self.checker = Checker(corrupt=p.corrupt_output)
        self._wire: list[tuple[int, int, int, int, object]] = []  # (due, order, src, dst, msg)
        self._order = 0
        self.cut: set[frozenset[int]] = set()
        self._client_seq = 0
        self._pending: dict[int, tuple[int, bytes]] = {}  # index -> (view, payload) proposed
        self.faulty = True
        self._reconfig: tuple[str, int] | None = None  # ("remove"|"add", id) in progress

    # ------------------------------------------------------------------ tracing
    def log(self, msg: str) -> None:
        if self._trace is not None:
            self._trace(f"t={self.now:<4} {msg}")

    # ------------------------------------------------------------------ main loop
    def run(self) -> Stats:
        p = self.p
        try:
            for _ in range(p.fault_ticks):
                self.step()
            self.heal_all()
            self.faulty = False
            self._liveness()
        except SafetyViolation as e:
            raise Violation(str(e), self.now) from e
        except Violation as v:
            v.tick = self.now if v.tick < 0 else v.tick
            raise
        return self.stats

    def step(self) -> None:
        self.now += 1
        self.stats.steps += 1
        self._deliver()
        self._complete_persists()
        order = sorted(self.active, key=lambda _: self.rng.random())
        for i in order:
            node = self.nodes[i]
            if node.core is None or (node.slow and self.rng.random() < 0.7):
                continue
            node.core.tick()
            self._run_actions(node)
            if node.dirty:
                node.dirty = False
                node.core.memory_changed()
                self._run_actions(node)
        self._client()
        if self.faulty:
            self._faults()
        self.checker.check_views(self.nodes.values())

    # ------------------------------------------------------------------ network
    def _send(self, src: int, dst: int, msg: object) -> None:
        f = self.p.faults
        if self.faulty and "drop" in f and self.rng.random() < 0.03:
            return
        delay = self.rng.randrange(4) if self.faulty and "delay" in f else 0
        self._order += 1
        heapq.heappush(self._wire, (self.now + delay, self._order, src, dst, msg))

    def _deliver(self) -> None:
        while self._wire and self._wire[0][0] <= self.now:
            _, _, src, dst, msg = heapq.heappop(self._wire)
            node = self.nodes[dst]
            if node.core is None or frozenset((src, dst)) in self.cut:
                continue
            if isinstance(msg, RemoteWrite):
                data = msg.data
                if self.faulty and "tear" in self.p.faults and self.rng.random() < 0.03:
                    data = data[: self.rng.randrange(len(data))]
                node.region[msg.offset : msg.offset + len(data)] = data
                node.dirty = True
            elif isinstance(msg, SendSnapshot):
                self._install_snapshot(self.nodes[src], node, msg.meta)

    def _install_snapshot(self, src: Node, dst: Node, meta: SnapshotMeta) -> None:
        if src.disk.snapshot != meta or dst.core is None:
            return  # the leader compacted again meanwhile: it will offer the newer one
        state = src.disk.snapshot_state
        if dst.core.install_snapshot(meta):
            dst.disk.snapshot, dst.disk.snapshot_state = meta, state
            dst.applied = list(state)
            self.checker.on_snapshot(dst.id, state)
            self.log(f"r{dst.id} installs snapshot at {meta.index} from r{src.id}")
            self._run_actions(dst)

    # ------------------------------------------------------------------ disks
    def _complete_persists(self) -> None:
        for node in self.nodes.values():
            if node.core is not None:
                self._flush_disk(node)
                self._run_actions(node)

    def _flush_disk(self, node: Node) -> None:
        """Complete the disk writes that are due, in order, and tell the core."""
        done = None
        while node.persists and node.persists[0][0] <= self.now:
            _, op = node.persists.popleft()
            node.disk.apply(op)
            done = op.seq
        if done is not None and node.core is not None:
            node.core.persist_done(done)

    # ------------------------------------------------------------------ actions
    def _run_actions(self, node: Node) -> None:
        """Carry out the core's actions until it has none left (a zero-latency disk answers at
        once, and the answer produces more actions)."""
        while node.core is not None and (actions := node.core.ready()):
            for a in actions:
                self._carry_out(node, a)

    def _carry_out(self, node: Node, a: Action) -> None:
        match a:
            case RemoteWrite() | SendSnapshot():
                if frozenset((node.id, a.peer)) not in self.cut:
                    self._send(node.id, a.peer, a)
            case Persist():
                slow_disk = self.faulty and "delay" in self.p.faults
                due = self.now + (self.rng.randrange(3) if slow_disk else 0)
                if node.persists:
                    due = max(due, node.persists[-1][0])
                node.persists.append((due, a))
                if due <= self.now:
                    self._flush_disk(node)
            case Apply():
                self._apply(node, a.entries)
            case RoleChange():
                self._role_change(node, a)
            case OutputDecision():
                self.checker.on_output(a)

    def _apply(self, node: Node, entries: tuple[Entry, ...]) -> None:
        self.checker.on_apply(node.id, len(node.applied), entries)
        core = node.core
        assert core is not None
        if core.role == LEADER:
            self.checker.on_commit(core.view, entries)
        for e in entries:
            node.applied.append(e)
            if e.kind == EntryKind.OUTPUT and core.role != LEADER:
                upto, _ = decode_output(e.payload)
                core.report_output(e.index, self._digest(node, upto))
            if core.role == LEADER and self._pending.get(e.index) == (e.view, e.payload):
                self.stats.acked += 1
                self.checker.on_ack(e)
        self.stats.commits = max(self.stats.commits, len(self.checker.committed))

    def _digest(self, node: Node, upto: int) -> int:
        """The application's output hash after executing entries 1..upto: equal inputs give
        equal hashes, which is what the output checker relies on; `corrupt_output` makes one
        replica's application diverge."""
        h = 0
        for e in node.applied[max(0, upto - 8) : upto]:
            h = zlib.crc32(e.payload, h)
        return h + 1 if node.id == self.p.corrupt_output else h

    def _role_change(self, node: Node, rc: RoleChange) -> None:
        self.log(f"r{node.id} -> {rc.role} view {rc.view} leader {rc.leader}")
        if rc.role == LEADER:
            self.stats.view_changes += 1
            core = node.core
            assert core is not None
            self.checker.on_leader(node.id, rc.view, core)

    # ------------------------------------------------------------------ client and operator
    def leaders(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.core is not None and n.core.role == LEADER]

    def _client(self) -> None:
        if self.rng.random() >= self.p.propose_rate:
            return
        for node in self.leaders():
            core = node.core
            assert core is not None
            self._client_seq += 1
            kind, payload = EntryKind.DATA, b"v%d" % self._client_seq
            if self._client_seq % self.p.output_every == 0:
                upto = core.applied
                kind, payload = EntryKind.OUTPUT, encode_output(upto, self._digest(node, upto))
            try:
                index = core.propose(kind, self._client_seq, payload)
            except (NotLeader, Backpressure):
                continue
            self._pending[index] = (core.view, payload)
            self._run_actions(node)

    def _reconfigure(self) -> None:
        """The operator replaces a machine that has been down for long: remove it, then add a
        spare (two single-member changes, the safe way)."""
        leaders = self.leaders()
        if not leaders:
            return
        core = leaders[0].core
        assert core is not None
        if self._reconfig is None:
            down = [
                i
                for i in core.members
                if self.nodes[i].core is None and self.now - self.nodes[i].down_since > 30
            ]
            if not down or not self.spare_ids:
                return
            self._reconfig = ("remove", down[0])
        verb, who = self._reconfig
        if verb == "add" and who not in self.active:
            self.active.add(who)
            self.nodes[who].boot()
        new = (
            tuple(m for m in core.members if m != who)
            if verb == "remove"
            else tuple(sorted({*core.members, who}))
        )
        if new == core.members:
            self._reconfig = None if verb == "add" else ("add", self.spare_ids.pop(0))
            return
        try:
            core.propose(EntryKind.CONFIG, 0, encode_members(new))
        except (NotLeader, Backpressure, ValueError):
            return
        self.stats.reconfigs += 1
        self.log(f"operator: r{leaders[0].id} proposes members {new}")
        self._run_actions(leaders[0])

    # ------------------------------------------------------------------ faults
    def _faults(self) -> None:
        f, rng = self.p.faults, self.rng
        if "crash" in f and rng.random() < 0.02:
            self._crash(rng.choice(sorted(self.active)))
        for node in self.nodes.values():
            if node.core is None and node.id in self.active and rng.random() < 0.05:
                if "reconfig" in f and rng.random() < 0.5:
                    continue  # stay down longer so the operator may replace it
                self._restart(node)
        if "partition" in f and len(self.active) > 1 and rng.random() < 0.02:
            a, b = rng.sample(sorted(self.active), 2)
            self.cut.add(frozenset((a, b)))
            self.log(f"cut r{a}-r{b}")
        if self.cut and rng.random() < 0.04:
            link = rng.choice(sorted(self.cut, key=sorted))
            self.cut.discard(link)
        if "slow" in f and rng.random() < 0.02:
            node = self.nodes[rng.choice(sorted(self.active))]
            node.slow = not node.slow
        if "snapshot" in f and rng.random() < 0.05:
            self._compact(self.nodes[rng.choice(sorted(self.active))])
        if "reconfig" in f:
            self._reconfigure()
        if "stepdown" in f and rng.random() < 0.01:
            self._step_down()

    def _step_down(self) -> None:
        """A leader stops leading, as the app guard makes one whose output differed."""
        leaders = [n for n in self.nodes.values() if n.core is not None and n.core.role == LEADER]
        if not leaders:
            return
        node = self.rng.choice(leaders)
        assert node.core is not None
        node.core.step_down()
        self.stats.stepdowns += 1
        self.log(f"r{node.id} steps down in view {node.core.view}")
        self._run_actions(node)

    def _compact(self, node: Node) -> None:
        core = node.core
        if core is None or core.applied - core.snap_index < 4:
            return
        index = core.applied - self.rng.randrange(3)
        node.disk.snapshot_state = tuple(node.applied[:index])
        core.compact(index)
        node.disk.snapshot = SnapshotMeta(core.snap_index, core.snap_view, core.snap_members)
        self.stats.snapshots += 1
        self._run_actions(node)

    def _crash(self, i: int) -> None:
        node = self.nodes[i]
        if node.core is None:
            return
        node.core = None
        node.persists.clear()  # not yet durable: lost
        node.down_since = self.now
        self.stats.crashes += 1
        self.log(f"crash r{i}")

    def _restart(self, node: Node) -> None:
        node.boot()
        self.log(f"restart r{node.id} (view {node.disk.hard_state.view})")

    def heal_all(self) -> None:
        self.cut.clear()
        for node in self.nodes.values():
            node.slow = False
            if node.core is None and node.id in self.active:
                self._restart(node)
        self.log("faults stop: all links healed, all machines up")

    # ------------------------------------------------------------------ liveness
    def _liveness(self) -> None:
        """After faults stop, a leader must emerge, commit a new entry, and every member of its
        configuration must apply everything committed, within recovery_ticks."""
        target: int | None = None
        for _ in range(self.p.recovery_ticks):
            self.step()
            leaders = self.leaders()
            if len(leaders) != 1:
                continue
            core = leaders[0].core
            assert core is not None
            if target is None:
                if core.commit > 0 and core.view_at(core.commit) == core.view:
                    target = max(self.checker.committed) if self.checker.committed else 0
                continue
            members = [self.nodes[m] for m in core.members]
            if all(n.core is not None and n.core.applied >= target for n in members):
                self.checker.check_converged(members, target)
                return
        state = {
            n.id: (n.core.role, n.core.view, n.core.commit, n.core.applied)
            for n in self.nodes.values()
            if n.core is not None and n.id in self.active
        }
        raise Violation(
            f"no progress {self.p.recovery_ticks} ticks after faults stopped "
            f"(target {target}); replicas (role, view, commit, applied): {state}",
            self.now,
        )


def run_seed(p: SimParams, trace: Callable[[str], None] | None = None) -> Stats:
    return World(p, trace).run()


__all__ = ["FAULT_KINDS", "Faults", "SimParams", "Stats", "Violation", "World", "run_seed"]
