"""The invoke front door: parse arguments, call into gaia, print. Nothing else lives here."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task

from gaia import provision

if TYPE_CHECKING:  # the experiment tasks import gaia's plotting stack only when they run
    from rich.console import Console

    from gaia.experiments.reproduce import Outcome


@task
def lint(c: Context) -> None:
    """Static checks: ruff (style, bugs) and mypy (types)."""
    c.run("ruff check .", pty=False)
    c.run("mypy", pty=False)


@task(help={"k": "only tests matching this pytest -k expression", "fast": "skip slow tests"})
def test(c: Context, k: str = "", fast: bool = False) -> None:
    """The test suite, as CI runs it: lint, then pytest (exit code 5, no tests, is a failure)."""
    lint(c)
    provision.ensure(provision.TEST_ROLES)
    args = ["python", "-m", "pytest", "-q"]
    if k:
        args += ["-k", repr(k)]
    if fast:
        args += ["-m", "'not slow'"]
    result = c.run(" ".join(args), warn=True, pty=False)
    code = result.exited if result is not None else 1
    if code == 5:
        print("pytest collected no tests: that is a failure here", file=sys.stderr)
    if code != 0:
        sys.exit(code)


@task(
    help={
        "k": "only rdma tests also matching this pytest -k expression",
        "out": "directory for the console log and the tests' files"
        " (default: ~/.cache/gaia/softroce/last-run)",
    }
)
def test_rdma(c: Context, k: str = "", out: str = "") -> None:
    """The Soft-RoCE lane: rdma transport and APUS-over-rdma tests on rxe0 in a QEMU guest.

    Takes minutes and is not part of `invoke test`; installs what it needs (softroce role)."""
    from gaia.softroce.image import ImageError
    from gaia.softroce.lane import run_lane

    provision.ensure(["softroce", "rdma"])
    started = time.monotonic()
    try:
        image, outcome = run_lane(provision.ROOT, k=k, out=Path(out) if out else None)
    except ImageError as error:
        sys.exit(f"gaia test-rdma: could not build the guest image: {error}")
    except KeyboardInterrupt:
        sys.exit(130)
    verdict = "passed" if outcome.passed else f"FAILED: {outcome.why}"
    print(
        f"gaia test-rdma: {verdict}\n"
        f"  image {'built' if image.built else 'cached'} in {image.seconds:.1f} s, guest run"
        f" {outcome.seconds:.1f} s, total {time.monotonic() - started:.1f} s\n"
        f"  console log: {outcome.log}; the tests' files (replica logs): {outcome.out}/pytest"
    )
    if not outcome.passed:
        sys.exit(outcome.status or 1)


@task(
    help={
        "only": f"comma-separated roles among {', '.join(provision.ROLES)} (default: all but"
        " mongodb, which Debian lacks; all of them with --inventory or --force)",
        "inventory": "an Ansible inventory, e.g. playbooks/inventory/cloudlab.yml (default: here)",
        "force": "run the playbook even for roles that look installed",
    }
)
def setup(c: Context, only: str = "", inventory: str = "", force: bool = False) -> None:
    """Install what GAIA needs, with playbooks/provision.yml through ansible-runner.

    Locally it runs only the roles that are missing (a no-op when all are there), unless --force.
    """
    roles = [role.strip() for role in only.split(",") if role.strip()]
    try:
        outcome = provision.setup(roles, Path(inventory) if inventory else None, force)
    except provision.ProvisionError as error:
        sys.exit(f"gaia setup failed: {error}")
    if outcome is None:
        print("gaia setup: everything is already installed (--force runs the playbook anyway)")
    else:
        print(
            f"gaia setup: {', '.join(outcome.roles)} provisioned in {outcome.seconds:.1f} s"
            f" ({outcome.changed} changes)"
        )


@task(
    help={
        "exp": "experiment name (a file in experiments/), or 'all'",
        "quick": "the definition's reduced sweep (a few minutes on a 2-core laptop)",
        "target": "where to run (local)",
        "trials": "repetitions per point (default: the definition's)",
        "systems": "comma-separated curves or systems to run (default: all of the definition's)",
    }
)
def reproduce(
    c: Context,
    exp: str,
    *,
    quick: bool = False,
    target: str = "local",
    trials: int = 0,
    systems: str = "",
) -> None:
    """Run an experiment, draw its figure, update paper_figures/REPORT.md, print the results."""
    from rich.console import Console

    from gaia.experiments.errors import ExperimentError, RunInterrupted
    from gaia.experiments.reproduce import reproduce as run_experiments

    console = Console()
    try:
        outcomes = run_experiments(
            exp,
            quick=quick,
            trials=trials or None,
            target=target,
            systems=[s.strip() for s in systems.split(",") if s.strip()],
            console=console,
        )
    except ExperimentError as error:
        console.print(f"[bold red]gaia reproduce:[/] {error}", highlight=False)
        sys.exit(130 if isinstance(error, RunInterrupted) else 2)
    _print_outcomes(console, outcomes)


@task(
    help={
        "exp": "experiment name, or 'all' (default)",
        "run": "a run directory to report instead of each experiment's latest complete run",
    }
)
def report(c: Context, exp: str = "all", run: str = "") -> None:
    """Redraw figures and REPORT.md sections from results/ (each experiment's latest run)."""
    from rich.console import Console

    from gaia.experiments.reproduce import republish

    console = Console()
    outcomes = republish(exp, Path(run) if run else None)
    if not outcomes:
        sys.exit(f"gaia report: no complete runs of {exp!r} under results/")
    _print_outcomes(console, outcomes)


def _print_outcomes(console: Console, outcomes: list[Outcome]) -> None:
    from gaia.report import summary_table

    for outcome in outcomes:
        console.print(summary_table(outcome.run_dir))
        console.print(f"results: {outcome.run_dir}")
        console.print(f"figure:  {', '.join(str(p) for p in outcome.figures)}")
        console.print(f"report:  {outcome.report}")


@task(
    name="up",
    help={
        "replicas": "how many replicas (1-9)",
        "transport": "shm (default) or tcp",
        "durability": "memory (default), fsync, group-commit or no-fsync",
        "isolation": "auto (default: a network namespace per replica when root), netns or none",
        "app": "redis or memcached: every replica runs one, clients use the leader's",
    },
)
def cluster_up(  # noqa: PLR0917 (invoke maps each parameter to a flag)
    c: Context,
    replicas: int = 3,
    transport: str = "shm",
    durability: str = "memory",
    isolation: str = "auto",
    app: str = "",
) -> None:
    """Start a local APUS cluster that keeps running until cluster.down."""
    from gaia.cluster import local

    try:
        state = local.up(replicas, transport, durability, isolation=isolation, app=app)
    except local.ClusterError as error:
        sys.exit(f"gaia cluster.up: {error}")
    isolated = state["isolation"]
    print(f"{state['system']} with {replicas} replicas is up")
    print(f"  isolation: {isolated['mode']} ({isolated['reason']})")
    for rid, (host, port) in state["clients"].items():
        print(f"  replica {rid}: clients at {host}:{port}")
    if app:
        leader = local.status()["leader_app_address"]
        if leader is not None:
            host, port = leader
            hint = f"redis-cli -h {host} -p {port}" if app == "redis" else f"{host}:{port}"
            print(f"  {app} (the leader's, the only one taking clients): {hint}")
    print(f"logs: {state['logs']}; invoke cluster.status --json shows the leader")


@task(name="status", help={"json": "print the whole state as JSON"})
def cluster_status(c: Context, json: bool = False) -> None:
    """Who leads, and each replica's role, view, commit index and timings."""
    import json as json_module

    from gaia.cluster import local

    try:
        state = local.status()
    except local.ClusterError as error:
        sys.exit(f"gaia cluster.status: {error}")
    if json:
        print(json_module.dumps(state, indent=2))
        return
    print(f"{state['system']}: leader {state['leader']} at {state['leader_address']}")
    print(f"  isolation: {state['isolation']['mode']} ({state['isolation']['reason']})")
    if state.get("app"):
        print(f"  {state['app']} clients go to {state['leader_app_address']}")
    for rid, r in sorted(state["replicas"].items()):
        if "down" in r:
            print(f"  replica {rid}: down ({r['down']})")
        else:
            print(f"  replica {rid}: {r['role']}, view {r['view']}, commit {r['commit']}")


@task(name="down")
def cluster_down(c: Context) -> None:
    """Stop the local cluster and remove its namespaces and shared memory."""
    from gaia.cluster import local

    print("stopped" if local.down() else "no cluster was up")


cluster = Collection("cluster", cluster_up, cluster_status, cluster_down)
ns = Collection(lint, test, test_rdma, setup, reproduce, report, cluster)
