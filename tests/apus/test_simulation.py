"""The simulator, as CI runs it: a few hundred seeded fault schedules must find no violation, and
a deliberately broken quorum rule must be caught (so the checker is known to bite)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaia.apus.core import replica
from gaia.apus.sim.__main__ import main, run_one
from gaia.apus.sim.world import FAULT_KINDS, Faults, SimParams


@pytest.mark.slow
def test_a_sweep_of_seeds_finds_no_violation(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--seeds", "100", "--replicas", "3,5,7,9", "--faults", "all", "--jobs", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 violations" in out and "= 400 runs" in out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    replicas=st.sampled_from([1, 2, 3, 4, 5]),
    kinds=st.frozensets(st.sampled_from(FAULT_KINDS)),
)
def test_any_fault_mix_keeps_safety_and_liveness(
    seed: int, replicas: int, kinds: frozenset[str]
) -> None:
    out = run_one(SimParams(replicas=replicas, seed=seed, faults=Faults(kinds)))
    assert out.violation is None, f"seed {seed}: {out.violation}"


def test_a_broken_quorum_rule_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commit with half the group instead of a majority: two sides of a partition then commit
    different entries at one index, and the checker must say so."""
    monkeypatch.setattr(replica, "quorum_size", lambda n: max(1, n // 2))
    found = [
        out
        for seed in range(40)
        if (out := run_one(SimParams(replicas=4, seed=seed, faults=Faults.parse("all")))).violation
    ]
    assert found, "the simulator did not notice a minority quorum"


def test_replay_prints_a_trace(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "5", "--replicas", "3", "--faults", "crash", "--trace"]) == 0
    out = capsys.readouterr().out
    assert "leader view" in out and out.strip().splitlines()[-1].startswith("ok:")


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--faults", "meteor"])
    assert e.value.code == 2 and "unknown faults" in capsys.readouterr().err
