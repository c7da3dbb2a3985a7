"""Build the interposition shim from its C source, once per source version.

The shared object is never committed: it is compiled here with the machine's gcc (installed by
the `common` provisioning role) into ~/.cache/gaia/shim/, named by a hash of the sources and
flags, so an edited shim is rebuilt and a stale one is never loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "shim.c", HERE / "shim_layout.h")
FLAGS = ("-O2", "-g", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-pthread")
LIBS = ("-ldl",)


class ShimBuildError(RuntimeError):
    """The shim could not be compiled; the message carries the compiler's words."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gaia" / "shim"


def _key() -> str:
    h = hashlib.sha256(" ".join(FLAGS + LIBS).encode())
    for source in SOURCES:
        h.update(source.read_bytes())
    return h.hexdigest()[:16]


def shim_library(cache: Path | None = None) -> Path:
    """The path of the built shim, compiling it first if this version is not built yet."""
    out = (cache or cache_dir()) / f"libgaiashim-{_key()}.so"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ShimBuildError("gcc is not installed: run ./invoke setup (role common)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    argv = [gcc, *FLAGS, "-o", tmp, str(HERE / "shim.c"), *LIBS]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise ShimBuildError(f"{' '.join(argv)} failed:\n{done.stderr.strip()}")
    os.replace(tmp, out)  # atomic: a concurrent build of the same version is harmless
    return out
