"""The real runner on the reference system: run directories, failures, crashes, Ctrl-C."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from gaia.experiments.definition import load
from gaia.experiments.errors import DefinitionError
from gaia.experiments.runner import factory_params, run
from gaia.report import render
from gaia.results import COLUMNS, Paths, RunDir
from tests.experiments.conftest import TINY, tiny, write_definition

REPO_ROOT = Path(__file__).resolve().parents[2]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def run_tiny(project: Paths) -> RunDir:
    return RunDir(run(load("tiny", project.experiments), paths=project, console=quiet()))


def test_a_run_is_a_self_describing_directory(project: Paths) -> None:
    run_dir = run_tiny(project)
    assert run_dir.path.parent == project.results / "tiny"
    stamp, short_id = run_dir.path.name.split("_")
    assert stamp.endswith("Z") and len(short_id) == 6
    assert run_dir.status() == "complete"
    assert run_dir.definition() == load("tiny", project.experiments)

    rows = run_dir.results()
    assert tuple(rows.columns) == COLUMNS
    assert len(rows) == 3 * 2 * 3  # curves x client modes x trials, one row each
    ok = rows[rows["status"] == "ok"]
    assert set(ok["series"]) == {"local-fsync", "local-memory"}
    assert (ok["requests"] == 120).all()
    assert (ok["median_us"] > 0).all() and (ok["p99_us"] >= ok["median_us"]).all()
    assert set(ok["durability"]) == {"fsync", "memory"}
    assert set(ok["label"]) == {"local-fsync, fsync every entry", "local-fsync, memory only"}

    not_here = rows[rows["series"] == "dare"]
    assert (not_here["status"] == "not-run-here").all()
    assert not_here["reason"].str.contains("RDMA").all()

    logs = run_dir.path / "logs" / "local-fsync-r1"
    assert json.loads((logs / "system.json").read_text())["entries"] == 6 * (120 + 12)
    samples = sorted((run_dir.path / "samples").glob("*.csv.gz"))
    assert len(samples) == len(ok)


def test_env_json_records_the_machine_and_versions(project: Paths) -> None:
    env = run_tiny(project).env()
    assert env["target"] == "local"
    assert env["parameters"] == {"profile": "full", "trials": 3, "isolation": "auto"}
    assert len(env["git"]["commit"]) == 40 and isinstance(env["git"]["dirty"], bool)
    host = env["host"]
    for field in ("hostname", "kernel", "cpu_model", "os", "results_filesystem"):
        assert isinstance(host[field], str) and host[field]
    assert host["cores"] >= 1 and host["memory_bytes"] > 0
    assert env["python"]["version"].count(".") == 2
    assert env["python_packages"]["numpy"] and env["python_packages"]["gaia"]
    assert env["debian_packages"]["dpkg"]  # installed: has a version
    assert env["debian_packages"]["no-such-package-gaia"] is None


@pytest.mark.integration
def test_one_isolation_for_every_system_recorded_in_each_row(project: Paths) -> None:
    definition = tiny(
        systems=[
            {
                "system": "apus-shm",
                "durability": "memory",
                "params": {"durability": "memory"},
                "replicas": [3],
            },
            TINY["systems"][0],
        ],
        paper={"source": "x", "connections": 1},
        claims=[],
        trials=1,
        client_modes=[{"connections": 1}],
        isolation="none",
    )
    write_definition(project, definition)
    experiment = load("tiny", project.experiments)
    apus, reference = experiment.systems
    pinned = dataclasses.replace(apus, params={"isolation": "netns"})
    assert factory_params(experiment, apus) == {"durability": "memory", "isolation": "none"}
    assert factory_params(experiment, pinned) == {"isolation": "netns"}  # a curve's own wins
    assert "isolation" not in factory_params(experiment, reference)  # a single process

    run_dir = run_tiny(project)
    rows = run_dir.results().set_index("series")
    assert rows.loc["apus-shm", "status"] == "ok" and rows.loc["apus-shm", "isolation"] == "none"
    assert rows.loc["local-fsync", "isolation"] == ""
    system = json.loads((run_dir.path / "logs" / "apus-shm-r3" / "system.json").read_text())
    assert system["isolation"]["mode"] == "none" and "asked for" in system["isolation"]["reason"]
    assert run_dir.env()["parameters"]["isolation"] == "none"
    assert "Replicas ran as plain processes on 127.0.0.1." in render(run_dir, project)


def test_failed_trials_are_recorded_and_the_run_goes_on(project: Paths) -> None:
    definition = tiny()
    definition["systems"] = [
        # local-fsync refuses 3 replicas: that group fails, the others still run
        {
            "system": "local-fsync",
            "durability": "fsync",
            "params": {"durability": "fsync"},
            "replicas": [3, 1],
        },
        # a label that lies about durability fails: the system reports fsync
        {
            "system": "local-fsync",
            "series": "local-memory",
            "durability": "memory",
            "params": {"durability": "fsync"},
        },
        {"system": "dare", "durability": "memory"},
    ]
    write_definition(project, definition)
    run_dir = run_tiny(project)
    rows = run_dir.results()
    assert run_dir.status() == "complete"
    refused = rows[(rows["series"] == "local-fsync") & (rows["replicas"] == 3)]
    assert len(refused) == 6 and (refused["status"] == "failed").all()
    assert refused["reason"].str.contains("single node").all()
    error = run_dir.path / refused["log_dir"].iloc[0] / "system.error.txt"
    assert "ValueError" in error.read_text()
    fine = rows[(rows["series"] == "local-fsync") & (rows["replicas"] == 1)]
    assert (fine["status"] == "ok").all() and len(fine) == 6
    lying = rows[rows["series"] == "local-memory"]
    assert (lying["status"] == "failed").all()
    assert (
        lying["reason"]
        .str.contains("definition says durability 'memory', the system reports 'fsync'")
        .all()
    )


def test_a_timed_out_trial_restarts_the_system_for_the_next(project: Paths) -> None:
    definition = tiny(
        systems=[TINY["systems"][0]],
        paper={"source": "x", "connections": 1},
        claims=[],
        workload={"payload_bytes": 64, "requests_per_trial": 200_000, "warmup_requests": 0},
        timeouts={"trial_s": 0.2},
        client_modes=[{"connections": 1}],
        trials=2,
    )
    write_definition(project, definition)
    run_dir = run_tiny(project)
    rows = run_dir.results()
    assert list(rows["status"]) == ["failed", "failed"]
    assert rows["reason"].str.contains("answered within 0.2 s").all()
    assert list(rows["log_dir"]) == ["logs/local-fsync-r1", "logs/local-fsync-r1.2"]


RUNNER_SCRIPT = """
import sys
from pathlib import Path
from gaia.experiments.definition import load
from gaia.experiments.errors import RunInterrupted
from gaia.experiments.runner import factory_params, run
from gaia.results import Paths
paths = Paths(Path(sys.argv[1]))
try:
    run(load("long", paths.experiments), paths=paths)
except RunInterrupted as stopped:
    print("INTERRUPTED", stopped.run_dir)
    sys.exit(130)
"""


def start_long_run(project: Paths) -> tuple[subprocess.Popen[str], Path]:
    """A run of many short fsync trials in a child process; returns once it has written rows."""
    write_definition(
        project,
        tiny(
            name="long",
            systems=[TINY["systems"][0]],
            paper={"source": "x", "connections": 1},
            claims=[],
            trials=500,
            workload={"payload_bytes": 64, "requests_per_trial": 20, "warmup_requests": 0},
        ),
    )
    child = subprocess.Popen(
        [sys.executable, "-c", RUNNER_SCRIPT, str(project.root)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = list((project.results / "long").glob("*/results.csv"))
        if found and len(found[0].read_text().splitlines()) > 3:
            return child, found[0].parent
        time.sleep(0.05)
    child.kill()
    pytest.fail(f"the run wrote no rows: {child.communicate()[0]}")


def test_results_survive_a_crash_mid_run(project: Paths) -> None:
    child, path = start_long_run(project)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    run_dir = RunDir(path)
    rows = run_dir.results()
    assert len(rows) >= 3 and (rows["status"] == "ok").all()
    assert rows["median_us"].notna().all()  # no torn last row
    assert run_dir.status() == "running"  # a crash is visible as a run that never finished


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_stops_cleanly_and_keeps_rows(project: Paths, sig: signal.Signals) -> None:
    child, path = start_long_run(project)
    child.send_signal(sig)
    output, _ = child.communicate(timeout=60)
    assert child.returncode == 130, output
    assert f"INTERRUPTED {path}" in output
    run_dir = RunDir(path)
    assert run_dir.status() == "interrupted"
    assert len(run_dir.results()) >= 3
    # the system was stopped: local-fsync removes its data file and records its final counters
    logs = path / "logs" / "local-fsync-r1"
    assert not (logs / "local-fsync.log").exists()
    assert json.loads((logs / "system.json").read_text())["entries"] > 0


def test_nothing_starts_when_the_definition_is_wrong(project: Paths) -> None:
    write_definition(
        project,
        tiny(
            systems=[{"system": "nope", "durability": "memory"}],
            paper={"source": "x", "connections": 1},
            claims=[],
        ),
    )
    with pytest.raises(DefinitionError, match="unknown system 'nope'"):
        run(load("tiny", project.experiments), paths=project, console=quiet())
    assert not project.results.exists()


def test_reproduce_cli_stops_on_an_unknown_experiment() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "reproduce", "--exp", "no-such-experiment"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
        check=False,
    )
    assert done.returncode == 2
    assert "unknown experiment 'no-such-experiment'" in done.stdout
    assert "latency-scaling" in done.stdout
