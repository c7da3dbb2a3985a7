"""Safety properties the simulator checks at every step, and the error that reports a breach.

* agreement: at most one entry is ever committed (applied anywhere) at an index;
* order: each replica applies a gap-free sequence, so applied sequences are prefixes of one
  another (every applied entry equals the agreed one at its index);
* durability: a new leader of view v holds every entry committed in views before v (Leader
  Completeness), so a committed (and acknowledged) entry is never lost or changed (a stale
  leader of an older view, elected by delayed votes, may lack newer commits: it can never
  commit, since a majority has moved past its view);
* one leader per view, and a replica's view never goes back, across restarts too;
* the output checker blames only replicas whose application really diverged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from gaia.apus.core.replica import Replica
from gaia.apus.core.types import Entry, OutputDecision, OutputVerdict


class Violation(Exception):
    """A safety or liveness property failed at simulated tick `tick`."""

    def __init__(self, message: str, tick: int = -1) -> None:
        super().__init__(message)
        self.tick = tick


class SimNode(Protocol):
    id: int
    core: Replica | None
    applied: list[Entry]

    @property
    def durable_view(self) -> int: ...


class Checker:
    def __init__(self, corrupt: int | None = None) -> None:
        self.committed: dict[int, Entry] = {}
        self.commit_view: dict[int, int] = {}  # the leader's view when the index committed
        self.acked: dict[int, Entry] = {}
        self.leaders: dict[int, int] = {}
        self.views: dict[int, int] = {}
        self.corrupt = corrupt

    def _agree(self, who: str, e: Entry) -> None:
        known = self.committed.setdefault(e.index, e)
        if known != e:
            raise Violation(f"{who}: index {e.index} holds {e} but {known} was committed")

    def on_commit(self, view: int, entries: Sequence[Entry]) -> None:
        """A leader in `view` committed these (its own Apply)."""
        for e in entries:
            self.commit_view.setdefault(e.index, view)

    def on_apply(self, node: int, applied_before: int, entries: Sequence[Entry]) -> None:
        for k, e in enumerate(entries):
            if e.index != applied_before + k + 1:
                raise Violation(
                    f"r{node} applies index {e.index} after {applied_before + k}: a gap or repeat"
                )
            self._agree(f"r{node} applies", e)

    def on_snapshot(self, node: int, state: Sequence[Entry]) -> None:
        for e in state:
            self._agree(f"r{node} installs a snapshot where", e)

    def on_ack(self, e: Entry) -> None:
        self.acked[e.index] = e

    def on_leader(self, node: int, view: int, core: Replica) -> None:
        other = self.leaders.setdefault(view, node)
        if other != node:
            raise Violation(f"two leaders in view {view}: r{other} and r{node}")
        for index, e in self.committed.items():
            if index <= core.snap_index or self.commit_view.get(index, 0) >= view:
                continue
            if index > core.last_index or core.entry(index) != e:
                raise Violation(
                    f"r{node} leads view {view} without committed entry {e} "
                    f"(its log ends at {core.last_index})"
                )

    def check_views(self, nodes: Iterable[SimNode]) -> None:
        """A replica's durable view never goes back, and its live view is never behind it. (A
        view adopted in memory and lost in a crash is no regression: the replica says nothing
        in a view before it is durable.)"""
        for n in nodes:
            before, now = self.views.get(n.id, 0), n.durable_view
            if now < before:
                raise Violation(f"r{n.id}'s durable view went back from {before} to {now}")
            self.views[n.id] = now
            if n.core is not None and n.core.view < now:
                raise Violation(f"r{n.id} runs in view {n.core.view} below its durable {now}")

    def on_output(self, d: OutputDecision) -> None:
        blamed = set(d.divergent)
        if d.verdict == OutputVerdict.LEADER_DIFFERS or not blamed <= {self.corrupt}:
            raise Violation(f"output checker blames correct replicas: {d}")

    def check_converged(self, members: Iterable[SimNode], upto: int) -> None:
        want = [self.committed[i] for i in range(1, upto + 1)]
        for n in members:
            if n.applied[:upto] != want:
                raise Violation(f"r{n.id} did not converge to the committed log up to {upto}")
        missing = [e for i, e in self.acked.items() if i <= upto and self.committed[i] != e]
        if missing:
            raise Violation(f"acknowledged entries lost: {missing[:3]}")
