"""The one place the runner finds systems: name -> factory `(replicas, log_dir, **params)`.

Systems live in the packages that implement them (gaia.baselines, gaia.apus.systems, and the
reference system here); each such package exposes a module-level dict `SYSTEMS`. This module only
combines those dicts, so adding a system never touches the runner. A provider package that is not
there yet is skipped; one that fails to import is reported in the "unknown system" error, so a
broken package only stops the experiments that need it, and says why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gaia.experiments.errors import DefinitionError, ExperimentError
from gaia.systems import ReplicatedSystem

SystemFactory = Callable[..., ReplicatedSystem]
"""`factory(replicas: int, log_dir: Path, **params) -> ReplicatedSystem`; may raise
SystemUnavailable when the system cannot run on this target."""

PROVIDERS: tuple[str, ...] = (
    "gaia.experiments.reference",
    "gaia.baselines",
    "gaia.apus.systems",
    "gaia.apps.systems",
)
ATTRIBUTE = "SYSTEMS"


@dataclass(frozen=True)
class Registry:
    """Every factory found, and for each provider that contributed nothing, why."""

    factories: Mapping[str, SystemFactory]
    unavailable: Mapping[str, str]

    def describe_available(self) -> str:
        names = ", ".join(sorted(self.factories)) or "none"
        skipped = "".join(f"; {module}: {why}" for module, why in self.unavailable.items())
        return f"available: {names}{skipped}"


@functools.cache
def registry() -> Registry:
    """Import every provider once and merge their `SYSTEMS` dicts."""
    factories: dict[str, SystemFactory] = {}
    owners: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    for module_name in PROVIDERS:
        try:
            present = importlib.util.find_spec(module_name) is not None
            module = importlib.import_module(module_name) if present else None
        except Exception as exc:  # a broken provider must not hide the others
            unavailable[module_name] = f"failed to import ({type(exc).__name__}: {exc})"
            continue
        provided: Mapping[str, SystemFactory] = getattr(module, ATTRIBUTE, {})
        if not provided:
            unavailable[module_name] = "not present" if module is None else f"no {ATTRIBUTE} yet"
        for name, factory in provided.items():
            if name in factories:
                raise ExperimentError(
                    f"system {name!r} is registered by both {owners[name]} and {module_name}"
                )
            factories[name], owners[name] = factory, module_name
    return Registry(MappingProxyType(factories), MappingProxyType(unavailable))


def system_factory(name: str) -> SystemFactory:
    """The factory registered as `name`; an unknown name says what is available and what not."""
    found = registry()
    if name not in found.factories:
        raise DefinitionError(f"unknown system {name!r}; {found.describe_available()}")
    return found.factories[name]
