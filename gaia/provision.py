"""Provisioning: GAIA's own Ansible playbooks (playbooks/provision.yml) run with ansible-runner.

The same playbooks provision this machine (connection=local) and a testbed, so every local run
exercises what the testbed will get. `ensure()` is what makes the project self-installing: the
test task and every experiment call it first, and it must cost almost nothing when everything is
already there, so it checks for the commands each role provides (file lookups, no Ansible) and
runs the playbook only for the roles that are missing. ansible-runner and rich are imported only
when a playbook actually runs, to keep that check cheap.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = ROOT / "playbooks"
PLAYBOOK = PLAYBOOKS / "provision.yml"
LOCAL_INVENTORY = PLAYBOOKS / "inventory" / "local.yml"
RUNNER_DIR = PLAYBOOKS / ".runner"  # ansible-runner's private data dir (artifacts); gitignored

# What proves each role of provision.yml is installed, in the playbook's order. A name with a
# slash is a path that must exist; any other name is a command that must be on PATH.
_PROOF: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "common": ("gcc", "make", "ip", "iptables", "killall", "pkill"),
        "redis": ("redis-server", "redis-benchmark", "redis-cli"),
        "memcached": ("memcached", "memcaslap"),
        "zookeeper": ("/usr/share/zookeeper/bin/zkServer.sh", "java"),
        "etcd": ("etcd", "etcdctl"),
        "rdma": ("ibv_devices", "/usr/lib/python3/dist-packages/pyverbs"),
        "mongodb": ("mongod",),
        "softroce": (
            "mmdebstrap",
            "qemu-system-x86_64",
            "mkfs.ext4",
            "mkinitramfs",
            "/usr/share/doc/linux-image-amd64",
        ),
        "profiling": ("perf",),
    }
)
ROLES: tuple[str, ...] = tuple(_PROOF)
# MongoDB is not packaged by Debian: only a testbed image can provide it, so a local setup
# without --only does not ask for it (the role would just explain that, and it stays missing).
# softroce (QEMU and a guest kernel, hundreds of MB) is installed only when its lane runs, and
# profiling (perf) only when benchmarks/profile_app.py runs.
LOCAL_ROLES: tuple[str, ...] = tuple(
    role for role in ROLES if role not in {"mongodb", "softroce", "profiling"}
)
# What the test suite's integration tests start: `invoke test` ensures these first.
# rdma gives the tests pyverbs (no device: they check that the rdma transport says so).
TEST_ROLES: tuple[str, ...] = ("common", "redis", "memcached", "zookeeper", "etcd", "rdma")

# Where to look for commands besides PATH: sbin directories are missing from some users' PATH,
# and a role counts as installed whoever asks.
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ProvisionError(RuntimeError):
    """A role could not be provisioned; the message names the failing task and says why."""


@dataclass(frozen=True)
class Outcome:
    """One playbook run: the roles it covered, how many tasks changed something, how long."""

    roles: tuple[str, ...]
    changed: int
    seconds: float


def required_commands() -> Mapping[str, tuple[str, ...]]:
    """Each role and the commands (or paths) whose presence proves it is installed."""
    return _PROOF


def _checked(roles: Iterable[str]) -> tuple[str, ...]:
    """The roles as a tuple, refusing unknown names before anything runs (a typo in --only
    would otherwise make Ansible silently run nothing)."""
    roles = tuple(roles)
    unknown = [role for role in roles if role not in _PROOF]
    if unknown:
        raise ProvisionError(f"unknown role(s) {', '.join(unknown)}; known: {', '.join(ROLES)}")
    return roles


def _absent(role: str) -> list[str]:
    """The proofs of `role` that are not on this machine."""
    search = os.pathsep.join([os.environ.get("PATH", ""), _SYSTEM_PATH])
    return [
        proof
        for proof in _PROOF[role]
        if not (Path(proof).exists() if "/" in proof else shutil.which(proof, path=search))
    ]


def missing(roles: Iterable[str]) -> list[str]:
    """The roles among `roles` that are not (completely) installed on this machine."""
    return [role for role in _checked(roles) if _absent(role)]


def provision(
    roles: Iterable[str], inventory: Path = LOCAL_INVENTORY, quiet: bool = False
) -> Outcome:
    """Run provision.yml for `roles` (as tags) on the hosts of `inventory`.

    Prints one line per finished task unless `quiet`. Raises ProvisionError with the failing
    task's message, and KeyboardInterrupt when the run was interrupted (ansible-runner turns
    Ctrl-C into a cancelled run; callers should stop as they would on Ctrl-C).
    """
    import ansible_runner

    roles = _checked(roles)
    RUNNER_DIR.mkdir(parents=True, exist_ok=True)
    progress = _Progress(quiet)
    start = time.monotonic()
    with _venv_scripts_on_path(), progress.running(f"provisioning {', '.join(roles)}"):
        result = ansible_runner.run(
            private_data_dir=str(RUNNER_DIR),
            playbook=str(PLAYBOOK),
            inventory=str(Path(inventory).resolve()),
            tags=",".join(roles),
            quiet=True,  # our own per-task lines replace Ansible's verbose output
            event_handler=progress.on_event,
            rotate_artifacts=10,
        )
    if result.status == "canceled":
        raise KeyboardInterrupt
    if result.status != "successful":
        log = Path(result.config.artifact_dir) / "stdout"
        reason = progress.failure or f"ansible-playbook ended {result.status} (rc {result.rc})"
        raise ProvisionError(f"{reason}\nfull log: {log}")
    changed = sum((result.stats or {}).get("changed", {}).values())
    return Outcome(roles, changed, time.monotonic() - start)


def ensure(roles: Iterable[str], quiet: bool = False) -> Outcome | None:
    """Provision on this machine only the roles among `roles` that are missing.

    Returns None, having run nothing, when all are present (the usual case: a few file
    lookups). Raises ProvisionError if a role is still missing after its playbook run.
    """
    todo = missing(roles)
    if not todo:
        link_system_pyverbs()
        return None
    outcome = provision(todo, quiet=quiet)
    still = {role: _absent(role) for role in missing(todo)}
    if still:
        lacking = "; ".join(f"{role}: {', '.join(proofs)}" for role, proofs in still.items())
        raise ProvisionError(f"still missing after provisioning: {lacking}")
    link_system_pyverbs()
    return outcome


SYSTEM_PYVERBS = Path("/usr/lib/python3/dist-packages/pyverbs")
_PYVERBS_DIR = "gaia-system-pyverbs"


def link_system_pyverbs(site: Path | None = None, system: Path = SYSTEM_PYVERBS) -> Path | None:
    """Make Debian's pyverbs (python3-pyverbs, from the rdma role) importable in this venv.

    PyPI's pyverbs does not build against Debian's libibverbs, so the rdma transport uses
    Debian's build: `site`/gaia-system-pyverbs.pth adds a directory that holds only a link to
    it (adding all of dist-packages would shadow missing venv dependencies with Debian's
    copies). Done only when this interpreter can load its extension modules (same CPython
    ABI) and, by default, only inside a venv. Idempotent and cheap: `ensure` runs it every
    time. Returns the .pth file when the link is in place, else None.
    """
    if site is None:
        if sys.prefix == sys.base_prefix:
            return None  # the system interpreter sees dist-packages already
        site = Path(sysconfig.get_path("purelib"))
    suffix = str(sysconfig.get_config_var("EXT_SUFFIX"))
    try:
        loadable = any(path.name.endswith(suffix) for path in system.iterdir())
    except OSError:
        return None
    if not loadable:
        return None
    link = site / _PYVERBS_DIR / "pyverbs"
    if not link.is_symlink() or link.readlink() != system:
        link.parent.mkdir(exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(system, target_is_directory=True)
    pth = site / f"{_PYVERBS_DIR}.pth"
    if not pth.exists():
        pth.write_text(f"{_PYVERBS_DIR}\n")
    return pth


def setup(
    roles: Sequence[str] = (), inventory: Path | None = None, force: bool = False
) -> Outcome | None:
    """`invoke setup`: with no inventory and no force, ensure this machine has `roles` (default
    LOCAL_ROLES); otherwise run the playbook for `roles` (default all) unconditionally, since
    whether a remote host lacks something cannot be told from here."""
    if inventory is None and not force:
        return ensure(roles or LOCAL_ROLES)
    return provision(roles or ROLES, inventory or LOCAL_INVENTORY)


@contextmanager
def _venv_scripts_on_path() -> Iterator[None]:
    """Put this interpreter's scripts directory (the venv's bin, where ansible-playbook lives)
    first on PATH while a playbook runs: ansible-runner looks ansible-playbook up on PATH, and
    `./invoke` starts the venv's interpreter without activating the venv."""
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), before or os.defpath])
    try:
        yield
    finally:
        if before is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = before


def _failure_text(res: Mapping[str, Any]) -> str:
    """The useful part of a failed task's result: its message, and the tail of its stderr
    (where commands say why); for a loop or a multi-module task (fact gathering), that of the
    first failed part, since the task's own message then only says that something failed."""
    parts_failed = [
        part
        for part in [*res.get("results", []), *res.get("failed_modules", {}).values()]
        if part.get("failed")
    ]
    if parts_failed:
        return _failure_text(parts_failed[0])
    parts = [str(res.get("msg") or "failed")]
    stderr = str(res.get("stderr") or res.get("module_stderr") or "").strip()
    if stderr:
        parts.append("\n".join(stderr.splitlines()[-5:]))
    return "\n".join(parts)


class _Progress:
    """Turns ansible-runner's events into one line per task that ran (skipped ones are noise),
    with a spinner naming the running one on a terminal, and keeps the first failure's message
    for the error."""

    _SHOWN = MappingProxyType(
        {
            "runner_on_ok": "ok",
            "runner_on_failed": "FAILED",
            "runner_on_unreachable": "UNREACHABLE",
        }
    )

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.failure: str | None = None
        self._console: Console | None = None
        self._status: Status | None = None

    @contextmanager
    def running(self, what: str) -> Iterator[None]:
        """Say what runs, then show a spinner until it ends (nothing at all when quiet)."""
        if self.quiet:
            yield
            return
        from rich.console import Console

        self._console = Console(stderr=True, highlight=False)
        self._console.print(f"gaia: {what} with {PLAYBOOK.relative_to(ROOT)}", soft_wrap=True)
        with self._console.status(what) as self._status:
            yield

    def on_event(self, event: Mapping[str, Any]) -> bool:
        """ansible-runner's event_handler: returning True keeps the event in the artifacts."""
        data: Mapping[str, Any] = event.get("event_data", {})
        kind = event.get("event", "")
        if kind in {"runner_on_failed", "runner_on_unreachable"} and not data.get("ignore_errors"):
            self.failure = self.failure or (
                f"{data.get('host')}: task '{data.get('task')}' failed: "
                f"{_failure_text(data.get('res', {}))}"
            )
        self._show(kind, data)
        return True

    def _show(self, kind: str, data: Mapping[str, Any]) -> None:
        """Print the line for a finished task, or name a starting one on the spinner."""
        if self._console is None or self._status is None:
            return
        task = data.get("task", "")
        if kind == "playbook_on_task_start":
            self._status.update(f"{task} ...")
            return
        if kind not in self._SHOWN:
            return
        res: Mapping[str, Any] = data.get("res", {})
        word = "changed" if kind == "runner_on_ok" and res.get("changed") else self._SHOWN[kind]
        colour = {"ok": "green", "changed": "yellow"}.get(word, "bold red")
        host = data.get("host", "")
        where = "" if host == "localhost" else f"{host}: "
        took = f" {data['duration']:.1f}s" if data.get("duration") else ""
        self._console.print(f"  [{colour}]{word:>8}[/] {where}{task}[dim]{took}[/]", soft_wrap=True)
        if data.get("resolved_action") == "ansible.builtin.debug" and res.get("msg"):
            self._console.print(f"           {res['msg']}", markup=False, soft_wrap=True)
        if word in {"FAILED", "UNREACHABLE"}:
            self._console.print(f"           {_failure_text(res)}", markup=False, soft_wrap=True)

