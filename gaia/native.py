"""The project's C helpers (the interposition shim, the delaying relay), compiled on first use.

Nothing binary is committed: each helper is compiled with the machine's gcc (installed by the
`common` provisioning role) into ~/.cache/gaia/<kind>/, named by a hash of its sources and
flags, so an edited helper is rebuilt and a stale one is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

WARNINGS = ("-O2", "-g", "-Wall", "-Wextra", "-Werror")


class NativeBuildError(RuntimeError):
    """A helper could not be compiled; the message carries the compiler's words."""


def cache_dir(kind: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gaia" / kind


def build(
    name: str,
    sources: tuple[Path, ...],
    flags: tuple[str, ...],
    libs: tuple[str, ...] = (),
    *,
    cache: Path,
    suffix: str = "",
) -> Path:
    """The path of `name` built from `sources` (the first one is compiled, the others are what
    it includes), compiling it first if this version is not built yet."""
    h = hashlib.sha256(" ".join(flags + libs).encode())
    for source in sources:
        h.update(source.read_bytes())
    out = cache / f"{name}-{h.hexdigest()[:16]}{suffix}"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise NativeBuildError("gcc is not installed: run ./invoke setup (role common)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    argv = [gcc, *flags, "-o", tmp, str(sources[0]), *libs]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise NativeBuildError(f"{' '.join(argv)} failed:\n{done.stderr.strip()}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)  # atomic: a concurrent build of the same version is harmless
    return out
