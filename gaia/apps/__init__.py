"""The unmodified servers APUS replicates: how to start each one and how to tell it is up.

An app is a frozen description (`App`): the command line for one instance listening on a host
and port, with its data in a directory. The replica daemon starts its own instance with the
interposition shim preloaded; the experiments start the same command line unreplicated as the
baseline, so both run the very same server.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from gaia.systems import SystemUnavailable


class AppError(RuntimeError):
    """An app server is unknown, missing, or did not come up; the message says which and why."""


@dataclass(frozen=True)
class App:
    name: str
    binary: str  # the package's executable: checked before anything starts
    argv: Callable[[str, int, Path], list[str]]
    threads: int  # worker threads it runs with (memcached: several; the shim copes)
    where: str = ""  # where the binary comes from, for the message when it is missing
    # what its own persistence amounts to with this command line, in the experiments' words
    # (gaia.experiments.definition.Durability): Redis and memcached keep nothing on disk;
    # mongod journals every 100 ms and answers w:1 writes before that
    durability: str = "memory"


def _redis(host: str, port: int, workdir: Path) -> list[str]:
    # no persistence of its own (APUS' log and the guard's checkpoints are the durability);
    # DEBUG DIGEST lets tests and the output checker compare replicas' whole datasets
    return [
        "redis-server", "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
        "--daemonize", "no", "--protected-mode", "no", "--enable-debug-command", "yes",
        "--dir", str(workdir), "--logfile", "",
    ]  # fmt: skip


def _memcached(host: str, port: int, workdir: Path) -> list[str]:
    return [
        "memcached", "-p", str(port), "-l", host, "-U", "0", "-m", "256", "-t", "2", "-u", "root",
    ]  # fmt: skip


def _mongod(host: str, port: int, workdir: Path) -> list[str]:
    # its data directory must exist; no Unix socket (several instances share /tmp)
    return [
        "mongod", "--port", str(port), "--bind_ip", host, "--dbpath", str(workdir),
        "--nounixsocket", "--quiet",
    ]  # fmt: skip


MONGODB_MISSING = (
    "MongoDB is not packaged by Debian 12 (its licence) and nothing can be downloaded on this "
    "target: it runs only on a testbed whose image ships mongod (playbooks/roles/mongodb, "
    "gaia_install_mongodb: true in that inventory)"
)

APPS: Mapping[str, App] = MappingProxyType(
    {
        "redis": App(
            "redis", "redis-server", _redis, threads=1, where="the redis role (./invoke setup)"
        ),
        "memcached": App(
            "memcached", "memcached", _memcached, threads=2, where="the memcached role"
        ),
        "mongodb": App(
            "mongodb", "mongod", _mongod, threads=4, where=MONGODB_MISSING, durability="no-fsync"
        ),
    }
)


def get_app(name: str) -> App:
    try:
        return APPS[name]
    except KeyError:
        raise AppError(f"unknown app {name!r}: choose one of {', '.join(APPS)}") from None


def require_app(name: str) -> App:
    """The app `name`, or SystemUnavailable saying why its server cannot run on this target."""
    app = get_app(name)
    if shutil.which(app.binary) is None:
        raise SystemUnavailable(f"{name}: {app.binary} is not installed here: {app.where}")
    return app


def listening(port: int) -> bool:
    """Whether a TCP socket of this network namespace listens on `port` (read from /proc, so
    that checking does not open a connection the server would have to accept)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_listening(port: int, timeout: float, alive: Callable[[], bool]) -> None:
    """Return once a server listens on `port`; raise AppError after `timeout` or as soon as
    `alive()` says the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise AppError(f"the server for port {port} exited while starting")
        if listening(port):
            return
        time.sleep(0.02)
    raise AppError(f"nothing listens on port {port} after {timeout:.0f} s")
