"""Local child processes that never outlive the run: launch with logs, wait until ready, reap.

Every server the project starts on this host (ZooKeeper, etcd, later the APUS replicas) goes
through `ProcessGroup`, so they all share one set of guarantees:

- each process runs in its own session (`start_new_session`), so signalling its process group
  also reaches whatever it forks (a JVM or a shell wrapper may) and a Ctrl-C on the terminal
  reaches only us, leaving the orderly shutdown to `stop()`;
- `log_dir` gets, per process, the exact command (`NAME.command`, runnable in a shell), its
  stdout and stderr (`NAME.stdout`, `NAME.stderr`) and its exit status (`NAME.exit`; negative:
  killed by that signal), as the results layout asks;
- `stop()` signals every group first and only then waits, so N servers take as long to stop as
  the slowest one rather than the sum; it escalates to SIGKILL after a bound and returns only
  when no live process is left in any group; it is idempotent and safe after a failed start;
- readiness polling fails fast when a process exits and, on timeout, quotes the tail of the
  logs of the processes that are not ready, so a failed start explains itself.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import random
import shlex
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Ports handed out recently by this Python process: two ensembles started back to back (or in
# parallel threads) must not pick the same port before either server has bound it. Bounded, so a
# long sweep can reuse ports of ensembles that are long gone.
_RECENT_PORTS: collections.deque[int] = collections.deque(maxlen=4096)
_PORTS_LOCK = threading.Lock()
_LOWEST_PORT = 10000

_LIVE_GROUPS: weakref.WeakSet[ProcessGroup] = weakref.WeakSet()


class ProcessGroupError(RuntimeError):
    """A process exited during start-up, the group was not ready in time, or would not stop."""


@dataclass(frozen=True)
class ProcessSpec:
    """What to run, as plain data, so command builders stay pure functions.

    `env` is added to the inherited environment; `name` is unique within a group and names the
    process's files in the log directory.
    """

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None

    def shell_line(self) -> str:
        """The command as one line a person can paste into a shell to rerun it by hand."""
        parts = [f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items())]
        parts += [shlex.quote(arg) for arg in self.argv]
        line = " ".join(parts)
        return f"cd {shlex.quote(str(self.cwd))} && {line}" if self.cwd else line


@dataclass
class ManagedProcess:
    """One launched process (the leader of its own process group) and where its logs are."""

    spec: ProcessSpec
    popen: subprocess.Popen[bytes]
    log_dir: Path
    # Set once the leader is reaped and its group is empty: from then on its PID may belong to
    # an unrelated process, so it must never be signalled again.
    reaped: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        """Also the process group id, since every process starts its own session."""
        return self.popen.pid

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / f"{self.name}.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / f"{self.name}.stderr"

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal every process in the group; a group that is already gone is not an error."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of stdout and stderr, labelled, for error messages."""
        sections = []
        for path in (self.stdout_path, self.stderr_path):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            tail = text.splitlines()[-lines:]
            if tail:
                sections.append(f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(sections) if sections else f"--- {self.name}: no output ---"


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the processes in group `pgid` that are still alive (zombies do not count).

    A group leader that has exited can leave children behind in its group; this is how `stop()`
    and the tests make sure none is left. Reads /proc, so it is Linux only, like the project.
    """
    return [pid for pid, pgrp in _live_processes() if pgrp == pgid]


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None if there is no such process.

    Field N of proc(5) is element N - 3: state, ppid, pgrp, ..., start time (field 22) at 19.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # exited while we looked
        return None
    # The command name (field 2) is parenthesised and may itself contain ")" or spaces.
    return stat.rsplit(")", 1)[1].split()


def _live_processes() -> list[tuple[int, int]]:
    """(pid, process group) of every live process, from one pass over /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is not None and fields[0] not in ("Z", "X"):
            found.append((int(entry.name), int(fields[2])))
    return found


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as another process (or a later run) can recognise it: its PID and its start
    time since boot, so a PID the kernel has since handed to someone else never matches."""

    pid: int
    start: int  # clock ticks after boot, /proc/PID/stat field 22

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of live process `pid`, or None if it is gone (or a zombie)."""
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return None
        return cls(pid, int(fields[19]))

    def alive(self) -> bool:
        return ProcessIdentity.of(self.pid) == self

    def kill_group(self) -> bool:
        """SIGKILL this process's group if this very process still leads it; True if it did.

        For cleaning up after a crashed supervisor, whose children outlive it (each leads its
        own session, see ProcessGroup): the group id is the leader's PID, checked first."""
        fields = _stat_fields(self.pid)
        if not self.alive() or fields is None or int(fields[2]) != self.pid:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        return True


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free on 127.0.0.1 right now.

    Chosen below the kernel's ephemeral range: a port the kernel hands out with bind(0) can be
    given again as the source port of some outgoing connection (the servers connect to each
    other while they start) before the server meant to listen on it has bound it. Between this
    check and the server's bind another program can still take a port; the server then fails to
    start with a clear "address in use" in its log.
    """
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    low = int(ephemeral[0])
    rng = random.Random()
    chosen: list[int] = []
    with _PORTS_LOCK:
        for _ in range(100 * count):
            if len(chosen) == count:
                break
            port = rng.randrange(_LOWEST_PORT, low)
            if port in chosen or port in _RECENT_PORTS or not _can_bind(port):
                continue
            chosen.append(port)
        if len(chosen) < count:
            raise ProcessGroupError(f"found only {len(chosen)} of {count} free ports below {low}")
        _RECENT_PORTS.extend(chosen)
    return chosen


def _can_bind(port: int) -> bool:
    # No SO_REUSEADDR: a port with connections still in TIME_WAIT is skipped, to be safe.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ProcessGroup:
    """The processes of one run (e.g. one ensemble), logged under `log_dir`, reaped by `stop()`.

    Usable as a context manager. As a last resort, groups still running when the interpreter
    exits normally are stopped by an atexit hook.
    """

    def __init__(self, log_dir: Path, *, term_grace: float = 10.0, kill_grace: float = 5.0):
        self.log_dir = log_dir
        self.term_grace = term_grace
        self.kill_grace = kill_grace
        self.processes: list[ManagedProcess] = []
        self._lock = threading.Lock()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def launch(self, spec: ProcessSpec) -> ManagedProcess:
        """Start `spec` in a new session with its output in the log directory."""
        if any(p.name == spec.name for p in self.processes):
            raise ValueError(f"a process named {spec.name!r} is already in this group")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / f"{spec.name}.command").write_text(spec.shell_line() + "\n")
        with (
            open(self.log_dir / f"{spec.name}.stdout", "wb") as out,
            open(self.log_dir / f"{spec.name}.stderr", "wb") as err,
        ):
            popen = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=spec.cwd,
                env={**os.environ, **spec.env},
                start_new_session=True,
            )
        process = ManagedProcess(spec, popen, self.log_dir)
        with self._lock:
            self.processes.append(process)
            _LIVE_GROUPS.add(self)
        return process

    def wait_ready(
        self,
        pending: Callable[[], Collection[ManagedProcess]],
        *,
        timeout: float,
        what: str,
        interval: float = 0.1,
    ) -> None:
        """Poll until `pending()` (the processes not ready yet) is empty.

        Raises ProcessGroupError at once if a process of the group exits meanwhile, and after
        `timeout` seconds otherwise, quoting the logs of the culprits in both cases.
        """
        deadline = time.monotonic() + timeout
        while True:
            exited = [p for p in self.processes if not p.reaped and not p.running()]
            if exited:
                details = "\n".join(
                    f"{p.name} exited with status {p.popen.returncode}\n{p.log_tail()}"
                    for p in exited
                )
                raise ProcessGroupError(f"{what}: a process exited during start-up\n{details}")
            laggards = pending()
            if not laggards:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(p.name for p in laggards)
                tails = "\n".join(p.log_tail() for p in laggards)
                raise ProcessGroupError(
                    f"{what}: not ready after {timeout:.1f} s (waiting for {names})\n{tails}"
                )
            time.sleep(interval)

    def stop(
        self,
        processes: Iterable[ManagedProcess] | None = None,
        *,
        first_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        """Stop `processes` (default: all) and reap them; none of their groups stays alive.

        Every group gets `first_signal` before any is waited for; groups still alive after
        `term_grace` seconds get SIGKILL. Each reaped process's status goes to NAME.exit.
        Idempotent: already reaped processes are skipped.
        """
        with self._lock:
            chosen = self.processes if processes is None else processes
            targets = [p for p in chosen if not p.reaped]
            for process in targets:
                process.signal_group(first_signal)
            survivors = self._wait_gone(targets, self.term_grace)
            if survivors and first_signal != signal.SIGKILL:
                for process in survivors:
                    process.signal_group(signal.SIGKILL)
                survivors = self._wait_gone(survivors, self.kill_grace)
            for process in targets:
                if process not in survivors:
                    process.reaped = True
                    (self.log_dir / f"{process.name}.exit").write_text(
                        f"{process.popen.returncode}\n"
                    )
            if all(p.reaped for p in self.processes):
                _LIVE_GROUPS.discard(self)
            if survivors:
                raise ProcessGroupError(
                    "could not stop process groups "
                    + ", ".join(f"{p.name} (pgid {p.pid})" for p in survivors)
                )

    @staticmethod
    def _wait_gone(processes: list[ManagedProcess], grace: float) -> list[ManagedProcess]:
        """Reap the leaders and wait for their groups to empty; return those still alive."""
        deadline = time.monotonic() + grace
        remaining = list(processes)
        while remaining:
            leaders_gone = [p for p in remaining if not p.running()]
            live_groups = {pgrp for _pid, pgrp in _live_processes()} if leaders_gone else set()
            remaining = [p for p in remaining if p.running() or p.pid in live_groups]
            if not remaining or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        return remaining


@atexit.register
def _stop_leftover_groups() -> None:
    for group in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessGroupError):
            group.stop()
