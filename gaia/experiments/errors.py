"""What can stop an experiment, as exception types the front door turns into one clear message.

Everything that can be known before a run starts (a bad definition, an unknown system, a missing
package) is raised before any process is launched, so a typo never costs a half-finished sweep.
"""

from __future__ import annotations

from pathlib import Path


class ExperimentError(Exception):
    """Base class: the message alone tells the user what is wrong and what is available."""


class DefinitionError(ExperimentError):
    """An experiment definition cannot be run: unknown name, malformed field, unknown system."""


class MissingDependency(ExperimentError):
    """A package a system needs is not installed on this target and could not be provisioned."""


class RunInterrupted(ExperimentError):
    """Ctrl-C or SIGTERM stopped the run after its systems were stopped; rows so far are kept."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"interrupted: systems stopped, partial results kept in {run_dir}")
        self.run_dir = run_dir
