"""Build the interposition shim from its C source, once per source version (gaia.native)."""

from __future__ import annotations

from pathlib import Path

from gaia.native import WARNINGS, build, cache_dir

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "shim.c", HERE / "shim_layout.h")
FLAGS = (*WARNINGS, "-fPIC", "-shared", "-pthread")


def shim_library(cache: Path | None = None) -> Path:
    """The path of the built shim, compiling it first if this version is not built yet."""
    cache = cache or cache_dir("shim")
    return build("libgaiashim", SOURCES, FLAGS, ("-ldl",), cache=cache, suffix=".so")
