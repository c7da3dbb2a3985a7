"""The Soft-RoCE guest: a minimal Debian root, the host's 6.1 kernel and a small initrd.

Built only from Debian packages (mmdebstrap for the root, the host's linux-image-amd64 for the
kernel and its modules), once per recipe: the image lives in ~/.cache/gaia/softroce/KEY/, where
KEY hashes everything the build depends on (packages, mirror, kernel binary, modules, the init
script, this module's build steps), so a change to any of them builds a new image and an
unchanged recipe reuses the old one. Outside the repository: it is 200+ MB and machine-specific.

The guest's PID 1 is `INIT_SCRIPT`: it brings up rxe0 on a dummy network device, mounts the
tree image that `lane` makes for each run on /gaia, runs /gaia/.lane/run.sh and hands that
script's exit status to QEMU through the isa-debug-exit port, so QEMU's own exit status says
whether the tests passed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

RECIPE_VERSION = 1
"""Bump when the build steps below change in a way the recipe's fields do not show."""

GUEST_SUITE = "bookworm"
GUEST_PACKAGES = (
    "python3-pyverbs",
    "ibverbs-providers",
    "ibverbs-utils",
    "iproute2",
    "kmod",
    "python3-pytest",
    "python3-pytest-timeout",
)
"""The guest's packages beyond minbase: verbs and pyverbs, `ip` and `rdma`, modprobe, pytest."""

GUEST_MODULES = ("dummy", "crc32_generic", "ib_uverbs", "rdma_rxe")
"""Loaded by the guest's init, in this order (rdma_rxe needs crc32_generic's crc32 first)."""

INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
"""All the initrd needs to mount a virtio disk as root."""

ROOT_SIZE = "400M"
KEEP_IMAGES = 2
"""Images kept in the cache (the newest ones); older recipes' images are removed."""

DEFAULT_MIRROR = "http://deb.debian.org/debian"

INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of GAIA's Soft-RoCE test guest (written by gaia/softroce/image.py). Brings up rxe0, runs
# /gaia/.lane/run.sh from the tree image on /dev/vdb and hands its exit status to QEMU through
# the isa-debug-exit port (QEMU then exits with 2 * status + 1).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
finish() {
    sync
    printf "\\$(printf %03o "$1")" | dd of=/dev/port bs=1 seek=244 count=1 conv=notrunc
    echo "gaia-lane: could not write the exit port"
    exit 1
}
step() {
    "$@" || { echo "gaia-lane: guest setup failed: $*"; finish 125; }
}
[ -e /proc/self ] || step mount -t proc proc /proc
[ -e /sys/class ] || step mount -t sysfs sys /sys
step mkdir -p /dev/shm /gaia
step mount -t tmpfs -o mode=1777 shm /dev/shm
step mount -t tmpfs -o mode=1777 tmp /tmp
step ip link set lo up
step modprobe dummy numdummies=0
step modprobe crc32_generic
step modprobe ib_uverbs
step modprobe rdma_rxe
step ip link add dummy0 type dummy
step ip addr add 10.99.0.1/24 dev dummy0
step ip link set dummy0 up
step rdma link add rxe0 type rxe netdev dummy0
step mount /dev/vdb /gaia
echo "gaia-lane: rxe0 is up; running /gaia/.lane/run.sh"
cd /gaia
sh .lane/run.sh
finish $?
"""


class ImageError(RuntimeError):
    """The guest image could not be built; the message names the failing step and says why."""


@dataclass(frozen=True)
class Recipe:
    """Everything the guest image depends on; its hash names the image in the cache."""

    kernel: str
    """the kernel version, e.g. 6.1.0-56-amd64 (its vmlinuz and modules come from this host)"""
    kernel_digest: str
    """sha256 of that vmlinuz: a rebuilt kernel with the same version gets a new image"""
    mirror: str
    suite: str = GUEST_SUITE
    packages: tuple[str, ...] = GUEST_PACKAGES
    modules: tuple[str, ...] = GUEST_MODULES
    initrd_modules: tuple[str, ...] = INITRD_MODULES
    root_size: str = ROOT_SIZE
    init: str = INIT_SCRIPT
    version: int = RECIPE_VERSION

    @property
    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    """A built guest: boot `kernel` with `initrd`, root on `root` (read-only to runs)."""

    directory: Path
    built: bool
    """True if this call built it, False if it came from the cache"""
    seconds: float

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def root(self) -> Path:
        return self.directory / "root.img"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gaia" / "softroce"


def find_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> str:
    """The newest installed kernel that ships rdma_rxe and has a vmlinuz (the running kernel
    does not matter: it only has to boot in QEMU)."""
    found = sorted(
        (path.name for path in modules.glob("*") if (path / _RXE).exists()),
        key=_version_key,
    )
    found = [version for version in found if (boot / f"vmlinuz-{version}").exists()]
    if not found:
        raise ImageError(
            f"no kernel with {_RXE} and a vmlinuz under {modules} and {boot}: "
            "install linux-image-amd64 (invoke setup --only softroce)"
        )
    return found[-1]


_RXE = "kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko"


def _version_key(version: str) -> list[int]:
    return [int(part) for part in re.findall(r"\d+", version)]


def host_mirror(suite: str = GUEST_SUITE, apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this host's apt uses for `suite` (one-line or deb822 sources), so the
    guest is fetched from wherever this host is allowed to fetch packages."""
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    name, colon, value = line.partition(":")
                    if colon and not name.lstrip().startswith("#"):
                        fields[name.strip()] = value.split()
                if suite in fields.get("Suites", []) and fields.get("URIs"):
                    return fields["URIs"][0]
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "deb" and suite in words[2:]:
                    return next(w for w in words[1:] if not w.startswith("["))
    return DEFAULT_MIRROR


def current_recipe() -> Recipe:
    """The recipe for this host as it is now."""
    kernel = find_kernel()
    digest = hashlib.sha256(Path(f"/boot/vmlinuz-{kernel}").read_bytes()).hexdigest()
    return Recipe(kernel=kernel, kernel_digest=digest, mirror=host_mirror())


def ensure_image(
    recipe: Recipe, cache: Path | None = None, say: Callable[[str], None] = print
) -> Image:
    """The image for `recipe`, from the cache or built now (under a lock, so two lanes started
    together build it once)."""
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    directory = cache / recipe.key
    start = time.monotonic()
    with open(cache / f"{recipe.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (directory / "recipe.json").exists():
            os.utime(directory)  # most recently used: kept by the pruning below
            return Image(directory, built=False, seconds=time.monotonic() - start)
        say(f"building the Soft-RoCE guest image {recipe.key} (kernel {recipe.kernel}) ...")
        work = Path(tempfile.mkdtemp(prefix=f"{recipe.key}.", dir=cache))
        try:
            _build(recipe, work, say)
            work.rename(directory)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _prune(cache, keep=KEEP_IMAGES)
    return Image(directory, built=True, seconds=time.monotonic() - start)


def _prune(cache: Path, keep: int) -> None:
    images = sorted(
        (path for path in cache.iterdir() if (path / "recipe.json").exists()),
        key=lambda path: path.stat().st_mtime,
    )
    for old in images[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        (cache / f"{old.name}.lock").unlink(missing_ok=True)


def _run(what: str, argv: list[str], say: Callable[[str], None]) -> str:
    """Run one build step; raise ImageError quoting its output's tail if it fails."""
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ImageError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{tail}")
    say(f"  {what}: {time.monotonic() - start:.1f} s")
    stdout: str = done.stdout
    return stdout


def _build(recipe: Recipe, work: Path, say: Callable[[str], None]) -> None:
    root = work / "root"
    _run(
        "mmdebstrap (Debian guest root)",
        [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(recipe.packages)}",
            *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale")),
            recipe.suite,
            str(root),
            recipe.mirror,
        ],
        say,
    )
    _install_modules(recipe, root, say)
    init = root / "gaia-init"
    init.write_text(recipe.init)
    init.chmod(0o755)
    (root / "gaia").mkdir()
    _run(
        "mkfs.ext4 (root image)",
        ["mkfs.ext4", "-q", "-F", "-L", "gaia-root", "-d", str(root), str(work / "root.img"),
         recipe.root_size],
        say,
    )
    shutil.rmtree(root)
    shutil.copyfile(f"/boot/vmlinuz-{recipe.kernel}", work / "vmlinuz")
    _make_initrd(recipe, work, say)
    (work / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2) + "\n")


def _install_modules(recipe: Recipe, root: Path, say: Callable[[str], None]) -> None:
    """Copy in only the modules the guest loads (and what they depend on), then index them:
    the whole module tree would triple the image."""
    source = Path("/lib/modules") / recipe.kernel
    target = root / "lib/modules" / recipe.kernel
    files = set()
    for module in recipe.modules:
        listing = _run(
            f"modprobe --show-depends {module}",
            ["modprobe", "-S", recipe.kernel, "--show-depends", module],
            say,
        )
        files.update(_module_files(listing.splitlines()))
    for path in sorted(files):
        dest = target / Path(path).relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    for index in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (source / index).exists():
            shutil.copy2(source / index, target / index)
    _run("depmod", ["depmod", "-b", str(root), recipe.kernel], say)


def _module_files(lines: Iterable[str]) -> list[str]:
    """The .ko files in `modprobe --show-depends` output ("insmod PATH [params]"; built-in
    modules show as "builtin NAME" and need no file)."""
    return [line.split()[1] for line in lines if line.startswith("insmod ")]


def _make_initrd(recipe: Recipe, work: Path, say: Callable[[str], None]) -> None:
    """A small initrd with only what mounting a virtio root needs (MODULES=list): Debian's
    default one carries every storage driver and is 30 MB."""
    conf = work / "initramfs"
    (conf / "conf.d").mkdir(parents=True)
    (conf / "initramfs.conf").write_text("MODULES=list\nBUSYBOX=auto\nCOMPRESS=zstd\n")
    (conf / "modules").write_text("".join(f"{m}\n" for m in recipe.initrd_modules))
    _run(
        "mkinitramfs (small initrd)",
        ["mkinitramfs", "-d", str(conf), "-o", str(work / "initrd.img"), recipe.kernel],
        say,
    )
    shutil.rmtree(conf)
