"""The replica's log file: what was written comes back, a torn tail is cut, policies hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from gaia.apus.core.types import Entry, EntryKind, HardState, Persist, SnapshotMeta
from gaia.apus.storage import LogStore, check_durability


def e(i: int, view: int = 1) -> Entry:
    return Entry(i, view, EntryKind.DATA, 7, b"payload %d" % i)


def test_replay_applies_hard_state_truncation_and_snapshot(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "r.log", "fsync")
    store.write([Persist(1, HardState(3, 1), None, None, ())])
    store.write([Persist(2, None, None, None, (e(1), e(2), e(3)))])
    store.write([Persist(3, None, None, 1, (e(2, 4),))])  # a new leader replaced 2 and 3
    store.write([Persist(4, None, SnapshotMeta(1, 1, (0, 1, 2)), None, (e(3, 4),))])
    store.close()
    rec = LogStore(tmp_path / "r.log", "fsync").load()
    assert rec.hard_state == HardState(3, 1)
    assert rec.snapshot == SnapshotMeta(1, 1, (0, 1, 2))
    assert rec.entries == (e(2, 4), e(3, 4))
    assert store.syncs == 4


def test_a_torn_last_record_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    store = LogStore(path, "group-commit")
    store.write([Persist(1, None, None, None, (e(1),)), Persist(2, None, None, None, (e(2),))])
    store.close()
    assert store.syncs == 1
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])
    assert LogStore(path, "group-commit").load().entries == (e(1),)
    assert len(path.read_bytes()) < len(whole) - 5  # the torn record is gone from the file


def test_memory_policy_writes_nothing(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "r.log", "memory")
    store.write([Persist(1, None, None, None, (e(1),))])
    assert not (tmp_path / "r.log").exists()
    assert LogStore(tmp_path / "r.log", "memory").load().entries == ()


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown durability 'sometimes'"):
        check_durability("sometimes")
