"""The runner: an experiment's trials, run on one target, recorded in one run directory.

Life cycle (one per group of trials sharing a curve and a replica count):

    factory(replicas, log_dir, **params) -> start() -> [trial, trial, ...] -> stop()

A system is started once per group and every client mode and repetition of that group runs
against it. Starting a 9-server ZooKeeper or etcd ensemble costs seconds, and per-trial restarts
would take most of a `--quick` run's five minutes; repeated trials still differ in their
clients, their keys and the moment they run. A trial that fails (an error or a timeout) may
have left the system in any state, so the system is stopped and the group's remaining trials
get a fresh one (`logs/<group>.2/`, ...). `stop()` runs in a `finally` for every start, also on
Ctrl-C or SIGTERM, after which the run is marked interrupted with the rows so far kept. The
runner bounds the workload in time (the part a system under test can hang); `start()` and
`stop()` are bounded by the systems' own readiness and termination timeouts.

Interleaved experiments (the app overheads, whose curves are compared side by side) give every
trial a fresh system instead, in round-robin order (gaia.experiments.definition.expand), so
that noise lands on every curve alike; their systems start in about a second.

A trial is either GAIA's closed-loop consensus client (gaia.workload) or, with `workload.tool`,
an app's own load tool against the server the system exposes (gaia.apps.loadgen.measure:
through the delaying relay when the trial adds a client round trip, with the leader's input
counters read before and after when the system keeps them).

Outcomes, one results row per trial, all recorded and none fatal to the run:
- ok: the measured metrics (samples/ keeps every request);
- failed: the error, with the system's logs and the traceback in its log directory;
- not-run-here: the system cannot run on this target: its factory (or start) raised
  SystemUnavailable, whose message says why.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import signal
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from gaia.apps import loadgen
from gaia.environment import describe as describe_environment
from gaia.experiments.definition import Experiment, SystemSpec, Trial, expand
from gaia.experiments.errors import DefinitionError, RunInterrupted
from gaia.experiments.registry import system_factory
from gaia.results import Paths, RowWriter, RunDir, Status, TrialRow, utc_now, write_json
from gaia.systems import ReplicatedSystem, ServesApp, SystemUnavailable
from gaia.workload import InputBreakdown, Load, Metrics, run_closed_loop

RUNNABLE_TARGETS: tuple[str, ...] = ("local",)
"""Targets this runner drives. Remote ones need gaia.cluster's remote launcher (not yet)."""


def check(experiment: Experiment, target: str) -> None:
    """Everything that can be known before starting: the target is one this runner drives, and
    every system is registered and accepts its parameters. Raises DefinitionError."""
    if target not in RUNNABLE_TARGETS:
        raise DefinitionError(
            f"target {target!r} cannot be run by this runner yet; available: "
            + ", ".join(RUNNABLE_TARGETS)
        )
    for index, spec in enumerate(experiment.systems):
        factory = system_factory(spec.system)
        try:
            inspect.signature(factory).bind(1, Path("."), **factory_params(experiment, spec))
        except TypeError as exc:
            raise DefinitionError(
                f"{experiment.name}: systems[{index}] ({spec.series}): params {dict(spec.params)} "
                f"do not fit {spec.system}'s factory {inspect.signature(factory)}: {exc}"
            ) from None


def factory_params(experiment: Experiment, spec: SystemSpec) -> dict[str, Any]:
    """What a curve's factory gets: its `params`, plus the experiment's `isolation` for every
    system that runs replicas of its own (takes an `isolation` parameter) and sets none."""
    params = dict(spec.params)
    if "isolation" in inspect.signature(system_factory(spec.system)).parameters:
        params.setdefault("isolation", experiment.isolation)
    return params


def _isolation_of(system: ReplicatedSystem) -> str:
    """The isolation mode a running system reports, "" for one without replicas of its own."""
    isolation = system.describe().get("isolation")
    return str(isolation.get("mode", "")) if isinstance(isolation, dict) else ""


def run(
    experiment: Experiment,
    *,
    target: str = "local",
    paths: Paths | None = None,
    console: Console | None = None,
) -> Path:
    """Run every trial of `experiment` and return its run directory.

    Raises DefinitionError before creating anything if `check` fails, and RunInterrupted
    (carrying the run directory) after a clean stop on Ctrl-C or SIGTERM.
    """
    check(experiment, target)
    paths = paths or Paths()
    console = console or Console()
    run_dir = RunDir.create(paths, experiment.name)
    run_dir.write_definition(experiment)
    run_dir.write_env(
        describe_environment(
            target=target,
            parameters={
                "profile": experiment.profile,
                "trials": experiment.trials,
                "isolation": experiment.isolation,
            },
            debian_packages=[p for s in experiment.systems for p in s.packages],
            results_dir=run_dir.path,
        )
    )
    trials = expand(experiment)
    console.print(
        f"[bold]{experiment.name}[/] ({experiment.profile}): {len(trials)} trials -> {run_dir.path}"
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with (
            run_dir.rows() as rows,
            Progress(*columns, console=console) as progress,
            _sigterm_interrupts(),
        ):
            session = _Session(
                experiment,
                run_dir=run_dir,
                rows=rows,
                progress=progress,
                total=len(trials),
            )
            key = (lambda t: t.id) if experiment.interleave else (lambda t: t.group)
            for name, group in itertools.groupby(trials, key=key):
                session.run_group(list(group), name)
    except KeyboardInterrupt:
        run_dir.set_status("interrupted")
        raise RunInterrupted(run_dir.path) from None
    run_dir.set_status("complete")
    return run_dir.path


class _Session:
    """The state of one run: where rows go and how progress is shown."""

    def __init__(
        self,
        experiment: Experiment,
        *,
        run_dir: RunDir,
        rows: RowWriter,
        progress: Progress,
        total: int,
    ) -> None:
        self.experiment = experiment
        self.run_dir = run_dir
        self.rows = rows
        self.progress = progress
        self.overall = progress.add_task(experiment.name, total=total)
        self.prepared = False  # the load tool's preparation ran on the current system

    def run_group(self, trials: list[Trial], group: str) -> None:
        """Run a group's trials against one system, restarting it after a failed trial."""
        spec, replicas = trials[0].spec, trials[0].replicas
        tool = self.experiment.workload.tool
        pending = list(trials)
        for attempt in itertools.count(1):
            if not pending:
                return
            name = group if attempt == 1 else f"{group}.{attempt}"
            log_dir = self.run_dir.log_dir(name)
            with self.progress_task(f"starting {name}") as task:
                try:
                    factory = system_factory(spec.system)
                    system = factory(replicas, log_dir, **factory_params(self.experiment, spec))
                    if tool:
                        loadgen.driver(tool).require()  # YCSB: testbed only
                    with _running(system, log_dir):
                        self.prepared = False
                        self.check_durability(spec, system)
                        while pending and self.run_trial(system, pending[0], log_dir, task):
                            pending.pop(0)
                        if pending:  # that trial failed and is recorded; the system is suspect
                            pending.pop(0)
                except SystemUnavailable as exc:
                    for trial in pending:
                        self.record(trial, "not-run-here", _one_line(exc))
                    return
                except Exception as exc:
                    details = _traceback_file(log_dir, "system", exc)
                    if not pending:  # every trial is recorded: only stopping failed
                        self.progress.console.print(
                            f"[red]{name}: {_one_line(exc)}[/] "
                            f"(see {self.run_dir.relative(details)})",
                            highlight=False,
                            soft_wrap=True,
                        )
                    for trial in pending:
                        self.record(
                            trial,
                            "failed",
                            f"system: {_one_line(exc)}",
                            log_dir=log_dir,
                            details=details,
                        )
                    return

    def run_trial(
        self, system: ReplicatedSystem, trial: Trial, log_dir: Path, task: TaskID
    ) -> bool:
        """Measure one trial and record it; False if it failed."""
        if self.experiment.workload.tool:
            return self.run_app_trial(system, trial, log_dir, task)
        workload = self.experiment.workload
        load = Load(
            connections=trial.mode.connections,
            requests=workload.requests_per_trial,
            warmup=workload.warmup_requests,
            payload_bytes=workload.payload_bytes,
            timeout_s=self.experiment.timeouts.trial_s,
        )
        self.progress.update(task, description=trial.id, completed=0)

        def show(done: int, total: int) -> None:
            self.progress.update(task, completed=done, total=total)

        try:
            recording = run_closed_loop(system.client, load, show)
        except Exception as exc:
            return self.record_failure(system, trial, log_dir, exc)
        self.run_dir.write_samples(trial.id, recording)
        self.record(
            trial,
            "ok",
            "",
            log_dir=log_dir,
            metrics=recording.metrics(),
            isolation=_isolation_of(system),
        )
        return True

    def run_app_trial(
        self, system: ReplicatedSystem, trial: Trial, log_dir: Path, task: TaskID
    ) -> bool:
        """One run of the app's load tool (after its warm-up run) against the system's server."""
        workload = self.experiment.workload
        tool = loadgen.driver(workload.tool)
        load = loadgen.ToolLoad(
            connections=trial.mode.connections,
            requests=workload.requests_per_trial,
            payload_bytes=workload.payload_bytes,
            operations=workload.operations,
            timeout_s=self.experiment.timeouts.trial_s,
        )
        self.progress.update(task, description=f"{trial.id}: {tool.tool}", total=None)
        try:
            if not isinstance(system, ServesApp):
                raise RuntimeError(f"{system.name} serves no app for {tool.tool} to drive")
            measured = loadgen.measure(
                system,
                tool,
                load,
                warmup=workload.warmup_requests,
                client_rtt_us=trial.client_rtt_us,
                log_dir=log_dir,
                name=trial.id,
                prepare=not self.prepared,
            )
            self.prepared = True
        except Exception as exc:
            return self.record_failure(system, trial, log_dir, exc)
        relay_rtt_us = None
        if measured.relay is not None:
            write_json(log_dir / f"{trial.id}.relay.json", measured.relay.as_dict())
            relay_rtt_us = _rounded(measured.relay.measured_rtt_us)
        self.record(
            trial,
            "ok",
            "",
            log_dir=log_dir,
            metrics=measured.metrics,
            breakdown=measured.breakdown,
            relay_rtt_us=relay_rtt_us,
            isolation=_isolation_of(system),
        )
        return True

    def check_durability(self, spec: SystemSpec, system: ReplicatedSystem) -> None:
        """A curve's durability label must be what the system says it does."""
        reported = system.describe().get("durability")
        if reported is not None and reported != spec.durability:
            raise RuntimeError(
                f"definition says durability {spec.durability!r}, the system reports {reported!r}"
            )

    def record_failure(
        self, system: ReplicatedSystem, trial: Trial, log_dir: Path, exc: Exception
    ) -> bool:
        """Record a trial that raised, with its traceback beside the logs; always False."""
        details = _traceback_file(log_dir, trial.id, exc)
        isolation = _isolation_of(system)
        self.record(
            trial, "failed", _one_line(exc), log_dir=log_dir, details=details, isolation=isolation
        )
        return False

    def record(
        self,
        trial: Trial,
        status: Status,
        reason: str,
        *,
        log_dir: Path | None = None,
        details: Path | None = None,
        metrics: Metrics | None = None,
        isolation: str = "",
        breakdown: InputBreakdown | None = None,
        relay_rtt_us: float | None = None,
    ) -> None:
        """Append the trial's row and print its line."""
        if details is not None:
            reason = f"{reason} (see {self.run_dir.relative(details)})"
        row = TrialRow(
            trial_id=trial.id,
            series=trial.spec.series,
            system=trial.spec.system,
            label=trial.spec.label,
            durability=trial.spec.durability,
            replicas=trial.replicas,
            connections=trial.mode.connections,
            client_rtt_us=trial.client_rtt_us,
            trial=trial.number,
            status=status,
            reason=reason,
            isolation=isolation,
            metrics=metrics,
            relay_rtt_us=relay_rtt_us,
            breakdown=breakdown,
            log_dir=self.run_dir.relative(log_dir) if log_dir is not None else "",
            finished_utc=utc_now().isoformat(timespec="seconds"),
        )
        self.rows.append(row)
        self.progress.advance(self.overall)
        self.progress.console.print(_line(row), highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def progress_task(self, description: str) -> Iterator[TaskID]:
        task = self.progress.add_task(description, total=None)
        try:
            yield task
        finally:
            self.progress.remove_task(task)


@contextlib.contextmanager
def _running(system: ReplicatedSystem, log_dir: Path) -> Iterator[None]:
    """Start `system` and stop it whatever happens inside; system.json records what it was
    (written at start, so a crash keeps it, and again after stop with its final counters; a
    describe() that fails after a failure must not hide that failure)."""
    try:
        system.start()
        write_json(log_dir / "system.json", system.describe())
        yield
    finally:
        system.stop()
        with contextlib.suppress(Exception):
            write_json(log_dir / "system.json", system.describe())


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while running, so `kill` also stops systems cleanly (only the
    main thread may set signal handlers; elsewhere SIGTERM keeps its meaning)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> Any:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _traceback_file(log_dir: Path, name: str, exc: BaseException) -> Path:
    path = log_dir / f"{name}.error.txt"
    path.write_text("".join(traceback.format_exception(exc)))
    return path


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _line(row: TrialRow) -> str:
    """One printed line per finished trial."""
    rtt = f" +{row.client_rtt_us}µs" if row.client_rtt_us else ""
    where = f"{row.series} r{row.replicas} c{row.connections}{rtt} t{row.trial}"
    m = row.metrics
    if row.status == "ok" and m is not None:
        center = f"median {m.median_us:.1f} µs" if m.median_us is not None else ""
        center = center or f"mean {m.mean_us:.1f} µs"
        text = (
            f"[green]{'ok':<12}[/] {where}: {center}, "
            f"p99 {m.p99_us:.1f} µs, {m.throughput_rps:.0f} req/s"
        )
        if row.breakdown is not None and row.breakdown.quorum_mean_us is not None:
            text += f", consensus {row.breakdown.quorum_mean_us:.0f} µs"
        if row.relay_rtt_us is not None:
            text += f", relay RTT {row.relay_rtt_us:.0f} µs"
        return text
    colour = "red" if row.status == "failed" else "yellow"
    return f"[{colour}]{row.status:<12}[/] {where}: {row.reason}"
