"""What a run was measured on, for env.json: code version, machine, software versions, target.

Numbers from a different commit, kernel or package version are different numbers; recording
them is what lets a later reader compare two runs (or a run with the paper) honestly. Every
probe degrades to None rather than failing a run: a missing `git` must not cost a measurement.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gaia.results import ROOT, utc_now


def describe(
    *,
    target: str,
    parameters: Mapping[str, Any],
    debian_packages: Iterable[str],
    results_dir: Path,
) -> dict[str, Any]:
    """The env.json of a run on this machine."""
    return {
        "created_utc": utc_now().isoformat(timespec="seconds"),
        "target": target,
        "parameters": dict(parameters),
        "argv": sys.argv,
        "git": git_state(ROOT),
        "host": {
            "hostname": socket.gethostname(),
            "os": _os_release(),
            "kernel": platform.release(),
            "machine": platform.machine(),
            "cpu_model": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_bytes": _memory_bytes(),
            "results_filesystem": filesystem_of(results_dir),
        },
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "python_packages": python_packages(),
        "debian_packages": debian_versions(sorted(set(debian_packages))),
    }


GENERATED: tuple[str, ...] = ("paper_figures",)
"""What runs write into the tree themselves: not a difference in the code that measured."""


def git_state(root: Path) -> dict[str, Any]:
    """Commit and whether the work tree differs from it (results of a dirty tree say so); the
    figures and report earlier runs regenerated do not count."""
    commit = _run(["git", "-C", str(root), "rev-parse", "HEAD"])
    excluded = [f":(exclude){path}" for path in GENERATED]
    status = _run(["git", "-C", str(root), "status", "--porcelain", "--", ".", *excluded])
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def python_packages() -> dict[str, str | None]:
    """Versions of gaia and of every Python package it declares (installed or not)."""
    names = ["gaia"] + [
        match.group(0)
        for requirement in importlib.metadata.requires("gaia") or []
        if (match := re.match(r"[A-Za-z0-9._-]+", requirement))
    ]
    return {name: _python_version(name) for name in dict.fromkeys(names)}


def debian_versions(packages: list[str]) -> dict[str, str | None]:
    """dpkg's version of each package, None where it is not installed."""
    versions: dict[str, str | None] = dict.fromkeys(packages)
    if packages:
        listing = _run(
            ["dpkg-query", "-W", "-f=${Package}\t${Version}\t${db:Status-Status}\n", *packages]
        )
        for line in (listing or "").splitlines():
            name, version, state = line.split("\t")
            if name in versions and state == "installed":
                versions[name] = version
    return versions


def filesystem_of(path: Path) -> str | None:
    """The file system type holding `path` (fsync on tmpfs costs nothing: worth knowing)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    resolved = str(path.resolve())
    points = [m for m in mounts if resolved == m[1] or resolved.startswith(m[1].rstrip("/") + "/")]
    return max(points, key=lambda m: len(m[1]))[2] if points else None


def _run(argv: list[str]) -> str | None:
    """A command's stdout, stripped, or None if it is missing or fails (dpkg-query exits 1
    when one of several packages is unknown, yet lists the others: keep its output)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 or done.stdout else None


def _python_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _os_release() -> str | None:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return match.group(1).strip() if match else None


def _memory_bytes() -> int | None:
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s*(\d+) kB$", meminfo, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None
