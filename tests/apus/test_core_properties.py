"""Property tests: record codecs under tearing and corruption, the output verdict, and the core's
purity (no I/O in gaia/apus/core)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaia.apus.core.layout import OUTPUT_REPORTS, Ack, Header, Layout, SlotEntry, Vote
from gaia.apus.core.output_check import decide
from gaia.apus.core.types import (
    CoreConfig,
    Entry,
    EntryKind,
    OutputVerdict,
    batch_size,
    decode_batch,
    encode_batch,
)

LAYOUT = Layout(CoreConfig(replica_id=0, members=(0, 1, 2), slots=8, slot_size=256))

entries = st.builds(
    Entry,
    index=st.integers(1, 2**40),
    view=st.integers(1, 2**30),
    kind=st.sampled_from(list(EntryKind)),
    conn=st.integers(0, 2**63),
    payload=st.binary(max_size=LAYOUT.max_payload),
)


batches = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=300)), max_size=20)


@given(batches)
def test_batch_payloads_round_trip_in_order(inputs: list[tuple[int, bytes]]) -> None:
    payload = encode_batch(inputs)
    assert len(payload) == batch_size(len(inputs), sum(len(d) for _, d in inputs))
    assert decode_batch(payload) == inputs


@given(batches.filter(bool), st.data())
def test_a_cut_batch_payload_is_refused(
    inputs: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    payload = encode_batch(inputs)
    cut = data.draw(st.integers(1, len(payload) - 1))
    boundaries = {batch_size(k, sum(len(d) for _, d in inputs[:k])) for k in range(len(inputs))}
    if cut in boundaries:  # a shorter batch, still well formed
        assert decode_batch(payload[:cut]) == inputs[: sorted(boundaries).index(cut)]
    else:
        with pytest.raises(ValueError, match="BATCH record"):
            decode_batch(payload[:cut])


def fresh() -> memoryview:
    return memoryview(bytearray(LAYOUT.size))


@given(entries, st.integers(0, 2**30), st.integers(0, 2**40))
def test_entry_round_trips(e: Entry, prev: int, commit: int) -> None:
    mem = fresh()
    data = LAYOUT.encode_entry(e, prev, e.view, commit)
    off = LAYOUT.slot_offset(e.index)
    mem[off : off + len(data)] = data
    assert LAYOUT.read_slot(mem, e.index) == SlotEntry(e, prev, e.view, commit)


@given(entries, entries, st.data())
def test_a_torn_write_never_reads_as_a_wrong_entry(
    old: Entry, new: Entry, data: st.DataObject
) -> None:
    """Whatever prefix of a write has landed over an older lap's entry, a reader looking for
    the new entry finds nothing, or the new entry whole (when the bytes still missing happen
    to hold their final values already), never a mixture."""
    new = new._replace(index=old.index + LAYOUT.slots)  # same slot, next lap of the ring
    mem = fresh()
    off = LAYOUT.slot_offset(old.index)
    before = LAYOUT.encode_entry(old, 0, old.view, 0)
    mem[off : off + len(before)] = before
    after = LAYOUT.encode_entry(new, 0, new.view, 0)
    cut = data.draw(st.integers(0, len(after) - 1))
    mem[off : off + cut] = after[:cut]
    seen = LAYOUT.read_slot(mem, new.index)
    assert seen in (None, SlotEntry(new, 0, new.view, 0))


@given(entries, st.data())
def test_a_corrupted_byte_is_detected(e: Entry, data: st.DataObject) -> None:
    mem = fresh()
    raw = bytearray(LAYOUT.encode_entry(e, 0, e.view, 0))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    off = LAYOUT.slot_offset(e.index)
    mem[off : off + len(raw)] = raw
    seen = LAYOUT.read_slot(mem, e.index)
    assert not isinstance(seen, SlotEntry) or seen.entry == e


u64 = st.integers(0, 2**64 - 1)


@given(st.builds(Header, u64, st.one_of(st.none(), st.integers(0, 15)), u64, u64, u64, u64))
def test_header_round_trips(h: Header) -> None:
    mem = fresh()
    raw = Layout.encode_header(h)
    mem[0 : len(raw)] = raw
    assert Layout.read_header(mem) == (h if any(h) or h.leader is not None else None)


reports = st.lists(st.tuples(st.integers(1, 2**64 - 1), u64), max_size=OUTPUT_REPORTS).map(tuple)


@given(st.builds(Ack, u64, u64, u64, u64, u64, reports), u64, st.integers(0, 15))
def test_ack_and_vote_round_trip(a: Ack, attempt: int, who: int) -> None:
    mem = fresh()
    off, raw = LAYOUT.ack_offset(who), Layout.encode_ack(a)
    assert len(raw) <= LAYOUT.vote_base - LAYOUT.ack_base  # inside the ack area
    mem[off : off + len(raw)] = raw
    assert LAYOUT.read_ack(mem, who) == (a if any(a) else None)
    v = Vote(*a[:5], attempt)
    off, raw = LAYOUT.vote_offset(who), Layout.encode_vote(v)
    mem[off : off + len(raw)] = raw
    assert LAYOUT.read_vote(mem, who) == (v if any(v) else None)


def test_an_ack_holds_only_so_many_output_reports() -> None:
    too_many = tuple((i, i) for i in range(1, OUTPUT_REPORTS + 2))
    with pytest.raises(ValueError, match="output reports"):
        Layout.encode_ack(Ack(1, 0, 0, 0, 0, too_many))


@given(st.dictionaries(st.integers(0, 8), st.integers(0, 3), min_size=1))
def test_output_verdicts(responses: dict[int, int]) -> None:
    members = tuple(range(9))
    leader = min(responses)
    verdict, divergent = decide(leader, responses, members)
    values = list(responses.values())
    top = max(set(values), key=values.count)
    if values.count(top) < 5:
        assert verdict == OutputVerdict.NO_MAJORITY and divergent == ()
    elif len(set(values)) == 1:
        assert verdict == OutputVerdict.AGREE
    else:
        assert set(divergent) == {m for m, h in responses.items() if h != top}
        expected = (
            OutputVerdict.MINORITY_DIFFERS
            if responses[leader] == top
            else OutputVerdict.LEADER_DIFFERS
        )
        assert verdict == expected


FORBIDDEN = {
    "socket",
    "os",
    "io",
    "time",
    "threading",
    "asyncio",
    "subprocess",
    "select",
    "selectors",
    "mmap",
    "pathlib",
    "shutil",
    "signal",
    "multiprocessing",
    "datetime",
}


def test_the_core_does_no_io() -> None:
    core = Path(__file__).parents[2] / "gaia" / "apus" / "core"
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = {n.split(".")[0] for n in names} & FORBIDDEN
            assert not bad, f"{path.name} imports {bad}: the core must stay pure"


@settings(max_examples=1)
@given(st.just(None))
def test_hypothesis_is_active(_: None) -> None:
    """Guards against a silently disabled hypothesis plugin (the properties above would pass
    vacuously)."""
