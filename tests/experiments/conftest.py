"""Fixtures for the experiment machinery: a throwaway project root with small definitions.

Everything here runs the real runner against real systems: `local-fsync` (the reference system
in gaia.experiments.reference, fsync and memory-only) and the registry's `dare`, which cannot
run on this machine and says so. Nothing is mocked.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gaia.results import Paths

TINY: dict[str, Any] = {
    "name": "tiny",
    "title": "Tiny latency sweep",
    "source": "tests",
    "replicas": [1],
    "trials": 3,
    "workload": {"payload_bytes": 64, "requests_per_trial": 120, "warmup_requests": 12},
    "timeouts": {"trial_s": 60},
    "client_modes": [{"connections": 1}, {"connections": 3}],
    "systems": [
        {"system": "local-fsync", "durability": "fsync", "params": {"durability": "fsync"}},
        {
            "system": "local-fsync",
            "series": "local-memory",
            "durability": "memory",
            "params": {"durability": "memory"},
        },
        {"system": "dare", "durability": "memory", "packages": ["dpkg", "no-such-package-gaia"]},
    ],
    "quick": {"trials": 2, "workload": {"requests_per_trial": 30}},
    "paper": {
        "source": "made up for tests",
        "connections": 1,
        "series": [
            {
                "name": "Floor",
                "durability": "fsync",
                "latency_us": {1: 300.0},
                "compare_with": "local-fsync",
            },
            {
                "name": "DARE",
                "durability": "memory",
                "latency_us": {1: 24.8},
                "compare_with": "dare",
            },
        ],
    },
    "claims": [
        {
            "claim": "fsync costs at least 10x memory",
            "paper": 10,
            "test": "at_least",
            "ratios": ["local-fsync@1 / local-memory@1"],
        },
        {"claim": "DARE vs memory", "paper": 30, "ratios": ["dare@1 / local-memory@1"]},
    ],
}


def tiny(**changes: Any) -> dict[str, Any]:
    """A deep copy of TINY with top-level fields replaced."""
    definition = copy.deepcopy(TINY)
    definition.update(changes)
    return definition


def write_definition(paths: Paths, definition: dict[str, Any]) -> Path:
    paths.experiments.mkdir(parents=True, exist_ok=True)
    path = paths.experiments / f"{definition['name']}.yaml"
    path.write_text(yaml.safe_dump(definition, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Paths:
    """A project root with `tiny.yaml` in its experiments/ directory."""
    paths = Paths(tmp_path)
    write_definition(paths, TINY)
    return paths
