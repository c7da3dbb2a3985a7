"""Where everything an experiment reads or writes lives: the one module that knows paths.

A run is a self-describing directory `results/<experiment>/<UTC stamp>_<short id>/`:

    experiment.yaml   the resolved definition (what was actually swept)
    env.json          machine, versions, git commit, target (gaia.environment)
    results.csv       one row per trial, appended and synced as each trial ends
    status            running | complete | interrupted (a crash leaves `running`)
    logs/<group>/     each system's log_dir: its processes' commands, outputs, exit codes
    samples/<trial>.csv.gz   every measured request: connection, start_ns, end_ns

Plots and reports read only these files (RunDir's readers), never the live runner.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import os
import secrets
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd
import yaml

from gaia.experiments.definition import Experiment, load_file, to_raw
from gaia.workload import InputBreakdown, Metrics, Recording

ROOT = Path(__file__).resolve().parent.parent

Status = Literal["ok", "failed", "not-run-here"]
RunStatus = Literal["running", "complete", "interrupted"]


@dataclass(frozen=True)
class Paths:
    """The project's directories; tests point `root` at a temporary directory."""

    root: Path = ROOT

    @property
    def experiments(self) -> Path:
        return self.root / "experiments"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def figures(self) -> Path:
        return self.root / "paper_figures"

    @property
    def report(self) -> Path:
        return self.figures / "REPORT.md"

    def figure(self, experiment: str, suffix: str) -> Path:
        return self.figures / f"{experiment}.{suffix}"

    def runs(self, experiment: str) -> list[Path]:
        """Run directories of `experiment`, oldest first (their names start with a UTC stamp)."""
        directory = self.results / experiment
        return sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []


@dataclass(frozen=True)
class TrialRow:
    """One line of results.csv: a trial's identity, outcome, and what it measured (empty unless
    ok): the load's metrics, the relay's achieved round trip and the leader's breakdown, each
    flattened into its own columns (`flat()`)."""

    trial_id: str
    series: str
    system: str
    label: str
    durability: str
    replicas: int
    connections: int
    trial: int
    status: Status
    reason: str = ""
    isolation: str = ""  # the system's describe()["isolation"]["mode"]: netns, none ("": n/a)
    client_rtt_us: int = 0
    metrics: Metrics | None = None
    relay_rtt_us: float | None = None
    breakdown: InputBreakdown | None = None
    log_dir: str = ""
    finished_utc: str = ""

    def flat(self) -> dict[str, Any]:
        """Column -> value, as results.csv holds it (None: an empty cell)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _NESTED:
                out.update(
                    dataclasses.asdict(value)
                    if value is not None
                    else dict.fromkeys(_names(_NESTED[f.name]))
                )
            else:
                out[f.name] = value
        return out


_NESTED: Mapping[str, type[Any]] = {"metrics": Metrics, "breakdown": InputBreakdown}


def _names(kind: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(kind)]


COLUMNS: tuple[str, ...] = tuple(
    name
    for f in dataclasses.fields(TrialRow)
    for name in (_names(_NESTED[f.name]) if f.name in _NESTED else [f.name])
)
DEFAULTS: Mapping[str, Any] = {
    f.name: f.default for f in dataclasses.fields(TrialRow) if f.default not in (None, "")
}
"""What a column holds in runs written before it existed (their results.csv lacks it)."""
TEXT_COLUMNS: tuple[str, ...] = tuple(
    name
    for name, kind in typing.get_type_hints(TrialRow).items()
    if kind is str or typing.get_origin(kind) is Literal
)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RunDir:
    """One run directory, for the runner to write and for plots and reports to read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, paths: Paths, experiment: str) -> RunDir:
        stamp = utc_now().strftime("%Y%m%dT%H%M%SZ")
        path = paths.results / experiment / f"{stamp}_{secrets.token_hex(3)}"
        (path / "logs").mkdir(parents=True)
        run = cls(path)
        run.set_status("running")
        return run

    @property
    def experiment_yaml(self) -> Path:
        return self.path / "experiment.yaml"

    @property
    def env_json(self) -> Path:
        return self.path / "env.json"

    @property
    def results_csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def status_file(self) -> Path:
        return self.path / "status"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.path))

    def log_dir(self, name: str) -> Path:
        """A fresh directory under logs/, handed to a system as its log_dir."""
        path = self.path / "logs" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_definition(self, experiment: Experiment) -> None:
        self.experiment_yaml.write_text(yaml.safe_dump(to_raw(experiment), sort_keys=False))

    def write_env(self, env: Mapping[str, Any]) -> None:
        write_json(self.env_json, env)

    def write_samples(self, trial_id: str, recording: Recording) -> Path:
        path = self.path / "samples" / f"{trial_id}.csv.gz"
        path.parent.mkdir(exist_ok=True)
        table = np.column_stack([recording.connection, recording.start_ns, recording.end_ns])
        np.savetxt(
            path, table, fmt="%d", delimiter=",", header="connection,start_ns,end_ns", comments=""
        )
        return path

    def set_status(self, status: RunStatus) -> None:
        self.status_file.write_text(status + "\n")

    @contextmanager
    def rows(self) -> Iterator[RowWriter]:
        """Write results.csv (header first); each row is on disk when `append` returns."""
        with self.results_csv.open("x", newline="") as stream:
            writer = RowWriter(stream)
            writer.header()
            yield writer

    # Readers: what plots and reports use.

    def definition(self) -> Experiment:
        return load_file(self.experiment_yaml)

    def env(self) -> dict[str, Any]:
        env: dict[str, Any] = json.loads(self.env_json.read_text())
        return env

    def status(self) -> str:
        return self.status_file.read_text().strip() if self.status_file.exists() else "unknown"

    def results(self) -> pd.DataFrame:
        """results.csv as a frame with every column, even when no trial finished (and in the
        current order, with defaults for the columns of newer versions in older runs)."""
        if not self.results_csv.exists():
            return pd.DataFrame(columns=list(COLUMNS))
        rows = pd.read_csv(
            self.results_csv,
            dtype=dict.fromkeys(TEXT_COLUMNS, str),
            keep_default_na=False,  # an empty reason is "", an empty metric NaN
            na_values={c: [""] for c in COLUMNS if c not in TEXT_COLUMNS},
        )
        for column, default in DEFAULTS.items():
            if column not in rows:
                rows[column] = default
        return rows.reindex(columns=list(COLUMNS))


class RowWriter:
    """Writes TrialRows as CSV, flushing and fsyncing each one: a crash keeps earlier rows."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._writer = csv.DictWriter(stream, fieldnames=COLUMNS)

    def header(self) -> None:
        self._writer.writeheader()
        self._sync()

    def append(self, row: TrialRow) -> None:
        self._writer.writerow({k: "" if v is None else v for k, v in row.flat().items()})
        self._sync()

    def _sync(self) -> None:
        self._stream.flush()
        os.fsync(self._stream.fileno())


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")
