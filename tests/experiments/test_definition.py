"""Definitions: the real latency-scaling file, validation errors, expansion, resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from gaia.experiments.definition import (
    DURABILITY_LABELS,
    Experiment,
    available,
    expand,
    load,
    load_file,
    select,
    to_raw,
)
from gaia.experiments.errors import DefinitionError
from gaia.results import Paths
from tests.experiments.conftest import tiny, write_definition

REPO = Paths()


def points(experiment: Experiment) -> int:
    return sum(len(s.replicas or experiment.replicas) for s in experiment.systems)


def test_latency_scaling_declares_what_the_issue_asks() -> None:
    full = load("latency-scaling", REPO.experiments)
    systems = {s.system for s in full.systems}
    assert {"apus-shm", "apus-tcp", "zookeeper", "etcd", "libpaxos", "dare"} <= systems
    assert full.replicas == (3, 5, 7, 9)
    assert full.workload.payload_bytes == 64
    assert [m.connections for m in full.client_modes] == [1, 24]
    assert full.trials >= 3
    assert full.workload.requests_per_trial >= 10_000
    assert full.workload.warmup_requests > 0
    assert {p.name: dict(p.latency_us) for p in full.paper.series} == {
        "APUS": {3: 8.2, 9: 8.8},
        "DARE": {3: 24.8, 9: 41.5},
        "ZooKeeper": {3: 99, 9: 129},
        "LibPaxos": {3: 81.6, 9: 208.3},
    }
    assert any(c.paper == 32.3 and c.test == "at_least" for c in full.claims)
    # every curve carries its durability policy in its label
    assert all(DURABILITY_LABELS[s.durability] in s.label for s in full.systems)


def test_expansion_is_the_full_sweep_and_quick_is_smaller() -> None:
    full = load("latency-scaling", REPO.experiments)
    quick = load("latency-scaling", REPO.experiments, quick=True)
    trials = expand(full)
    assert len(trials) == points(full) * len(full.client_modes) * full.trials
    assert len({t.id for t in trials}) == len(trials)
    # trials sharing a running system are adjacent
    groups = [t.group for t in trials]
    assert groups == sorted(groups, key=groups.index)
    assert quick.profile == "quick"
    assert quick.replicas == (3, 9)
    assert quick.trials >= 3
    assert len(expand(quick)) < len(trials)


def test_tiny_expansion_counts(project: Paths) -> None:
    experiment = load("tiny", project.experiments)
    assert len(expand(experiment)) == 3 * 1 * 2 * 3
    assert len(expand(load("tiny", project.experiments, trials=5))) == 3 * 2 * 5
    assert len(expand(load("tiny", project.experiments, quick=True))) == 3 * 2 * 2


def test_unknown_experiment_lists_the_available_ones(project: Paths) -> None:
    write_definition(project, tiny(name="other"))
    with pytest.raises(DefinitionError, match=r"unknown experiment 'nope'.*available.*other, tiny"):
        load("nope", project.experiments)
    assert available(project.experiments) == ["other", "tiny"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"systems": [{"system": "local-fsync", "durability": "fsynk"}]},
            r"systems\[0\]\.durability: expected one of 'fsync', 'group-commit', 'no-fsync', "
            r"'memory', got 'fsynk'",
        ),
        ({"replica": [3]}, r"replica: unknown field; fields here are name, title"),
        ({"trials": "three"}, r"trials: expected int, got 'three'"),
        ({"trials": 0}, r"trials: must be >= 1"),
        ({"workload": {"payload_bytes": 64}}, r"workload\.requests_per_trial: missing required"),
        ({"replicas": []}, r"replicas: a non-empty list"),
        (
            {"claims": [{"claim": "x", "paper": 1, "ratios": ["zk@3 / local-fsync@1"]}]},
            r"claims\[0\]\.ratios: unknown curve 'zk'",
        ),
        (
            {"claims": [{"claim": "x", "paper": 1, "ratios": ["local-fsync / local-memory"]}]},
            r"claims\[0\]\.ratios: .* is not of the form 'series@replicas / series@replicas'",
        ),
        (
            {"systems": [{"system": "local-fsync", "durability": "fsync"}] * 2},
            r"systems\[1\]\.series: 'local-fsync' names two curves",
        ),
        ({"quick": {"trials": -1}}, r"trials: must be >= 1"),
    ],
)
def test_malformed_definitions_name_the_file_and_the_field(
    project: Paths, change: dict[str, object], message: str
) -> None:
    path = write_definition(project, tiny(**change))
    with pytest.raises(DefinitionError, match=message) as raised:
        load("tiny", project.experiments)
    assert str(raised.value).startswith(f"{path}: ")


def test_file_name_and_name_must_agree(project: Paths) -> None:
    (project.experiments / "tiny.yaml").rename(project.experiments / "renamed.yaml")
    with pytest.raises(DefinitionError, match=r"name: 'tiny' must match the file name 'renamed'"):
        load("renamed", project.experiments)


def test_resolved_definition_round_trips(project: Paths, tmp_path: Path) -> None:
    import yaml

    quick = load("tiny", project.experiments, quick=True)
    resolved = tmp_path / "experiment.yaml"
    resolved.write_text(yaml.safe_dump(to_raw(quick), sort_keys=False))
    again = load_file(resolved)
    assert again == quick
    assert again.profile == "quick" and again.trials == 2
    assert again.systems[0].series == "local-fsync"
    assert again.systems[0].label == "local-fsync, fsync every entry"


def test_select_keeps_named_curves_and_the_claims_they_support(project: Paths) -> None:
    experiment = load("tiny", project.experiments)
    only_local = select(experiment, ["local-fsync", "local-memory"])
    assert [s.series for s in only_local.systems] == ["local-fsync", "local-memory"]
    assert [c.claim for c in only_local.claims] == ["fsync costs at least 10x memory"]
    assert [p.compare_with for p in only_local.paper.series] == ["local-fsync", ""]
    with pytest.raises(DefinitionError, match=r"no curve or system 'zookeeper'"):
        select(experiment, ["zookeeper"])
