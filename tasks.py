"""The invoke front door: parse arguments, call into gaia, print. Nothing else lives here."""

from __future__ import annotations

import sys

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task


@task
def lint(c: Context) -> None:
    """Static checks: ruff (style, bugs) and mypy (types)."""
    c.run("ruff check .", pty=False)
    c.run("mypy", pty=False)


@task(help={"k": "only tests matching this pytest -k expression", "fast": "skip slow tests"})
def test(c: Context, k: str = "", fast: bool = False) -> None:
    """The test suite, as CI runs it: lint, then pytest (exit code 5, no tests, is a failure)."""
    lint(c)
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


ns = Collection(lint, test)
