"""The paper's steps, one at a time, on real cores (seed 002, Figure 2, and the abnormal case)."""

from __future__ import annotations

import itertools

import pytest

from gaia.apus.core.layout import ACK_RECORD, Layout
from gaia.apus.core.types import (
    Apply,
    Backpressure,
    EntryKind,
    NotLeader,
    OutputVerdict,
    Persist,
    RemoteWrite,
    SendSnapshot,
    encode_members,
)
from gaia.apus.sim.world import Faults, SimParams, World

from .group import Group


def writes(actions: list[object]) -> list[RemoteWrite]:
    return [a for a in actions if isinstance(a, RemoteWrite)]


def test_normal_case_follows_figure_2() -> None:
    g = Group(3)
    g.elect(0)
    g.settle()  # the new leader's NOOP commits everywhere
    leader, lay = g[0], g[0].layout
    base = leader.commit

    # L1 happened in the caller (the real socket call); L2 + L3 happen in one step:
    index = leader.propose(EntryKind.DATA, 7, b"SET k v\r\n")
    actions = g.collect(0)
    persists = [a for a in actions if isinstance(a, Persist)]
    assert [e.payload for p in persists for e in p.entries] == [b"SET k v\r\n"]  # L2
    assert {(w.peer, w.offset) for w in writes(actions)} == {
        (1, lay.slot_offset(index)),
        (2, lay.slot_offset(index)),
    }  # L3: the same slot in every backup's log

    # B1: a backup finds the sealed entry by polling its own memory and persists it, but says
    # nothing before it is durable.
    g.deliver(0)
    g[1].memory_changed()
    b1 = g.collect(1)
    assert any(isinstance(a, Persist) and a.entries for a in b1)
    assert all(w.offset != lay.ack_offset(1) or g[0].match[1] < index for w in writes(b1))

    # B2: once durable, the ack goes into its slot in the leader's region.
    b2 = g.persist(1)
    assert [w.offset for w in writes(b2)] == [lay.ack_offset(1)]
    g.deliver(1)

    # Leader durable (L2 done) + one backup = a majority of 3: committed and applied.
    g.persist(0)
    g[0].memory_changed()
    applied = [a for a in g.collect(0) if isinstance(a, Apply)]
    assert leader.commit == index > base
    assert [e.payload for a in applied for e in a.entries] == [b"SET k v\r\n"]

    # The commit index rides on the next heartbeat; backups apply exactly once, in order.
    g.settle()
    for i in (1, 2):
        assert [e.index for e in g.members[i].applied] == list(range(1, index + 1))


def test_no_commit_without_a_durable_majority() -> None:
    g = Group(3)
    g.elect(0)
    g.settle()
    index = g[0].propose(EntryKind.DATA, 1, b"x")
    g.persist(0)
    g.deliver(0)
    for i in (1, 2):
        g[i].memory_changed()
        g.collect(i)  # persisted by neither backup
    g[0].memory_changed()
    assert g[0].commit < index


def test_view_change_elects_a_leader_with_every_committed_entry() -> None:
    g = Group(3)
    g.elect(0)
    g.settle()
    committed = g[0].propose(EntryKind.DATA, 1, b"committed")
    g.settle()
    assert g[0].commit == committed

    # the leader dies; heartbeats stop; a backup times out and wins the next view
    g.elect(1, skip=frozenset({0}))
    assert g[1].view == 2 and g[1].entry(committed).payload == b"committed"
    g.settle(skip=frozenset({0}))
    after = g[1].propose(EntryKind.DATA, 1, b"after failover")
    g.settle(skip=frozenset({0}))
    assert g[1].commit == after
    data = [e.payload for e in g.members[2].applied if e.kind == EntryKind.DATA]
    assert data[-2:] == [b"committed", b"after failover"]


def test_a_leader_that_steps_down_is_succeeded_by_another() -> None:
    """The app's checker found the leader's own state different: it stops leading, and it is
    one of the others that wins the next view, with every committed entry."""
    g = Group(3)
    g.elect(0)
    g.settle()
    committed = g[0].propose(EntryKind.DATA, 1, b"before")
    g.settle()
    g[0].step_down()
    assert (g[0].role, g[0].leader) == ("follower", None)
    with pytest.raises(NotLeader):
        g[0].propose(EntryKind.DATA, 1, b"refused")
    for _ in range(300):
        g.settle(rounds=1)
        if any(g[i].role == "leader" for i in range(3)):
            break
    (leader,) = [i for i in range(3) if g[i].role == "leader"]
    assert leader != 0 and g[leader].view == 2
    assert g[leader].entry(committed).payload == b"before"
    g.settle()
    assert g[0].leader == leader  # the old leader follows the new one


def test_divergent_uncommitted_suffix_is_replaced_and_stale_writes_are_ignored() -> None:
    g = Group(3)
    g.elect(0)
    g.settle()
    # r0 accepts inputs that never leave it (its writes are lost), then is deposed
    orphan = g[0].propose(EntryKind.DATA, 1, b"orphan")
    g.persist(0)
    g.deliver(0, drop=True)
    g.elect(1, skip=frozenset({0}))
    g.settle(skip=frozenset({0}))
    winner = g[1].propose(EntryKind.DATA, 1, b"winner")

    # the deposed leader still believes it leads view 1: its writes carry view 1 and r2, now in
    # view 2, ignores them; acks of view 1 never come, so it cannot commit
    g[0].propose(EntryKind.DATA, 1, b"stale")
    g.deliver(0, dst=2)
    g[2].memory_changed()
    assert all(e.payload != b"stale" for e in g[2].entries)
    assert g[0].commit < orphan

    # reconnected, it learns the new view and its suffix is overwritten
    g.settle()
    assert g[0].role == "follower" and g[0].view == 2
    assert g[0].entry(orphan).payload != b"orphan"
    assert g[0].commit >= winner
    assert [e.payload for e in g.members[0].applied].count(b"orphan") == 0


def test_backup_that_missed_entries_catches_up_from_the_leader() -> None:
    g = Group(3)
    g.elect(0)
    g.settle()
    g.cut.add(frozenset((0, 2)))
    for k in range(40):  # more than fit in the ring (16 slots): r2 must be fed in windows
        g[0].propose(EntryKind.DATA, 1, b"v%d" % k)
        g.settle(rounds=1)
    assert g[2].commit < g[0].commit
    g.cut.clear()
    g.settle(rounds=80)
    assert g[2].commit == g[0].commit
    assert g.members[2].applied == g.members[0].applied


def test_far_behind_backup_is_brought_up_from_a_snapshot() -> None:
    g = Group(3)
    g.elect(0)
    g.settle()
    g.cut.add(frozenset((0, 2)))
    for k in range(20):
        g[0].propose(EntryKind.DATA, 1, b"v%d" % k)
        g.settle(rounds=1)
    g.settle(skip=frozenset({2}))
    g[0].compact(g[0].applied)  # the runtime checkpointed its application here
    g.collect(0)
    g.cut.clear()
    shipped = None
    for _ in range(60):
        g.settle(rounds=1)
        shipped = next((a for a in g.members[0].seen if isinstance(a, SendSnapshot)), None)
        if shipped:
            break
    assert shipped is not None and shipped.peer == 2
    assert g[2].install_snapshot(shipped.meta)  # its runtime stored and restored it
    g.settle()
    assert g[2].commit == g[0].commit and g[2].snap_index == shipped.meta.index


def test_torn_write_never_reads_as_an_entry() -> None:
    g = Group(3)
    g.elect(0)
    g.settle()
    index = g[0].propose(EntryKind.DATA, 1, b"payload" * 10)
    w = next(w for w in writes(g.collect(0)) if w.peer == 1)
    region = g.members[1].region
    region[w.offset : w.offset + len(w.data) - 3] = w.data[:-3]  # all but the seal's end
    g[1].memory_changed()
    assert g[1].last_index < index
    region[w.offset : w.offset + len(w.data)] = w.data
    g[1].memory_changed()
    assert g[1].last_index == index


def test_proposals_need_the_leader_and_room_in_the_ring() -> None:
    g = Group(3, slots=4)
    with pytest.raises(NotLeader):
        g[1].propose(EntryKind.DATA, 1, b"x")
    g.elect(0)
    g.persist(0)
    with pytest.raises(Backpressure):
        for _ in range(5):
            g[0].propose(EntryKind.DATA, 1, b"x")
    with pytest.raises(ValueError, match="payload"):
        g[0].propose(EntryKind.DATA, 1, bytes(g[0].layout.max_payload + 1))


def test_membership_replaces_a_dead_replica() -> None:
    g = Group(4)  # ids 0-2 are members, 3 is a spare outside the group
    for i in range(4):
        g.members[i].core.members = (0, 1, 2) if i < 3 else ()
        g.members[i].core.snap_members = g.members[i].core.members
    g.elect(0, skip=frozenset({3}))
    g.settle(skip=frozenset({2, 3}))
    with pytest.raises(ValueError, match="one member at a time"):
        g[0].propose(EntryKind.CONFIG, 0, encode_members((0, 1, 3)))
    g[0].propose(EntryKind.CONFIG, 0, encode_members((0, 1)))
    g.settle(skip=frozenset({2, 3}))
    g[0].propose(EntryKind.CONFIG, 0, encode_members((0, 1, 3)))
    g.settle(skip=frozenset({2}))
    data = g[0].propose(EntryKind.DATA, 1, b"after the swap")
    g.settle(skip=frozenset({2}))
    assert g[3].members == (0, 1, 3) and g[3].commit >= data
    assert g.members[3].applied == g.members[0].applied


def test_output_checker_finds_the_divergent_replica() -> None:
    world = World(SimParams(replicas=3, seed=3, faults=Faults.parse("none"), corrupt_output=2))
    decisions = []
    original = world.checker.on_output
    world.checker.on_output = lambda d: (decisions.append(d), original(d))  # type: ignore[method-assign]
    world.run()
    assert decisions, "no OUTPUT entry was decided"
    assert all(d.verdict == OutputVerdict.MINORITY_DIFFERS for d in decisions)
    assert all(d.divergent == (2,) for d in decisions)


def test_region_layout_keeps_records_apart() -> None:
    g = Group(5)
    lay: Layout = g[0].layout
    spans = [(0, 64)]
    spans += [(lay.ack_offset(i), ACK_RECORD) for i in range(5)]
    spans += [(lay.vote_offset(i), 64) for i in range(5)]
    spans += [(lay.slot_offset(i), lay.slot_size) for i in range(lay.slots)]
    spans.sort()
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))
    assert spans[-1][0] + spans[-1][1] <= lay.size
