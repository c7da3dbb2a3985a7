"""The invoke front door: parse arguments, call into gaia, print. Nothing else lives here."""

from __future__ import annotations

import subprocess
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


@task(
    help={
        "k": "only tests matching this pytest -k expression (in the Soft-RoCE lane too)",
        "fast": "skip slow tests, and the Soft-RoCE lane",
        "rdma": "run the Soft-RoCE lane after pytest (the default; --no-rdma leaves it out)",
    }
)
def test(c: Context, k: str = "", fast: bool = False, rdma: bool = True) -> None:
    """Everything CI runs: lint, pytest (exit code 5, no tests, is a failure), then the
    Soft-RoCE lane (invoke test-rdma: minutes; --no-rdma or --fast leave it out)."""
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
    if not rdma or fast:
        print(
            f"gaia test: the Soft-RoCE lane was left out ({'--fast' if fast else '--no-rdma'});"
            " CI runs it (invoke test-rdma runs it alone)",
            file=sys.stderr,
        )
        lane_code = 0
    else:
        lane_code = _lane(k, need_tests=False)
    if code != 0 or lane_code != 0:
        print(
            f"gaia test: FAILED: pytest {'passed' if code == 0 else f'exit status {code}'},"
            f" Soft-RoCE lane {'passed' if lane_code == 0 else f'exit status {lane_code}'}",
            file=sys.stderr,
        )
        sys.exit(code or lane_code)


@task(
    help={
        "k": "only rdma tests also matching this pytest -k expression",
        "out": "directory for the console log and the tests' files"
        " (default: ~/.cache/gaia/softroce/last-run)",
    }
)
def test_rdma(c: Context, k: str = "", out: str = "") -> None:
    """The Soft-RoCE lane alone: rdma transport and APUS-over-rdma tests on rxe0 in a QEMU
    guest (the last part of invoke test); installs what it needs (softroce role)."""
    code = _lane(k, Path(out) if out else None)
    if code != 0:
        sys.exit(code)


def _lane(k: str, out: Path | None = None, need_tests: bool = True) -> int:
    """Run the Soft-RoCE lane and say how it went; its exit status (0: passed). Anything that
    keeps it from running here is a failure that names the reason, never a skip. A -k that
    selects no rdma test fails too, unless `need_tests` is False (invoke test -k, where the
    host's tests are what was asked for): then the lane says so and is not booted."""
    from gaia.softroce.image import ImageError
    from gaia.softroce.lane import NO_TESTS, run_lane, selects_any

    started = time.monotonic()
    if k and not selects_any(provision.ROOT, k):
        print(f"gaia test-rdma: no rdma test matches -k {k!r}: the lane has nothing to run")
        return NO_TESTS if need_tests else 0
    try:
        provision.ensure(["softroce", "rdma"])
        image, outcome = run_lane(provision.ROOT, k=k, out=out)
    except provision.ProvisionError as error:
        print(f"gaia test-rdma: FAILED: cannot install what the lane needs: {error}")
        return 1
    except ImageError as error:
        print(f"gaia test-rdma: FAILED: could not build the guest image: {error}")
        return 1
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"gaia test-rdma: FAILED: the lane could not run: {error}")
        return 1
    except KeyboardInterrupt:
        return 130
    verdict = "passed" if outcome.passed else f"FAILED: {outcome.why}"
    print(
        f"gaia test-rdma: {verdict}\n"
        f"  image {'built' if image.built else 'cached'} in {image.seconds:.1f} s, guest run"
        f" {outcome.seconds:.1f} s, total {time.monotonic() - started:.1f} s"
        " (with any package installation)\n"
        f"  console log: {outcome.log}; the tests' files (replica logs): {outcome.out}/pytest"
    )
    return 0 if outcome.passed else outcome.status or 1


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
