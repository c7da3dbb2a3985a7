"""The registry and the checks the runner makes before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gaia.experiments import registry
from gaia.experiments.definition import load
from gaia.experiments.errors import DefinitionError
from gaia.experiments.reference import LocalLog
from gaia.experiments.runner import check
from gaia.results import Paths
from tests.experiments.conftest import tiny, write_definition


def test_reference_system_is_registered() -> None:
    assert registry.system_factory("local-fsync") is LocalLog


def test_unknown_system_lists_what_is_available() -> None:
    with pytest.raises(DefinitionError, match=r"unknown system 'paxi'; available: .*local-fsync"):
        registry.system_factory("paxi")


def test_check_refuses_parameters_the_factory_does_not_take(project: Paths) -> None:
    bad = tiny()
    bad["systems"][0]["params"] = {"fsynk": 1}
    write_definition(project, bad)
    with pytest.raises(DefinitionError, match=r"params \{'fsynk': 1\} do not fit local-fsync"):
        check(load("tiny", project.experiments), "local")


def test_check_refuses_unregistered_systems_and_unknown_targets(project: Paths) -> None:
    experiment = load("tiny", project.experiments)
    check(experiment, "local")
    with pytest.raises(DefinitionError, match=r"target 'mars' .* available: local"):
        check(experiment, "mars")
    write_definition(
        project,
        tiny(
            systems=[{"system": "raft-rs", "durability": "memory"}],
            claims=[],
            paper={"source": "x", "connections": 1},
        ),
    )
    with pytest.raises(DefinitionError, match=r"unknown system 'raft-rs'"):
        check(load("tiny", project.experiments), "local")


def test_local_fsync_appends_and_syncs(tmp_path: Path) -> None:
    log = LocalLog(1, tmp_path, durability="fsync")
    log.start()
    client = log.client()
    client.submit(b"a" * 64)
    client.submit(b"b" * 64)
    assert (tmp_path / "local-fsync.log").read_bytes() == b"a" * 64 + b"b" * 64
    log.stop()
    log.stop()  # idempotent
    assert log.describe() == {
        "system": "local-fsync",
        "replicas": 1,
        "durability": "fsync",
        "entries": 2,
        "bytes": 128,
    }
    assert not (tmp_path / "local-fsync.log").exists()
    with pytest.raises(RuntimeError, match="not running"):
        client.submit(b"c")
    with pytest.raises(ValueError, match="single node"):
        LocalLog(3, tmp_path)
