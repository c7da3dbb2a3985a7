"""The app experiments (issue 4): their definitions, a real redis-overhead run through the
runner with tiny request counts, MongoDB recorded as not run here, the checks before a run,
and the report sections rendered from results files."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from gaia.experiments.definition import Experiment, expand, load, to_raw
from gaia.experiments.errors import DefinitionError, MissingDependency
from gaia.experiments.reproduce import publish, reproduce
from gaia.experiments.runner import run
from gaia.results import COLUMNS, Paths, RowWriter, RunDir, TrialRow
from gaia.workload import InputBreakdown, Metrics
from tests.experiments.conftest import tiny, write_definition

REPO = Paths()
OVERHEADS = ("redis-overhead", "memcached-overhead")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def raw(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO.experiments / f"{name}.yaml").read_text())
    return loaded


@pytest.mark.parametrize("name", OVERHEADS)
def test_overhead_experiments_declare_what_the_issue_asks(name: str) -> None:
    full = load(name, REPO.experiments)
    app = name.split("-", maxsplit=1)[0]
    assert full.baseline == app and full.interleave and full.figure == "load-vs-connections"
    assert [m.connections for m in full.client_modes] == [1, 2, 4, 8, 16, 32]
    assert full.client_rtt_us == (0, 301)
    assert full.trials >= 3 and full.workload.payload_bytes == 64
    assert full.workload.tool == ("redis-benchmark" if app == "redis" else "memcaslap")
    assert full.workload.operations == ("set", "get")
    curves = {(s.system, r) for s in full.systems for r in s.replicas or full.replicas}
    assert curves == {(app, 1), ("apus-shm", 3), ("apus-shm", 9), ("apus-tcp", 3), ("apus-tcp", 9)}
    assert all(s.params.get("app", app) == app for s in full.systems)
    overheads = {c.paper for c in full.claims if c.form == "overhead_pct"}
    assert overheads == ({4.16, 4.3} if app == "redis" else {4.2, 4.3})
    assert {c.client_rtt_us for c in full.claims} == {0, 301}

    quick = load(name, REPO.experiments, quick=True)
    assert quick.profile == "quick" and quick.trials >= 2
    assert [m.connections for m in quick.client_modes] == [1, 8, 32]
    assert quick.replicas == (3,) and quick.client_rtt_us == (0, 301)
    assert len(expand(quick)) < len(expand(full))


@pytest.mark.parametrize("name", [*OVERHEADS, "leader-breakdown", "mongodb-overhead"])
def test_interleaved_trials_visit_every_curve_before_repeating(name: str) -> None:
    for experiment in (load(name, REPO.experiments), load(name, REPO.experiments, quick=True)):
        trials = expand(experiment)
        curves = {(t.spec.series, t.replicas) for t in trials}
        first_round = trials[: len(curves)]
        assert {(t.spec.series, t.replicas) for t in first_round} == curves
        assert len({t.id for t in trials}) == len(trials)
        assert len(trials) == (
            len(curves)
            * len(experiment.client_modes)
            * len(experiment.client_rtt_us)
            * experiment.trials
        )


def test_leader_breakdown_compares_the_seeds_three_numbers() -> None:
    experiment = load("leader-breakdown", REPO.experiments)
    assert experiment.workload.requests_per_trial == 10_000
    assert [m.connections for m in experiment.client_modes] == [8]
    values = {c.metric: (c.paper, c.ratios) for c in experiment.claims if c.form == "value"}
    assert values == {
        "consensus_inputs": (10016, ("apus-shm@3",)),
        "input_bytes_per_call": (42.0, ("apus-shm@3",)),
        "quorum_mean_us": (9.9, ("apus-shm@3",)),
    }
    assert load("leader-breakdown", REPO.experiments, quick=True).trials >= 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"client_rtt_us": [0, 301]}, r"client_rtt_us: an added client round trip needs a load"),
        ({"baseline": "nope"}, r"baseline: unknown curve 'nope'"),
        ({"figure": "load-vs-connections"}, r"figure: load-vs-connections plots a load tool"),
        (
            {"claims": [{"claim": "x", "paper": 1, "form": "value", "ratios": ["a / b"]}]},
            r"claims\[0\]\.ratios: 'a / b' is not of the form 'series@replicas'",
        ),
        (
            {"claims": [{"claim": "x", "paper": 1, "ratios": ["local-fsync@1"]}]},
            r"claims\[0\]\.ratios: .* is not of the form 'series@replicas / series@replicas'",
        ),
        (
            {"workload": {**tiny()["workload"], "tool": "memtier"}},
            r"workload\.tool: expected one of",
        ),
    ],
)
def test_malformed_app_fields_name_the_field(
    project: Paths, change: dict[str, object], message: str
) -> None:
    write_definition(project, tiny(**change))
    with pytest.raises(DefinitionError, match=message):
        load("tiny", project.experiments)


def test_unknown_names_list_the_app_experiments() -> None:
    with pytest.raises(DefinitionError, match=r"unknown experiment 'redis'.*redis-overhead"):
        load("redis", REPO.experiments)


def copy_definition(project: Paths, name: str, **changes: Any) -> None:
    definition = {**raw(name), **changes}
    write_definition(project, definition)


def test_a_missing_load_tool_stops_the_run_before_anything_starts(
    project: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_definition(project, "redis-overhead")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # redis is installed (/usr/bin), but not on PATH
    with pytest.raises(MissingDependency, match=r"redis-benchmark \(Debian package redis-tools"):
        reproduce("redis-overhead", quick=True, paths=project, console=quiet())
    assert not project.results.exists()


def small_redis_overhead() -> dict[str, Any]:
    """redis-overhead cut down to CI size: Redis alone and apus-shm x3, 2 connections, with
    and without the relay, 2 trials of 200 requests."""
    definition = raw("redis-overhead")
    definition.pop("quick")
    definition["systems"] = [s for s in definition["systems"] if s["system"] != "apus-tcp"]
    definition.update(
        replicas=[3],
        trials=2,
        client_modes=[{"connections": 2}],
        workload={**definition["workload"], "requests_per_trial": 200, "warmup_requests": 20},
        timeouts={"trial_s": 60},
        paper={**definition["paper"], "connections": 2},
    )
    return definition


@pytest.mark.integration
def test_redis_overhead_runs_end_to_end_and_publishes(project: Paths) -> None:
    write_definition(project, small_redis_overhead())
    experiment = load("redis-overhead", project.experiments)
    run_dir = RunDir(run(experiment, paths=project, console=quiet()))
    assert run_dir.status() == "complete"
    rows = run_dir.results()
    assert tuple(rows.columns) == COLUMNS
    assert (rows["status"] == "ok").all(), rows[["trial_id", "reason"]].to_string()
    assert len(rows) == 2 * 2 * 2  # curves x round trips x trials
    # interleaved: every curve ran before any ran again, each trial on its own system
    assert list(rows["series"][:2]) == ["redis", "apus-shm"]
    assert rows["log_dir"].nunique() == len(rows)
    assert set(rows["client_rtt_us"]) == {0, 301}
    assert (rows["requests"] == 200).all() and (rows["throughput_rps"] > 0).all()
    assert (rows["p99_us"] >= rows["mean_us"] * 0.5).all()
    apus, alone = rows[rows["series"] == "apus-shm"], rows[rows["series"] == "redis"]
    # the leader's counters: 200 reads (+1: redis-benchmark reads the config first) of 107 and
    # 36 bytes, each agreed, with the accepts and closes of 2 connections per test (SET, GET)
    # and of the configuration's
    assert (apus["input_calls"] == 201).all()
    assert (apus["consensus_inputs"] == 201 + 5 + 5).all()
    assert apus["input_bytes_per_call"].between(60, 80).all()
    assert (apus["quorum_mean_us"] > 0).all() and (apus["storage_mean_us"] > 0).all()
    assert alone["input_calls"].isna().all()
    relayed = rows[rows["client_rtt_us"] == 301]
    assert relayed["relay_rtt_us"].between(200, 5000).all()
    assert rows.loc[rows["client_rtt_us"] == 0, "relay_rtt_us"].isna().all()
    logs = run_dir.path / relayed["log_dir"].iloc[0]
    assert (logs / f"{relayed['trial_id'].iloc[0]}.relay.json").exists()
    assert (logs / f"{relayed['trial_id'].iloc[0]}.load.command").read_text().startswith(
        "cd "
    )

    outcome = publish(run_dir.path, project)
    assert [p.name for p in outcome.figures] == ["redis-overhead.png", "redis-overhead.pdf"]
    text = outcome.report.read_text()
    assert "| Mean throughput overhead, 3 replicas, client direct | 4.16% |" in text
    assert "### Throughput lost vs `redis` (%, medians over trials)" in text
    assert "### What limits it" in text
    assert "### Client network: +301 µs round trip through the relay" in text
    assert "1 further claim needs points outside this full sweep" in text  # the 9-replica one


def test_mongodb_is_recorded_as_not_run_here(project: Paths) -> None:
    if shutil.which("mongod"):
        pytest.skip("mongod is installed here: this target can run MongoDB")
    copy_definition(project, "mongodb-overhead")
    experiment = load("mongodb-overhead", project.experiments, quick=True)
    run_dir = RunDir(run(experiment, paths=project, console=quiet()))
    rows = run_dir.results()
    assert len(rows) == 16 and (rows["status"] == "not-run-here").all()
    why = "mongod is not installed here: MongoDB is not packaged by Debian 12"
    assert rows["reason"].str.contains(why).all()
    outcome = publish(run_dir.path, project)
    text = outcome.report.read_text()
    line = next(x for x in text.splitlines() if x.startswith("| Mean throughput overhead"))
    assert "not run here: mongodb: mongod is not installed" in line
    assert line.endswith("| not run here | yes (memory / no-fsync) |")  # neither on disk
    assert "- `mongodb`: not run here: mongodb: mongod is not installed here" in text
    assert outcome.figures[0].stat().st_size > 0


def write_run(project: Paths, experiment: Experiment, rows: list[TrialRow]) -> RunDir:
    """A run directory as the runner leaves it, from rows made up for the test."""
    run_dir = RunDir.create(project, experiment.name)
    run_dir.write_definition(experiment)
    run_dir.write_env({"target": "local", "git": {"commit": "0" * 40}, "host": {}})
    with run_dir.rows() as writer:
        assert isinstance(writer, RowWriter)
        for row in rows:
            writer.append(row)
    run_dir.set_status("complete")
    return run_dir


def breakdown_row(series: str, number: int, quorum: float) -> TrialRow:
    return TrialRow(
        trial_id=f"{series}-r3-c8-t{number}",
        series=series,
        system=series,
        label=series,
        durability="memory",
        replicas=3,
        connections=8,
        trial=number,
        status="ok",
        metrics=Metrics(10_000, None, 5000.0, 9000.0, 1500.0, 6.6),
        breakdown=InputBreakdown(
            consensus_inputs=10_035,
            consensus_rounds=2_500,
            input_calls=10_001,
            input_bytes_per_call=40.5,
            storage_mean_us=300.0,
            first_ack_mean_us=420.0,
            quorum_mean_us=quorum,
        ),
    )


def test_the_breakdown_report_and_figure_come_from_results_files(project: Paths) -> None:
    copy_definition(project, "leader-breakdown")
    experiment = load("leader-breakdown", project.experiments)
    rows = [breakdown_row("apus-shm", n, q) for n, q in ((1, 480.0), (2, 500.0), (3, 520.0))]
    rows += [breakdown_row("apus-tcp", n, 600.0) for n in (1, 2, 3)]
    run_dir = write_run(project, experiment, rows)
    (project.experiments / "leader-breakdown.yaml").unlink()  # the run directory is enough
    outcome = publish(run_dir.path, project)
    text = outcome.report.read_text()
    calls = next(x for x in text.splitlines() if x.startswith("| Socket calls intercepted"))
    assert "| 10016 | 10,035 | 1.00 | agrees (within 2x) |" in calls
    consensus = next(x for x in text.splitlines() if x.startswith("| Mean consensus latency"))
    assert "| 9.9 | 500.0 | 50.51 | higher (51x the paper) |" in consensus
    assert "### Measured on the leader, per trial (median over trials, 95% CI)" in text
    assert "| `apus-tcp`, 3 replicas | 8 connections | 10,000 | 10,035 |" in text
    assert all(p.stat().st_size > 0 for p in outcome.figures)


def test_old_runs_without_the_new_columns_still_read(project: Paths) -> None:
    experiment = load("tiny", project.experiments)
    run_dir = RunDir.create(project, "tiny")
    run_dir.write_definition(experiment)
    old = [c for c in COLUMNS if c not in {"client_rtt_us", "relay_rtt_us", "quorum_mean_us"}]
    run_dir.results_csv.write_text(
        ",".join(old) + "\n" + ",".join("1" if c in {"replicas", "trial"} else "" for c in old)
    )
    rows = run_dir.results()
    assert tuple(rows.columns) == COLUMNS
    assert rows["client_rtt_us"].tolist() == [0]
    assert to_raw(experiment)["client_rtt_us"] == [0]
