"""`invoke reproduce` and `invoke report` behind the front door: validate, install, run, publish.

Order matters for the user's time: every requested definition is loaded and checked (names,
fields, systems, parameters, target) before anything is installed, and everything is installed
before the first trial, so a mistake or a missing package never surfaces an hour into a sweep.
Publishing (figure + report section) reads only the run directory, so `invoke report` can redo
it for any earlier run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from gaia import plots, provision, report
from gaia.apps import loadgen
from gaia.experiments import runner
from gaia.experiments.definition import Experiment, available, load, select
from gaia.experiments.errors import DefinitionError, MissingDependency
from gaia.results import Paths, RunDir

ALL = "all"


@dataclass(frozen=True)
class Outcome:
    """What a published run produced."""

    experiment: str
    run_dir: Path
    figures: tuple[Path, ...]
    report: Path


def names_of(name: str, paths: Paths) -> list[str]:
    """`all` or one experiment name, as the list of names it stands for."""
    return available(paths.experiments) if name == ALL else [name]


def prepare(
    name: str,
    *,
    quick: bool = False,
    trials: int | None = None,
    target: str = "local",
    systems: Sequence[str] = (),
    paths: Paths | None = None,
) -> list[Experiment]:
    """Load and check every requested experiment; raises ExperimentError before anything runs."""
    paths = paths or Paths()
    names = names_of(name, paths)
    if not names:
        raise DefinitionError(f"no experiment definitions in {paths.experiments}")
    experiments = [load(n, paths.experiments, quick=quick, trials=trials) for n in names]
    if systems:
        experiments = [select(e, systems) for e in experiments]
    for experiment in experiments:
        runner.check(experiment, target)
    return experiments


def install(experiments: Sequence[Experiment]) -> None:
    """Provision the roles the experiments' systems and load tools need (a no-op when they are
    installed), then make sure every load tool a role provides is there: a missing
    redis-benchmark or memcaslap stops the run here, before anything starts. A tool no role
    installs on this target (YCSB) is left to the runner, which records its trials as not run
    here."""
    roles = sorted(
        {role for e in experiments for s in e.systems for role in s.roles}
        | {d.role for d in _tools(experiments) if d.role}
    )
    try:
        provision.ensure(roles)
    except provision.ProvisionError as exc:
        raise MissingDependency(f"cannot install {', '.join(roles)}: {exc}") from exc
    require_tools(experiments)


def require_tools(experiments: Sequence[Experiment]) -> None:
    """MissingDependency naming every load tool that a local role should have installed but
    that is not on PATH."""
    missing = [d for d in _tools(experiments) if d.role and not d.installed()]
    if missing:
        raise MissingDependency(
            "load tool not found on PATH: "
            + "; ".join(
                f"{d.binary} (Debian package {d.package}, installed by the {d.role} role: "
                f"./invoke setup --only {d.role} --force)"
                for d in missing
            )
        )


def _tools(experiments: Sequence[Experiment]) -> list[loadgen.Driver]:
    tools = sorted({e.workload.tool for e in experiments if e.workload.tool})
    return [loadgen.driver(tool) for tool in tools]


def reproduce(
    name: str,
    *,
    quick: bool = False,
    trials: int | None = None,
    target: str = "local",
    systems: Sequence[str] = (),
    paths: Paths | None = None,
    console: Console | None = None,
) -> list[Outcome]:
    """Check, install, then run and publish each experiment in turn."""
    paths = paths or Paths()
    experiments = prepare(
        name, quick=quick, trials=trials, target=target, systems=systems, paths=paths
    )
    install(experiments)
    return [
        publish(runner.run(e, target=target, paths=paths, console=console), paths)
        for e in experiments
    ]


def publish(run_dir: Path, paths: Paths | None = None) -> Outcome:
    """Figure and report section of a run, from its files."""
    paths = paths or Paths()
    figures = plots.plot_run(run_dir, paths)
    written = report.update(run_dir, paths)
    return Outcome(RunDir(run_dir).definition().name, run_dir, tuple(figures), written)


def republish(name: str, run: Path | None = None, paths: Paths | None = None) -> list[Outcome]:
    """`invoke report`: publish `run`, or the latest complete run of each named experiment
    (interrupted or crashed runs are kept for inspection; publish them by naming them)."""
    paths = paths or Paths()
    if run is not None:
        return [publish(run, paths)]
    complete = [
        [r for r in paths.runs(n) if RunDir(r).status() == "complete"]
        for n in names_of(name, paths)
    ]
    return [publish(runs[-1], paths) for runs in complete if runs]
