"""Run tests inside the Soft-RoCE guest: copy the tree in, boot QEMU (TCG), report the result.

Each run copies the current tree (gaia/, tests/, pyproject.toml; no caches) into a small ext4
"tree image" with a `.lane/run.sh` that runs the chosen tests, attaches it as the guest's second
disk, and boots the cached guest image (see `image`) with its root disk in snapshot mode, so a
run never changes the cache and two runs can share it. The guest's init hands run.sh's exit
status to QEMU's isa-debug-exit device, which makes QEMU exit with 2 * status + 1: an even exit
status means the guest never got that far (it crashed, or QEMU failed). QEMU also exits with 1
(what a status of 0 gives) when it fails on its own, e.g. on a missing disk image, so a pass
also needs run.sh's last word on the console (`REPORT` and the same status).

What a run leaves in its output directory: console.log (the guest console, echoed from the
start of the tests on as it comes) and pytest/, the tests' temporary directories (pytest's
basetemp lives on the tree image and is copied out with debugfs), where each APUS replica's
command, output and exit status are: what explains a failure that happened in the guest.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gaia.softroce.image import Image, current_recipe, default_cache, ensure_image

TREE = ("gaia", "tests", "pyproject.toml")
"""What of the repository the guest gets: the package, its tests and their configuration."""

GUEST_TESTS: tuple[str, ...] = ("tests/transport", "tests/apus/test_rdma_cluster.py", "-k", "rdma")
"""The rdma transport's tests (unit, against rxe0, and the behaviour all transports share) and
3-replica APUS clusters over rdma; in the guest only the "no device" check skips."""

GUEST_BASETEMP = ".lane/pytest"
"""pytest's basetemp in the guest, relative to the tree (so it survives the guest)."""

SETUP_FAILED = 125
"""run.sh's status when the guest could not bring rxe0 up (see image.INIT_SCRIPT)."""

NO_TESTS = 5
"""pytest's exit status when it selected no tests: a failure here, as in invoke test."""

LANE_ENV = "GAIA_LANE"
LANE_VALUE = "softroce-tcg"
"""run.sh sets LANE_ENV=LANE_VALUE for the guest's tests: they run under emulation (slower
timing, longer bounds) and must find an RDMA device (a missing one is an error there, not a
reason to skip)."""



def in_lane() -> bool:
    """True in the lane's guest (run.sh sets LANE_ENV there), for the tests' slower pace."""
    return os.environ.get(LANE_ENV) == LANE_VALUE


_MARKER = "gaia-lane: rxe0 is up"
REPORT = "gaia-lane: the tests exited with status "
"""What run.sh prints last, followed by the tests' exit status."""


@dataclass(frozen=True)
class GuestSpec:
    """How big a guest to boot. TCG emulates each vCPU on a host thread (thread=multi)."""

    cpus: int = 2
    memory_mb: int = 1536
    timeout: float = 1200.0
    """seconds before the guest is killed (emulation is slow: the whole lane takes minutes)"""


@dataclass(frozen=True)
class Outcome:
    """One lane run: the guest's status (None: no status came back) and where its output is."""

    status: int | None
    qemu_exit: int | None
    """None: killed after the timeout"""
    seconds: float
    out: Path
    why: str
    """empty when the tests passed; otherwise what went wrong, for the user"""

    @property
    def passed(self) -> bool:
        return self.status == 0

    @property
    def log(self) -> Path:
        return self.out / "console.log"


def selection(k: str = "") -> tuple[str, ...]:
    """GUEST_TESTS, narrowed by a pytest -k expression."""
    if not k:
        return GUEST_TESTS
    *paths, _, default = GUEST_TESTS
    return (*paths, "-k", f"{default} and ({k})")


def run_lane(
    source: Path, *, k: str = "", out: Path | None = None, say: Callable[[str], None] = print
) -> tuple[Image, Outcome]:
    """The whole lane: the guest image (cached, or built now), then one run of the selected
    tests on a copy of `source`, its output in `out` (default: last-run/ in the cache)."""
    image = ensure_image(current_recipe(), say=say)
    say(
        f"guest image {image.directory} ({'built' if image.built else 'cached'},"
        f" {image.seconds:.1f} s); booting QEMU (TCG) ..."
    )
    out = out or default_cache() / "last-run"
    return image, run(image, source, out, tests=selection(k), echo=say)


def selects_any(source: Path, k: str) -> bool:
    """Whether `selection(k)` picks any test, asked of pytest on this host (collection only: a
    few seconds, against minutes for a guest that would find nothing to run). The rdma tests
    are collected here too; they only skip when run."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *selection(k)],
        cwd=source, capture_output=True, check=False,
    )  # fmt: skip
    return done.returncode != NO_TESTS


def guest_command(tests: Sequence[str]) -> list[str]:
    """The pytest command line run in the guest (Debian's python3 with its pyverbs)."""
    return [
        "python3", "-m", "pytest", "-p", "no:cacheprovider", "--color=no", "-q", "-rfEs",
        "--durations=5", f"--basetemp={GUEST_BASETEMP}", *tests,
    ]  # fmt: skip


def qemu_command(image: Image, tree_image: Path, spec: GuestSpec) -> list[str]:
    """Boot `image` with `tree_image` as /dev/vdb; no network device (the tests use loopback
    and rxe0 over a dummy device), exit status through isa-debug-exit."""
    return [
        "qemu-system-x86_64",
        "-accel", "tcg,thread=multi",
        "-smp", str(spec.cpus),
        "-m", str(spec.memory_mb),
        "-display", "none",
        "-monitor", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-nic", "none",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-drive", f"file={image.root},format=raw,if=virtio,snapshot=on",
        "-drive", f"file={tree_image},format=raw,if=virtio",
        "-append", "console=ttyS0 root=/dev/vda rw init=/gaia-init panic=-1 quiet",
    ]  # fmt: skip


def reported_status(console: Sequence[str]) -> int | None:
    """The status run.sh reported on the guest console (its last `REPORT` line), if any."""
    for line in reversed(console):
        if line.startswith(REPORT) and line[len(REPORT) :].strip().isdigit():
            return int(line[len(REPORT) :])
    return None


def decode_exit(qemu_exit: int, reported: int | None) -> tuple[int | None, str]:
    """(guest status, explanation) from QEMU's exit status and the status run.sh reported
    on the console (None: no report)."""
    if qemu_exit % 2 == 1:
        status = qemu_exit // 2
        if status == SETUP_FAILED:
            return status, "the guest could not bring rxe0 up (see the log)"
        if reported is None:
            return None, (
                f"QEMU exited with status {qemu_exit} but the tests never reported theirs"
                " (QEMU's own error? see the log)"
            )
        if reported != status:
            return None, f"QEMU exited with status {qemu_exit}, the tests reported {reported}"
        if status == 0:
            return 0, ""
        if status == NO_TESTS:
            return status, "pytest in the guest collected no tests (exit status 5)"
        return status, f"the tests failed in the guest (pytest exit status {status})"
    if qemu_exit == 0:
        return None, "the guest stopped without reporting a status (crash? see the log)"
    return None, f"QEMU failed (exit status {qemu_exit}; see the log)"


def make_tree_image(source: Path, command: Sequence[str], dest: Path) -> None:
    """Copy the tree and a run.sh running `command` into a fresh ext4 image at `dest`."""
    with tempfile.TemporaryDirectory(prefix="gaia-tree.") as tmp:
        tree = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
        for name in TREE:
            path = source / name
            if path.is_dir():
                shutil.copytree(path, tree / name, ignore=ignore)
            else:
                shutil.copy2(path, tree / name)
        (tree / ".lane").mkdir()
        (tree / ".lane" / "run.sh").write_text(
            "# Written by gaia/softroce/lane.py for one run of the Soft-RoCE lane.\n"
            f"export {LANE_ENV}={LANE_VALUE}\n"
            f"{shlex.join(command)}\n"
            "status=$?\n"
            f'echo "{REPORT}$status"\n'
            "exit $status\n"
        )
        size_mb = 256 + 2 * sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) // 2**20
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "gaia-tree", "-d", str(tree), str(dest),
             f"{size_mb}M"],
            check=True, capture_output=True,
        )  # fmt: skip


def run(
    image: Image,
    source: Path,
    out: Path,
    *,
    tests: Sequence[str] = GUEST_TESTS,
    spec: GuestSpec = GuestSpec(),
    echo: Callable[[str], None] = print,
) -> Outcome:
    """Boot the guest on a copy of `source` and run `tests` there; the output directory `out`
    is emptied first, and the console's lines from the test run on are passed to `echo` as
    they arrive."""
    start = time.monotonic()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gaia-lane.") as tmp:
        tree_image = Path(tmp) / "tree.img"
        make_tree_image(source, guest_command(tests), tree_image)
        try:
            qemu_exit = _boot(qemu_command(image, tree_image, spec), out, spec.timeout, echo)
        finally:
            subprocess.run(
                ["debugfs", "-R", f"rdump /{GUEST_BASETEMP} {out}", str(tree_image)],
                check=False, capture_output=True,
            )  # fmt: skip
    if qemu_exit is None:
        status, why = None, f"the guest did not finish within {spec.timeout:.0f} s (killed)"
    else:
        console = (out / "console.log").read_text(errors="replace").splitlines()
        status, why = decode_exit(qemu_exit, reported_status(console))
    return Outcome(status, qemu_exit, time.monotonic() - start, out, why)


def _boot(
    command: list[str], out: Path, timeout: float, echo: Callable[[str], None]
) -> int | None:
    """Run QEMU with its console teed to out/console.log; its exit status, None if it had to
    be killed after `timeout` seconds. Ctrl-C kills it too: no emulator is left behind."""
    with open(out / "console.log", "w") as console:
        qemu = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        reader = threading.Thread(target=_tee, args=(qemu, console, echo), daemon=True)
        reader.start()
        try:
            return qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
            reader.join(5)


def _tee(qemu: subprocess.Popen[bytes], console: TextIO, echo: Callable[[str], None]) -> None:
    """Copy the guest console to the log, and to `echo` once the tests start."""
    assert qemu.stdout is not None
    started = False
    for raw in qemu.stdout:
        line = raw.decode(errors="replace").rstrip("\r\n")
        console.write(line + "\n")
        console.flush()
        started = started or line.startswith(_MARKER)
        if started:
            echo(line)
