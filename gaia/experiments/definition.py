"""Experiment definitions: `experiments/<name>.yaml` loaded into frozen dataclasses, and expanded.

An experiment is a typed value (frankenpaxos style): the dataclasses below *are* the schema. One
generic converter walks their type hints, so a field added to a dataclass is a field the YAML may
set, and every error names the file and the field (`systems[2].durability`). Cross-field rules
(unique curves, claims that name existing curves) are checked after conversion. A definition's
`quick:` block is merged over the full one; both are validated on every load, so a mistake in
the quick profile is found before a full run, not after.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gaia.experiments.errors import DefinitionError

Durability = Literal["fsync", "group-commit", "no-fsync", "memory"]
"""When a system answers a client relative to its disk: part of every curve's identity.

The same words as the systems' `describe()["durability"]`: `fsync` syncs every entry on its
own before replying; `group-commit` syncs before replying but lets concurrent entries share one
fsync; `no-fsync` writes a log file it never syncs (survives a process crash, not a machine
crash); `memory` keeps the log in memory only.
"""

DURABILITY_LABELS: Mapping[str, str] = types.MappingProxyType(
    {
        "fsync": "fsync every entry",
        "group-commit": "fsync before reply, group commit",
        "no-fsync": "no fsync",
        "memory": "memory only",
    }
)
SURVIVES_MACHINE_CRASH: frozenset[str] = frozenset({"fsync", "group-commit"})
"""Policies under which an acknowledged entry is on disk; curves of one class are like for like."""

Profile = Literal["full", "quick"]
Isolation = Literal["auto", "netns", "none"]
"""Where each replica of a local system runs (gaia.cluster.ensemble): `netns`, a network
namespace of its own, reached through a bridge; `none`, plain processes on 127.0.0.1; `auto`,
`netns` where the runner may make namespaces (root), else `none`. One value for every system of
an experiment, so the comparison is like for like; the mode each system ran with is in every
results row and in its system.json, with the reason."""
ClaimTest = Literal["approx", "at_least", "at_most"]
ClaimForm = Literal["ratio", "overhead_pct", "value"]
"""What a claim compares: a ratio of two measured points, that ratio as a percent overhead (of
the numerator over the denominator: lost throughput, added response time), or one measured
value itself (a ratio without a denominator)."""

Tool = Literal["", "redis-benchmark", "memcaslap", "ycsb"]
"""The load generator of a trial: "" is GAIA's own closed-loop consensus client (gaia.workload);
the others are the apps' own load tools driving an unmodified server (gaia.apps.loadgen)."""

FigureKind = Literal["latency-vs-replicas", "load-vs-connections", "breakdown"]
"""Which figure gaia.plots draws for the experiment."""

Metric = Literal[
    "median_us",
    "mean_us",
    "p99_us",
    "throughput_rps",
    "consensus_inputs",
    "consensus_rounds",
    "input_calls",
    "input_bytes_per_call",
    "storage_mean_us",
    "first_ack_mean_us",
    "quorum_mean_us",
    "relay_rtt_us",
]
"""The per-trial values (results.csv columns) a claim or a figure can be about."""

HIGHER_IS_BETTER: frozenset[str] = frozenset({"throughput_rps"})
"""Metrics for which less is worse: their overhead is what is lost, (1 - ratio) x 100."""

_RATIO = re.compile(r"^\s*([\w.-]+)@(\d+)\s*/\s*([\w.-]+)@(\d+)\s*$")
_POINT = re.compile(r"^\s*([\w.-]+)@(\d+)\s*$")


@dataclass(frozen=True)
class Workload:
    """The load of one trial: GAIA's closed-loop client (gaia.workload) or an app's own load
    tool (`tool`, gaia.apps.loadgen) sending `operations` in equal shares (empty: the tool's
    50/50 write/read mix) with values of `payload_bytes`. Request counts are totals over all
    connections and operations; warm-up requests go first and are not measured."""

    payload_bytes: int
    requests_per_trial: int
    warmup_requests: int
    tool: Tool = ""
    operations: tuple[str, ...] = ()


@dataclass(frozen=True)
class Timeouts:
    """Upper bounds so that a hung system fails its trial instead of hanging the run."""

    trial_s: float = 300.0


@dataclass(frozen=True)
class ClientMode:
    """How many concurrent client connections drive the system (each one closed-loop)."""

    connections: int
    source: str = ""

    @property
    def id(self) -> str:
        return f"c{self.connections}"

    @property
    def label(self) -> str:
        return f"{self.connections} connection{'s' if self.connections != 1 else ''}"


@dataclass(frozen=True)
class SystemSpec:
    """One curve: a registered system with its parameters and declared durability policy.

    `params` go verbatim to the system's factory; `durability` is the policy they amount to, in
    one vocabulary for all systems, so the report can tell which curves are like for like.
    `series` (the curve's id) defaults to the system's name and must be given when a system
    has several curves; `label` defaults from system, durability and `policy`; both appear
    filled in the resolved definition of a run. `roles` are the gaia.provision roles the system
    needs installed, `packages` the Debian packages whose versions a run records. Whether a
    system can run on a target at all is its factory's call (SystemUnavailable says why).
    """

    system: str
    durability: Durability
    params: Mapping[str, Any] = field(default_factory=dict)
    policy: str = ""
    series: str = ""
    label: str = ""
    replicas: tuple[int, ...] = ()
    roles: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.series:
            object.__setattr__(self, "series", self.system)
        if not self.label:
            policy = f" ({self.policy})" if self.policy else ""
            label = f"{self.system}, {DURABILITY_LABELS[self.durability]}{policy}"
            object.__setattr__(self, "label", label)


@dataclass(frozen=True)
class PaperSeries:
    """One protocol's published latencies (µs by replica count), overlaid on the figure."""

    name: str
    durability: Durability
    latency_us: Mapping[int, float]
    compare_with: str = ""
    note: str = ""


@dataclass(frozen=True)
class Paper:
    """The published values this experiment reproduces, with where they come from."""

    source: str
    connections: int
    series: tuple[PaperSeries, ...] = ()


@dataclass(frozen=True)
class Point:
    """One measured value: the median latency of a curve at a replica count."""

    series: str
    replicas: int


@dataclass(frozen=True)
class Claim:
    """A claim of the paper as a ratio of measured points, e.g. `zookeeper-fsync@3 / apus-shm@3`.

    With several ratios the report takes the least favourable one for the test (the minimum for
    `at_least`, the maximum for `at_most`): "≥ 32.3x faster than every traditional protocol at
    every size" holds only if its weakest instance does. `approx` takes exactly one ratio and
    agrees when measured and paper are within `tolerance` times of each other.
    """

    claim: str
    paper: float
    ratios: tuple[str, ...]
    test: ClaimTest = "approx"
    tolerance: float = 2.0
    connections: int | None = None
    note: str = ""
    metric: Metric = "median_us"
    form: ClaimForm = "ratio"
    over_connections: bool = False  # the mean over every client mode, not one mode's value
    client_rtt_us: int = 0

    @property
    def pairs(self) -> tuple[tuple[Point, Point | None], ...]:
        """Numerator and denominator of each ratio (no denominator for form `value`)."""
        return tuple(_parse_ratio(text, single=self.form == "value") for text in self.ratios)

    @property
    def points(self) -> tuple[Point, ...]:
        return tuple(p for pair in self.pairs for p in pair if p is not None)


@dataclass(frozen=True)
class Experiment:
    """A resolved definition: everything a run needs, nothing it has to guess."""

    name: str
    title: str
    source: str
    replicas: tuple[int, ...]
    trials: int
    workload: Workload
    client_modes: tuple[ClientMode, ...]
    systems: tuple[SystemSpec, ...]
    paper: Paper
    claims: tuple[Claim, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    isolation: Isolation = "auto"
    profile: Profile = "full"
    client_rtt_us: tuple[int, ...] = (0,)  # round trip added between client and server (relay)
    interleave: bool = False  # trials round-robin over the curves, each on a fresh system
    figure: FigureKind = "latency-vs-replicas"
    baseline: str = ""  # the curve overheads are relative to (the unreplicated server)
    notes: tuple[str, ...] = ()  # for the report: what limits the result, caveats

    def __post_init__(self) -> None:
        claims = tuple(
            c
            if c.connections is not None
            else dataclasses.replace(c, connections=self.paper.connections)
            for c in self.claims
        )
        object.__setattr__(self, "claims", claims)

    def spec(self, series: str) -> SystemSpec:
        return next(s for s in self.systems if s.series == series)


@dataclass(frozen=True)
class Trial:
    """One measurement: a curve at a replica count, client mode and added client round trip,
    repetition `number` (from 1)."""

    spec: SystemSpec
    replicas: int
    mode: ClientMode
    number: int
    client_rtt_us: int = 0

    @property
    def group(self) -> str:
        """Trials of one group share one running system (see gaia.experiments.runner)."""
        return f"{self.spec.series}-r{self.replicas}"

    @property
    def id(self) -> str:
        rtt = f"-rtt{self.client_rtt_us}" if self.client_rtt_us else ""
        return f"{self.group}-{self.mode.id}{rtt}-t{self.number}"


def expand(experiment: Experiment) -> list[Trial]:
    """The sweep. By default trials sharing a running system are adjacent; interleaved, every
    curve runs once before any runs again (repetition, then client mode, then round trip, then
    curve), so that slow drifts of the machine hit every curve alike."""
    points = [(s, r) for s in experiment.systems for r in s.replicas or experiment.replicas]
    numbers = range(1, experiment.trials + 1)
    modes, rtts = experiment.client_modes, experiment.client_rtt_us
    if experiment.interleave:
        return [
            Trial(spec, replicas, mode, number, rtt)
            for number in numbers
            for mode in modes
            for rtt in rtts
            for spec, replicas in points
        ]
    return [
        Trial(spec, replicas, mode, number, rtt)
        for spec, replicas in points
        for mode in modes
        for rtt in rtts
        for number in numbers
    ]


def available(directory: Path) -> list[str]:
    """Names of the experiments defined in `directory` (one `<name>.yaml` each)."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load(
    name: str, directory: Path, *, quick: bool = False, trials: int | None = None
) -> Experiment:
    """The experiment `name` from `directory`; an unknown name lists the available ones."""
    path = directory / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(available(directory)) or "none"
        raise DefinitionError(f"unknown experiment {name!r}; available in {directory}: {names}")
    experiment = load_file(path, quick=quick, trials=trials)
    if experiment.name != name:
        raise DefinitionError(
            f"{path}: name: {experiment.name!r} must match the file name {name!r}"
        )
    return experiment


def load_file(path: Path, *, quick: bool = False, trials: int | None = None) -> Experiment:
    """Parse and validate a definition (or a run's resolved `experiment.yaml`)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DefinitionError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise DefinitionError(f"{path}: expected a mapping at the top level")
    overrides = raw.pop("quick", {})
    if not isinstance(overrides, dict):
        raise DefinitionError(f"{path}: quick: expected a mapping of overrides")
    try:
        full = _checked(_convert(raw, Experiment, ""))
        fast = _checked(_convert(_merged(raw, {**overrides, "profile": "quick"}), Experiment, ""))
        chosen = fast if quick else full
        if trials is not None:
            chosen = _checked(dataclasses.replace(chosen, trials=trials))
    except DefinitionError as exc:
        raise DefinitionError(f"{path}: {exc}") from None
    return chosen


def to_raw(value: Any) -> Any:
    """A definition (or any part of it) as plain YAML data, in the schema `load_file` reads."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_raw(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_raw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [to_raw(v) for v in value]
    return value


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied; nested mappings merge, everything else is replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        old = merged.get(key)
        merged[key] = (
            _merged(old, value)
            if isinstance(old, Mapping) and isinstance(value, Mapping)
            else value
        )
    return merged


def _at(where: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{where}[{name}]"
    return f"{where}.{name}" if where else name


def _convert(value: Any, kind: Any, where: str) -> Any:
    """`value` from YAML as an instance of the type hint `kind`, or a DefinitionError at `where`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        return _build(kind, value, where)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise DefinitionError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _convert(value, inner, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise DefinitionError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, args[0], _at(where, i)) for i, v in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, dict):
            raise DefinitionError(f"{where}: expected a mapping, got {value!r}")
        key_kind, value_kind = args
        return types.MappingProxyType(
            {
                _convert(k, key_kind, f"{where} (key {k!r})"): _convert(
                    v, value_kind, _at(where, str(k))
                )
                for k, v in value.items()
            }
        )
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if (
        kind in (int, str, bool)
        and isinstance(value, kind)
        and (kind is bool or not isinstance(value, bool))
    ):
        return value
    raise DefinitionError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def _build(cls: type[Any], value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise DefinitionError(f"{where or 'top level'}: expected a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in value if k not in fields)
    if unknown:
        raise DefinitionError(
            f"{_at(where, unknown[0])}: unknown field; fields here are {', '.join(fields)}"
        )
    missing = [
        name
        for name, f in fields.items()
        if name not in value
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise DefinitionError(f"{_at(where, missing[0])}: missing required field")
    return cls(**{name: _convert(v, hints[name], _at(where, name)) for name, v in value.items()})


def _parse_ratio(text: str, *, single: bool = False) -> tuple[Point, Point | None]:
    if single:
        point = _POINT.match(text)
        if point is None:
            raise DefinitionError(f"{text!r} is not of the form 'series@replicas'")
        return Point(point.group(1), int(point.group(2))), None
    match = _RATIO.match(text)
    if match is None:
        raise DefinitionError(f"{text!r} is not of the form 'series@replicas / series@replicas'")
    num, num_r, den, den_r = match.groups()
    return Point(num, int(num_r)), Point(den, int(den_r))


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise DefinitionError(f"{where}: {message}")


def _checked(exp: Experiment) -> Experiment:
    """Rules that span fields: sizes positive, curves unique, references resolvable."""
    _require(
        bool(exp.replicas) and min(exp.replicas) >= 1, "replicas", "a non-empty list of counts >= 1"
    )
    _require(exp.trials >= 1, "trials", f"must be >= 1, got {exp.trials}")
    _require(exp.workload.payload_bytes >= 1, "workload.payload_bytes", "must be >= 1")
    _require(exp.workload.warmup_requests >= 0, "workload.warmup_requests", "must be >= 0")
    _require(exp.timeouts.trial_s > 0, "timeouts.trial_s", "must be > 0")
    _require(bool(exp.client_modes), "client_modes", "at least one client mode")
    connections = [m.connections for m in exp.client_modes]
    _require(len(set(connections)) == len(connections), "client_modes", "connections must differ")
    _require(min(connections) >= 1, "client_modes", "connections must be >= 1")
    _require(
        exp.workload.requests_per_trial >= max(connections),
        "workload.requests_per_trial",
        f"must be at least the largest connection count ({max(connections)})",
    )
    _require(bool(exp.systems), "systems", "at least one system")
    seen: set[str] = set()
    for i, spec in enumerate(exp.systems):
        where = _at("systems", i)
        _require(
            spec.series not in seen,
            _at(where, "series"),
            f"{spec.series!r} names two curves: give each curve of a system its own series",
        )
        seen.add(spec.series)
        _require(all(r >= 1 for r in spec.replicas), _at(where, "replicas"), "counts must be >= 1")
    _require(
        exp.paper.connections in connections, "paper.connections", "not one of the client modes"
    )
    for i, paper in enumerate(exp.paper.series):
        _require(
            not paper.compare_with or paper.compare_with in seen,
            _at(_at("paper.series", i), "compare_with"),
            f"unknown curve {paper.compare_with!r}; curves are {', '.join(sorted(seen))}",
        )
    rtts = exp.client_rtt_us
    _require(bool(rtts) and min(rtts) >= 0, "client_rtt_us", "a non-empty list of values >= 0")
    _require(len(set(rtts)) == len(rtts), "client_rtt_us", "values must differ")
    _require(
        rtts == (0,) or exp.workload.tool != "",
        "client_rtt_us",
        "an added client round trip needs a load tool (workload.tool): the relay carries TCP",
    )
    _require(
        exp.figure != "load-vs-connections" or exp.workload.tool != "",
        "figure",
        "load-vs-connections plots a load tool's results: set workload.tool",
    )
    _require(
        not exp.baseline or exp.baseline in seen,
        "baseline",
        f"unknown curve {exp.baseline!r}; curves are {', '.join(sorted(seen))}",
    )
    for i, claim in enumerate(exp.claims):
        where = _at("claims", i)
        try:
            points = list(claim.points)
        except DefinitionError as exc:
            raise DefinitionError(f"{_at(where, 'ratios')}: {exc}") from None
        _require(bool(points), _at(where, "ratios"), "at least one ratio")
        for point in points:
            _require(
                point.series in seen,
                _at(where, "ratios"),
                f"unknown curve {point.series!r}; curves are {', '.join(sorted(seen))}",
            )
        _require(claim.connections in connections, _at(where, "connections"), "not a client mode")
        _require(
            claim.client_rtt_us in rtts,
            _at(where, "client_rtt_us"),
            f"not one of client_rtt_us {list(rtts)}",
        )
        _require(claim.tolerance > 1, _at(where, "tolerance"), "must be > 1")
        _require(
            claim.test != "approx" or len(claim.pairs) == 1,
            _at(where, "ratios"),
            "an approx claim compares exactly one ratio",
        )
    return exp


def select(experiment: Experiment, names: Iterable[str]) -> Experiment:
    """Only the curves named (by series or by system), e.g. to rerun one system.

    Claims that need a curve left out are dropped, and paper values lose their comparison with
    it (they are still drawn): a partial run reports what it measured, nothing else.
    """
    wanted = set(names)
    known = {s.series for s in experiment.systems} | {s.system for s in experiment.systems}
    unknown = sorted(wanted - known)
    if unknown:
        raise DefinitionError(
            f"{experiment.name}: no curve or system {', '.join(map(repr, unknown))}; "
            f"curves are {', '.join(s.series for s in experiment.systems)}"
        )
    systems = tuple(s for s in experiment.systems if {s.series, s.system} & wanted)
    kept = {s.series for s in systems}
    claims = tuple(c for c in experiment.claims if all(p.series in kept for p in c.points))
    baseline = experiment.baseline if experiment.baseline in kept else ""
    paper = dataclasses.replace(
        experiment.paper,
        series=tuple(
            p if p.compare_with in kept else dataclasses.replace(p, compare_with="")
            for p in experiment.paper.series
        ),
    )
    return _checked(
        dataclasses.replace(
            experiment, systems=systems, claims=claims, paper=paper, baseline=baseline
        )
    )
