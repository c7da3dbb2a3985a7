"""One APUS replica as a pure state machine (no sockets, files, clocks or threads).

The caller owns all I/O, in the etcd/raft manner. It calls

* `tick()` at a fixed rate (the only notion of time),
* `propose(kind, conn, payload)` on the leader for each intercepted input (L1 done by the caller),
* `memory_changed()` when its region may have been written by a peer,
* `persist_done(seq)` when the Persist action `seq` (and all before it) is durable,
* `install_snapshot(meta)` / `compact(index)` for checkpoints,
* `report_output(index, digest)` when it has hashed its output for an applied OUTPUT entry,

and after each call takes `ready()`: remote writes to perform, things to persist, committed
entries to apply, and notices. Everything a peer tells this replica arrives through the bytes of
its own region (see `layout`), exactly as with RDMA: no message is ever received.

Normal case (seed 002, Figure 2): the leader appends an input and asks to persist it (L2) and in
the same step writes it into every backup's log slot (L3). A backup that finds a sealed entry in
its slot checks that it extends its log (the previous entry's view), asks to persist it (B1), and
once that is durable writes its match index into its ack slot in the leader's region (B2). An
index is committed when a majority, leader included, has it durable, and the entry is of the
leader's view. The commit index rides on the next entry and on heartbeats.

Abnormal case (Viewstamped Replication / Raft): silence from the leader for an election timeout
starts a view change; a replica grants one vote per view, durably, and only to a candidate whose
log is at least as up to date as its own, so the winner holds every committed entry of the
majority it heard from. Its first entry is a NOOP of its view, which commits the earlier
suffix; a backup's divergent uncommitted suffix is overwritten; writes stamped with an older
view are ignored and acks of an older view are never counted, so a deposed leader cannot gather
a quorum.
"""

from __future__ import annotations

import random
from collections import deque

from gaia.apus.core.layout import (
    OUTPUT_REPORTS,
    PREVOTE_GRANT,
    PREVOTE_REQUEST,
    VOTE_GRANT,
    VOTE_REQUEST,
    Ack,
    Header,
    Layout,
    Vote,
)
from gaia.apus.core.output_check import decide
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
    OutputRound,
    Persist,
    Recovered,
    RemoteWrite,
    RoleChange,
    SafetyViolation,
    SendSnapshot,
    SnapshotMeta,
    decode_members,
    decode_output,
)

FOLLOWER = "follower"
CANDIDATE = "candidate"
LEADER = "leader"


def quorum_size(members: int) -> int:
    """A majority: any two quorums intersect, which is what makes a committed entry survive."""
    return members // 2 + 1


class Replica:
    """See the module docstring. Attributes are public for tests and the simulator to inspect;
    only the methods above change them."""

    def __init__(
        self, cfg: CoreConfig, region: memoryview, recovered: Recovered | None = None
    ) -> None:
        self.cfg = cfg
        self.id = cfg.replica_id
        self.layout = Layout(cfg)
        if len(region) < self.layout.size:
            raise ValueError(f"region of {len(region)} B, layout needs {self.layout.size} B")
        self.mem = region
        self._rng = random.Random(cfg.seed * 1_000_003 + cfg.replica_id)
        self._actions: list[Action] = []
        self.now = 0

        # durable state
        hs = recovered.hard_state if recovered else HardState(0, None)
        self.view = hs.view
        self.voted_for = hs.voted_for
        snap = recovered.snapshot if recovered else None
        self.snap_index = snap.index if snap else 0
        self.snap_view = snap.view if snap else 0
        self.snap_members = snap.members if snap else cfg.members
        self.entries: list[Entry] = list(recovered.entries) if recovered else []
        self.durable_index = self.last_index
        self._pending_persist: deque[list[int]] = deque()  # [seq, last index it makes durable]
        self._seq = 0
        self._done_seq = 0
        self._hard_state_seq = 0  # the replica says nothing in a view before it is durable

        # volatile state
        self.role = FOLLOWER
        self.leader: int | None = None
        self.commit = self.snap_index
        self.applied = self.snap_index
        self.members: tuple[int, ...] = ()
        self._config_index = 0
        self._recompute_members()

        # follower
        self._read_ptr = self.last_index + 1
        self._verified = self.commit  # log prefix known to equal the current view's leader's
        self._leader_commit = 0
        self._header_seen: Header | None = None
        self._header_trailer = b""
        self._rewind_seen: tuple[int, int] = (-1, -1)
        self._reject_seq = 0
        self._hint = 0
        self._last_reject: tuple[int, int] | None = None
        self._echo = 0
        self._ack_written: Ack | None = None
        self._out_reports: deque[tuple[int, int]] = deque(maxlen=OUTPUT_REPORTS)
        self._grant_after: tuple[int, int, int] | None = None  # (seq, candidate, view)
        self._election_elapsed = 0
        self._election_timeout = self._random_timeout()
        self._since_leader = 0  # ticks since the leader's last heartbeat

        # candidate
        self._prevotes: set[int] = set()
        self._prevote_view: int | None = None
        self._votes: set[int] = set()
        self._campaign_after: int | None = None  # seq of the durable self-vote
        self._votes_seen: dict[int, Vote] = {}
        self._attempt = 0

        # leader
        self.next_index: dict[int, int] = {}
        self.match: dict[int, int] = {}
        self._base: dict[int, int] = {}
        self._rewind_seq: dict[int, int] = {}
        self._progress_tick: dict[int, int] = {}
        self._alive_tick: dict[int, int] = {}
        self._echo_seen: dict[int, int] = {}
        self._ack_trailer: dict[int, bytes] = {}
        self._reject_seen: dict[int, int] = {}
        self._snapshot_sent: dict[int, int] = {}
        self._heartbeat = 0
        self._hb_elapsed = 0
        self._outputs: dict[int, OutputRound] = {}

    # ------------------------------------------------------------------ log helpers
    @property
    def last_index(self) -> int:
        return self.snap_index + len(self.entries)

    def view_at(self, index: int) -> int:
        """The view of the entry at `index` (0 for index 0 or the snapshot point's)."""
        if index == self.snap_index:
            return self.snap_view
        if index < self.snap_index or index > self.last_index:
            raise IndexError(index)
        return self.entries[index - self.snap_index - 1].view

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.snap_index - 1]

    @property
    def last_view(self) -> int:
        return self.entries[-1].view if self.entries else self.snap_view

    def ready(self) -> list[Action]:
        """The actions produced since the last call, in the order they must be carried out."""
        out, self._actions = self._actions, []
        return out

    # ------------------------------------------------------------------ events
    def tick(self) -> None:
        self.now += 1
        self._read_votes()
        if self.role == LEADER:
            self._hb_elapsed += 1
            if self._hb_elapsed >= self.cfg.heartbeat_ticks:
                self._send_heartbeats()
            self._retransmit_stalled()
            self._check_quorum()
            self._decide_outputs()
            return
        self._election_elapsed += 1
        self._since_leader += 1
        if self._election_elapsed >= self._election_timeout and self.id in self.members:
            self._start_prevote()

    def campaign(self) -> None:
        """Stand for election now, without waiting for a timeout or asking for pre-votes (an
        operator moving leadership to this replica, or a test fixing who leads)."""
        if self.role != LEADER and self.id in self.members:
            self._start_election()

    def propose(self, kind: EntryKind, conn: int, payload: bytes) -> int:
        """Append an input on the leader and start replicating it; returns its log index."""
        if self.role != LEADER:
            raise NotLeader(self.leader)
        if len(payload) > self.layout.max_payload:
            raise ValueError(f"payload of {len(payload)} B > {self.layout.max_payload} B per slot")
        if self.last_index - self.commit >= self.cfg.slots:
            raise Backpressure(f"{self.cfg.slots} entries in flight")
        if kind == EntryKind.CONFIG:
            self._check_config_change(decode_members(payload))
        return self._append_as_leader(kind, conn, payload)

    def step_down(self) -> None:
        """Stop leading (the app's output checker found this leader's own state differs from
        a majority's): follow no one in this view, and stand for election only after a longer
        timeout than the others', so that one of them leads next. Safe at any time: a leader
        may stop whenever it likes, and what it replicated is committed or not as usual."""
        if self.role != LEADER:
            return
        self._become_follower(self.view, None)
        self._election_elapsed = 0
        self._election_timeout = self._random_timeout() + self.cfg.election_ticks

    def room(self) -> int:
        """How many entries `propose` takes now before it raises Backpressure."""
        return self.cfg.slots - (self.last_index - self.commit)

    def memory_changed(self) -> None:
        """Read what peers wrote into this replica's region since the last look."""
        beat = self._read_header()
        if self.role == LEADER:
            self._read_acks()
        elif self.role == FOLLOWER and self.leader is not None:
            self._read_log(force_ack=beat)

    def persist_done(self, seq: int) -> None:
        """Persist actions up to and including `seq` are durable."""
        self._done_seq = max(self._done_seq, seq)
        while self._pending_persist and self._pending_persist[0][0] <= seq:
            _, last = self._pending_persist.popleft()
            self.durable_index = max(self.durable_index, last)
        if self._campaign_after is not None and seq >= self._campaign_after:
            self._campaign_after = None
            self._campaign()
        if self._grant_after is not None and seq >= self._grant_after[0]:
            _, candidate, view = self._grant_after
            self._grant_after = None
            if view == self.view and self.voted_for == candidate:
                vote = Vote(view, VOTE_GRANT, candidate, self.last_index, self.last_view, 0)
                self._write(candidate, self.layout.vote_offset(self.id), Layout.encode_vote(vote))
        if self.role == LEADER:
            self._advance_commit()
        else:
            self._send_ack()

    def install_snapshot(self, meta: SnapshotMeta) -> bool:
        """A snapshot the leader shipped (SendSnapshot) arrived. Returns False if this replica
        has already committed past it; True if the caller must now durably store it and restore
        its application from it before carrying out the next actions. Entries it covers are
        dropped; a suffix that extends it is kept."""
        if meta.index <= self.commit:
            self._send_ack()  # we hold it already: our committed prefix is the leader's too
            return False
        keep = meta.index <= self.last_index and self.view_at(meta.index) == meta.view
        self.entries = self.entries[meta.index - self.snap_index :] if keep else []
        self.snap_index, self.snap_view, self.snap_members = meta
        self.commit = self.applied = meta.index
        self.durable_index = max(self.durable_index, meta.index)
        self._verified = max(self._verified, meta.index)
        self._read_ptr = max(self._read_ptr, meta.index + 1) if keep else meta.index + 1
        self._recompute_members()
        self._persist(snapshot=meta, truncate_after=None if keep else meta.index)
        self._send_ack()
        return True

    def compact(self, index: int) -> None:
        """The caller has durably checkpointed its application at `index` (<= applied): drop the
        log up to there. Peers behind it will get the snapshot instead of entries."""
        if index <= self.snap_index:
            return
        if index > self.applied:
            raise ValueError(f"cannot compact to {index}: only {self.applied} applied")
        meta = SnapshotMeta(index, self.view_at(index), self._members_at(index))
        self.entries = self.entries[index - self.snap_index :]
        self.snap_index, self.snap_view, self.snap_members = meta
        self._persist(snapshot=meta)

    def report_output(self, index: int, digest: int) -> None:
        """This replica hashed its own output for the OUTPUT entry at `index` (after applying
        it); the hash goes back to the leader with the next ack."""
        if self.role == LEADER:
            return
        self._out_reports.append((index, digest))
        self._send_ack()

    # ------------------------------------------------------------------ persistence
    def _persist(
        self,
        hard_state: HardState | None = None,
        snapshot: SnapshotMeta | None = None,
        truncate_after: int | None = None,
        entries: tuple[Entry, ...] = (),
    ) -> int:
        self._seq += 1
        last = self._actions[-1] if self._actions else None
        if (
            entries
            and isinstance(last, Persist)
            and last.seq == self._seq - 1
            and not (hard_state or snapshot or truncate_after is not None)
        ):
            # group commit: appends made in one step share one disk write (and one fsync)
            self._actions[-1] = last._replace(seq=self._seq, entries=last.entries + entries)
            self._pending_persist[-1] = [self._seq, self.last_index]
            return self._seq
        self._actions.append(Persist(self._seq, hard_state, snapshot, truncate_after, entries))
        self._pending_persist.append([self._seq, self.last_index])
        return self._seq

    def _save_hard_state(self) -> int:
        self._hard_state_seq = self._persist(hard_state=HardState(self.view, self.voted_for))
        return self._hard_state_seq

    def _truncate(self, after: int) -> None:
        if after < self.commit:
            raise SafetyViolation(
                f"replica {self.id} asked to drop committed entries after {after} "
                f"(commit {self.commit})"
            )
        del self.entries[after - self.snap_index :]
        self.durable_index = min(self.durable_index, after)
        for pending in self._pending_persist:
            pending[1] = min(pending[1], after)
        if self._config_index > after:
            self._recompute_members()
        self._persist(truncate_after=after)

    # ------------------------------------------------------------------ membership
    def _members_at(self, index: int) -> tuple[int, ...]:
        for i in range(min(index, self.last_index), self.snap_index, -1):
            e = self.entry(i)
            if e.kind == EntryKind.CONFIG:
                return decode_members(e.payload)
        return self.snap_members

    def _recompute_members(self) -> None:
        for i in range(self.last_index, self.snap_index, -1):
            e = self.entry(i)
            if e.kind == EntryKind.CONFIG:
                self.members, self._config_index = decode_members(e.payload), i
                return
        self.members, self._config_index = self.snap_members, 0

    def _check_config_change(self, new: tuple[int, ...]) -> None:
        if self._config_index > self.commit:
            raise ValueError("a membership change is still uncommitted: one change at a time")
        if self.id not in new:
            raise ValueError("the leader cannot remove itself; move leadership first")
        changed = set(new) ^ set(self.members)
        if len(changed) != 1:
            raise ValueError(f"change one member at a time: {self.members} -> {new}")
        if any(not 0 <= m < self.cfg.max_members for m in new) or len(set(new)) != len(new):
            raise ValueError(f"bad member list {new}")

    # ------------------------------------------------------------------ elections
    def _random_timeout(self) -> int:
        t = self.cfg.election_ticks
        return t + self._rng.randrange(t)

    def _become_follower(self, view: int, leader: int | None) -> None:
        was = (self.role, self.view, self.leader)
        if was != (FOLLOWER, view, leader):
            self._verified = self.commit  # a committed prefix matches every leader's log
        if view > self.view:
            self.view, self.voted_for = view, None
            self._save_hard_state()
        self.role, self.leader = FOLLOWER, leader
        self._votes.clear()
        self._campaign_after = None
        self._outputs.clear()
        if was != (self.role, self.view, self.leader):
            self._actions.append(RoleChange(FOLLOWER, self.view, leader))

    def _start_prevote(self) -> None:
        """Ask first whether a majority would elect us (Raft's PreVote): a replica cut off from
        a healthy leader then cannot depose it, because the others still hear the leader."""
        self._election_elapsed = 0
        self._election_timeout = self._random_timeout()
        self._prevote_view = self.view + 1
        self._prevotes = {self.id}
        self._ask_votes(PREVOTE_REQUEST, self._prevote_view)
        self._tally_prevotes()

    def _tally_prevotes(self) -> None:
        if len(self._prevotes & set(self.members)) >= self._quorum():
            self._prevote_view = None
            self._start_election()

    def _ask_votes(self, kind: int, view: int) -> None:
        self._attempt += 1
        request = Layout.encode_vote(
            Vote(view, kind, self.id, self.last_index, self.last_view, self._attempt)
        )
        for peer in self.members:
            if peer != self.id:
                self._write(peer, self.layout.vote_offset(self.id), request)

    def _start_election(self) -> None:
        self.view += 1
        self.voted_for = self.id
        self.role, self.leader = CANDIDATE, None
        self._verified = self.commit
        self._votes = set()
        self._election_elapsed = 0
        self._election_timeout = self._random_timeout()
        self._campaign_after = self._save_hard_state()
        self._actions.append(RoleChange(CANDIDATE, self.view, None))

    def _campaign(self) -> None:
        """Our self-vote is durable: count it and ask the others."""
        if self.role != CANDIDATE:
            return
        self._votes.add(self.id)
        self._ask_votes(VOTE_REQUEST, self.view)
        self._tally()

    def _tally(self) -> None:
        if len(self._votes & set(self.members)) >= self._quorum():
            self._become_leader()

    def _quorum(self) -> int:
        return quorum_size(len(self.members))

    def _read_votes(self) -> None:
        """Vote slots are read once per tick, not on every memory change: elections are rare
        and the hot path should not pay for scanning max_members records."""
        for peer in range(self.cfg.max_members):
            if peer == self.id:
                continue
            vote = self.layout.read_vote(self.mem, peer)
            if vote is None or self._votes_seen.get(peer) == vote:
                continue
            self._votes_seen[peer] = vote
            if vote.kind == VOTE_REQUEST:
                self._on_vote_request(peer, vote)
            elif vote.kind == PREVOTE_REQUEST:
                self._on_prevote_request(peer, vote)
            elif vote.kind == PREVOTE_GRANT and vote.view == self._prevote_view:
                self._prevotes.add(peer)
                self._tally_prevotes()
            elif vote.kind == VOTE_GRANT and self.role == CANDIDATE and vote.view == self.view:
                self._votes.add(peer)
                self._tally()

    def _on_prevote_request(self, candidate: int, vote: Vote) -> None:
        hears_leader = self.role == LEADER or (
            self.leader is not None and self._since_leader < self.cfg.election_ticks
        )
        up_to_date = (vote.last_view, vote.last_index) >= (self.last_view, self.last_index)
        if vote.view > self.view and candidate in self.members and up_to_date and not hears_leader:
            grant = vote._replace(kind=PREVOTE_GRANT)
            self._write(candidate, self.layout.vote_offset(self.id), Layout.encode_vote(grant))

    def _on_vote_request(self, candidate: int, vote: Vote) -> None:
        if vote.view < self.view or candidate not in self.members:
            return
        if vote.view > self.view:
            self._become_follower(vote.view, None)
        up_to_date = (vote.last_view, vote.last_index) >= (self.last_view, self.last_index)
        if self.voted_for in (None, candidate) and up_to_date and self.role == FOLLOWER:
            self.voted_for = candidate
            self._election_elapsed = 0
            self._grant_after = (self._save_hard_state(), candidate, vote.view)

    def _become_leader(self) -> None:
        self.role, self.leader = LEADER, self.id
        self._actions.append(RoleChange(LEADER, self.view, self.id))
        for peer in self.members:
            if peer != self.id:
                self._track_peer(peer)
        self._append_as_leader(EntryKind.NOOP, 0, b"")
        self._send_heartbeats()

    def _track_peer(self, peer: int) -> None:
        self.next_index[peer] = self.last_index + 1
        self.match[peer] = 0
        self._rewind_seq[peer] = self._rewind_seq.get(peer, 0) + 1
        self._base[peer] = self.last_index + 1
        self._progress_tick[peer] = self.now
        self._alive_tick[peer] = self.now
        self._snapshot_sent.pop(peer, None)

    # ------------------------------------------------------------------ leader
    def _append_as_leader(self, kind: EntryKind, conn: int, payload: bytes) -> int:
        index = self.last_index + 1
        entry = Entry(index, self.view, kind, conn, payload)
        prev_view = self.last_view
        self.entries.append(entry)
        if kind == EntryKind.CONFIG:
            old, self.members, self._config_index = self.members, decode_members(payload), index
            for peer in set(self.members) - set(old):
                self._track_peer(peer)
                self.next_index[peer] = index
        self._persist(entries=(entry,))
        data = self.layout.encode_entry(entry, prev_view, self.view, self.commit)
        offset = self.layout.slot_offset(index)
        for peer in self.members:
            if (
                peer != self.id
                and self.next_index[peer] == index
                and index <= self.match[peer] + self.cfg.slots
                and peer not in self._snapshot_sent
            ):
                self._actions.append(RemoteWrite(peer, offset, data))
                self.next_index[peer] = index + 1
        return index

    def _replicate(self, peer: int) -> None:
        """Write the entries `peer` is missing, within its window of the ring."""
        if peer in self._snapshot_sent:
            return
        if self.next_index[peer] <= self.snap_index:
            meta = SnapshotMeta(self.snap_index, self.snap_view, self.snap_members)
            self._actions.append(SendSnapshot(peer, meta))
            self._snapshot_sent[peer] = self.now
            self._rewind(peer, self.snap_index + 1)
            return
        limit = min(self.last_index, self.match[peer] + self.cfg.slots)
        while self.next_index[peer] <= limit:
            i = self.next_index[peer]
            data = self.layout.encode_entry(
                self.entry(i), self.view_at(i - 1), self.view, self.commit
            )
            self._write(peer, self.layout.slot_offset(i), data)
            self.next_index[peer] = i + 1

    def _rewind(self, peer: int, base: int) -> None:
        """Restart writing to `peer` at `base`, and tell it so through its header."""
        self.next_index[peer] = base
        self._base[peer] = base
        self._rewind_seq[peer] += 1
        self._progress_tick[peer] = self.now
        self._write_header(peer)

    def _write_header(self, peer: int) -> None:
        h = Header(
            self.view,
            self.id,
            self.commit,
            self._heartbeat,
            self._base[peer],
            self._rewind_seq[peer],
        )
        self._write(peer, 0, Layout.encode_header(h))

    def _send_heartbeats(self) -> None:
        self._hb_elapsed = 0
        self._heartbeat += 1
        for peer in self.members:
            if peer != self.id:
                self._write_header(peer)

    def _retransmit_stalled(self) -> None:
        for peer in self.members:
            if peer == self.id:
                continue
            sent = self._snapshot_sent.get(peer)
            if sent is not None:
                if self.now - sent >= self.cfg.election_ticks:
                    del self._snapshot_sent[peer]  # lost on the way: offer it again
                    self._replicate(peer)
                continue
            behind = self.match[peer] < self.last_index
            if behind and self.now - self._progress_tick[peer] >= self.cfg.retransmit_ticks:
                self._rewind(peer, self.match[peer] + 1)
                self._replicate(peer)

    def _check_quorum(self) -> None:
        """Step down when no majority has answered for an election timeout, so clients go to a
        leader that can still commit (the others will have elected one)."""
        alive = 1 + sum(
            1
            for p in self.members
            if p != self.id and self.now - self._alive_tick[p] < 2 * self.cfg.election_ticks
        )
        if alive < self._quorum():
            self._become_follower(self.view, None)

    def _read_acks(self) -> None:
        for peer in self.members:
            if peer == self.id:
                continue
            trailer = self.layout.ack_trailer(self.mem, peer)
            if trailer == self._ack_trailer.get(peer):
                continue
            ack = self.layout.read_ack(self.mem, peer)
            if ack is not None:
                self._ack_trailer[peer] = trailer
            if ack is not None and ack.view > self.view:
                self._become_follower(ack.view, None)
                return
            if ack is None or ack.view != self.view:
                continue
            if ack.echo != self._echo_seen.get(peer):
                self._echo_seen[peer] = ack.echo
                self._alive_tick[peer] = self.now
            if ack.match > self.match[peer]:
                self.match[peer] = ack.match
                self._progress_tick[peer] = self.now
                self._alive_tick[peer] = self.now
                if ack.match >= self.snap_index:
                    self._snapshot_sent.pop(peer, None)
                self.next_index[peer] = max(self.next_index[peer], ack.match + 1)
            if ack.reject_seq != self._reject_seen.get(peer, 0):
                self._reject_seen[peer] = ack.reject_seq
                if peer not in self._snapshot_sent:  # else it is waiting for the snapshot
                    self._rewind(peer, max(ack.hint, self.match[peer] + 1))
            for index, digest in ack.reports:
                if index in self._outputs:
                    self._outputs[index].responses[peer] = digest
            self._replicate(peer)
        self._advance_commit()
        self._decide_outputs()

    def _advance_commit(self) -> None:
        if self.role != LEADER:
            return
        matches = sorted(
            (self.durable_index if m == self.id else self.match.get(m, 0) for m in self.members),
            reverse=True,
        )
        candidate = matches[self._quorum() - 1]
        if candidate > self.commit and self.view_at(candidate) == self.view:
            self._set_commit(candidate)

    def _set_commit(self, index: int) -> None:
        self.commit = index
        if self.applied < index:
            batch = tuple(self.entries[self.applied - self.snap_index : index - self.snap_index])
            self.applied = index
            self._actions.append(Apply(batch))
            if self.role == LEADER:
                for e in batch:
                    if e.kind == EntryKind.OUTPUT:
                        self._open_output(e)

    # ------------------------------------------------------------------ output checking
    def _open_output(self, e: Entry) -> None:
        _, digest = decode_output(e.payload)
        deadline = self.now + self.cfg.output_timeout_ticks
        self._outputs[e.index] = OutputRound(e.conn, digest, deadline, {self.id: digest})

    def _decide_outputs(self) -> None:
        """Decide each open round once every member answered, or at its deadline."""
        for index, rnd in list(self._outputs.items()):
            if rnd.deadline <= self.now or set(self.members) <= rnd.responses.keys():
                verdict, divergent = decide(self.id, rnd.responses, self.members)
                self._actions.append(OutputDecision(index, rnd.conn, verdict, divergent))
                del self._outputs[index]

    # ------------------------------------------------------------------ follower
    def _read_header(self) -> bool:
        """Follow the leader whose header (heartbeat) is new; True if there was one."""
        trailer = Layout.header_trailer(self.mem)
        if trailer == self._header_trailer:
            return False
        h = Layout.read_header(self.mem)
        if h is None:
            return False  # torn: look again next time (only a complete record is remembered)
        self._header_trailer = trailer
        if h == self._header_seen:
            return False
        self._header_seen = h
        if h.leader is None or (h.view == self.view and self.role == LEADER):
            return False
        if h.view < self.view:
            self._tell_view(h.leader)
            return False
        self._become_follower(h.view, h.leader)
        self._election_elapsed = self._since_leader = 0  # only a live leader defers elections
        self._leader_commit = max(self._leader_commit, h.commit)
        if (h.view, h.rewind_seq) != self._rewind_seen:
            self._rewind_seen = (h.view, h.rewind_seq)
            self._last_reject = None
            self._read_ptr = min(h.base, self.last_index + 1)
            if h.base > self.last_index + 1:
                self._reject(self.last_index + 1)
        self._echo = h.heartbeat
        return True

    def _tell_view(self, leader: int) -> None:
        """A leader of an older view is still heartbeating us: tell it our view through its ack
        slot, so it steps down and an election can include us (else a replica whose view ran
        ahead during a partition would stay outside forever: pre-votes never raise views)."""
        if self._hard_state_seq <= self._done_seq:
            ack = Ack(self.view, 0, 0, 0, 0)
            self._write(leader, self.layout.ack_offset(self.id), Layout.encode_ack(ack))

    def _read_log(self, force_ack: bool = False) -> None:
        while True:
            i = self._read_ptr
            found = self.layout.read_slot(self.mem, i)
            if found is None:
                break
            if found.writer_view != self.view:
                break  # stale (an old leader's) or from a view we have not joined yet
            e = found.entry
            prev = i - 1
            if prev < self.snap_index:  # already covered by our snapshot
                self._read_ptr, self._verified = i + 1, max(self._verified, i)
                continue
            if prev > self.last_index:
                self._reject(self.last_index + 1)
                break
            if self.view_at(prev) != found.prev_view:
                self._reject(self.commit + 1)
                break
            if i <= self.last_index:
                if self.view_at(i) != e.view:
                    self._truncate(i - 1)
                    self._append(e)
            else:
                self._append(e)
            self._verified = max(self._verified, i)  # a rewind re-reads what already matched
            self._read_ptr = i + 1
            self._leader_commit = max(self._leader_commit, found.commit)
        new_commit = min(self._leader_commit, self._verified)
        if new_commit > self.commit:
            self._set_commit(new_commit)
        self._send_ack(force_ack)

    def _append(self, e: Entry) -> None:
        self.entries.append(e)
        if e.kind == EntryKind.CONFIG:
            self.members, self._config_index = decode_members(e.payload), e.index
        self._persist(entries=(e,))

    def _reject(self, hint: int) -> None:
        """Our log does not extend where the leader is writing: ask it to restart at `hint`."""
        if self._last_reject == (self.view, hint):
            return
        self._last_reject = (self.view, hint)
        self._reject_seq += 1
        self._hint = hint
        self._send_ack(force=True)

    def _send_ack(self, force: bool = False) -> None:
        if self.role != FOLLOWER or self.leader is None or self._hard_state_seq > self._done_seq:
            return  # persist_done will call again once the view we would speak in is durable
        ack = Ack(
            self.view,
            min(self._verified, self.durable_index),
            self._hint,
            self._reject_seq,
            self._echo,
            tuple(self._out_reports),
        )
        if force or ack != self._ack_written:
            self._ack_written = ack
            self._write(self.leader, self.layout.ack_offset(self.id), Layout.encode_ack(ack))

    def _write(self, peer: int, offset: int, data: bytes) -> None:
        self._actions.append(RemoteWrite(peer, offset, data))
