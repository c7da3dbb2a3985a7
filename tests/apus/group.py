"""A hand-driven group of real APUS cores for scenario tests.

Nothing is simulated away: each core owns a real region buffer, and remote writes are copied into
the target's region only when the test says `deliver()`, disks complete only on `persist()`, so a
test can stop between any two of the paper's steps (L1-L3, B1, B2) and look.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gaia.apus.core.layout import Layout
from gaia.apus.core.replica import Replica
from gaia.apus.core.types import (
    Action,
    Apply,
    CoreConfig,
    Entry,
    Persist,
    RemoteWrite,
)


@dataclass
class Member:
    core: Replica
    region: bytearray
    applied: list[Entry] = field(default_factory=list)
    unpersisted: list[Persist] = field(default_factory=list)
    outbox: list[RemoteWrite] = field(default_factory=list)
    seen: list[Action] = field(default_factory=list)


class Group:
    def __init__(self, n: int, **cfg: int) -> None:
        self.members: dict[int, Member] = {}
        self.cut: set[frozenset[int]] = set()
        ids = tuple(range(n))
        for i in ids:
            c = CoreConfig(replica_id=i, members=ids, max_members=max(n, 4), seed=7, **cfg)
            region = bytearray(Layout(c).size)
            self.members[i] = Member(Replica(c, memoryview(region)), region)

    def __getitem__(self, i: int) -> Replica:
        return self.members[i].core

    def collect(self, i: int) -> list[Action]:
        """Take replica i's new actions: queue its writes and disk work, record applies."""
        m = self.members[i]
        actions = m.core.ready()
        for a in actions:
            m.seen.append(a)
            if isinstance(a, RemoteWrite):
                m.outbox.append(a)
            elif isinstance(a, Persist):
                m.unpersisted.append(a)
            elif isinstance(a, Apply):
                m.applied.extend(a.entries)
        return actions

    def persist(self, i: int) -> list[Action]:
        """Replica i's disk completes everything it was asked to write."""
        m = self.members[i]
        self.collect(i)
        if m.unpersisted:
            last = m.unpersisted[-1].seq
            m.unpersisted.clear()
            m.core.persist_done(last)
        return self.collect(i)

    def deliver(self, src: int, dst: int | None = None, drop: bool = False) -> int:
        """Carry src's queued writes (to dst only, if given) into the targets' regions."""
        m = self.members[src]
        self.collect(src)
        keep, n = [], 0
        for w in m.outbox:
            if dst is not None and w.peer != dst:
                keep.append(w)
                continue
            if not drop and frozenset((src, w.peer)) not in self.cut:
                region = self.members[w.peer].region
                region[w.offset : w.offset + len(w.data)] = w.data
                n += 1
        m.outbox = keep
        return n

    def settle(self, rounds: int = 50, skip: frozenset[int] = frozenset()) -> None:
        """Run everyone (but `skip`) to quiescence: deliver, read memory, persist, tick."""
        for _ in range(rounds):
            for i in self.members:
                if i in skip:
                    continue
                self.deliver(i)
                self.persist(i)
            for i in self.members:
                if i in skip:
                    continue
                self[i].memory_changed()
                self.persist(i)
                self[i].tick()
                self.persist(i)

    def elect(self, i: int, skip: frozenset[int] = frozenset()) -> None:
        """Make replica i stand for election and win (the others answer normally)."""
        core = self[i]
        core.campaign()
        self.persist(i)  # its self-vote is durable: requests go out
        for _ in range(10):
            for j in self.members:
                if j in skip:
                    continue
                self.deliver(j)
                self[j].tick()  # votes are read on ticks
                self.persist(j)
            if core.role == "leader":
                break
        assert core.role == "leader", f"r{i} did not win: {core.role}"
        self.persist(i)
