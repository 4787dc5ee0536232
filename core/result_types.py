"""The results contract as dataclasses: what results.json holds (README, "Results").

Kept apart from the recorder (core/results.py, which writes the files and re-exports all of
this) so that the strategy layers in protections/ can name their section of a round without
importing the recorder's dependencies (torch, the config schema).
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

RESULTS_FILE = "results.json"


# results.json as dataclasses. Writers (the round loop, each strategy layer, the ServerApp)
# build these; readers (the console line, app/sweep.py, app/report.py) get them back from
# `load_results`, which checks every key and type, so a layer that writes a key the contract
# does not name, or a reader that expects one no run writes, fails in the tests instead of in
# a notebook. Serialization: fields in declaration order (the order results.json has always
# had), a field left at None is omitted ("parts that were not measured are omitted"), except
# those marked NULLABLE, which are written as null.
NULLABLE = {"nullable": True}
Metrics = dict[str, float]  # loss, accuracy, ...: whatever the task's evaluation computes
FitMetrics = dict[str, Union[float, int, str, bool]]  # the clients' aggregated fit metrics


class ResultsError(ValueError):
    """A results record that does not follow the contract (a key or type it does not name)."""


class Record:
    """Base of the contract's dataclasses: to and from the JSON-ready dict results.json holds."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and not f.metadata.get("nullable"):
                continue
            out[f.name] = _encode(value)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = ""):
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ResultsError(f"{where}: expected an object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ResultsError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, f in known.items():
            if name not in data:
                required = f.default is MISSING and f.default_factory is MISSING
                if required:
                    raise ResultsError(f"{where}: missing key {name!r}")
                continue
            kwargs[name] = _decode(hints[name], data[name], f"{where}.{name}")
        return cls(**kwargs)


def _encode(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _decode(option, value, where)
            except ResultsError as err:
                errors.append(str(err))
        raise ResultsError(" / ".join(errors) if len(errors) > 1 else errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ResultsError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ResultsError(f"{where}: expected an object, got {type(value).__name__}")
        _, item = typing.get_args(hint)
        return {str(k): _decode(item, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and is_dataclass(hint):
        return hint.from_dict(value, where)
    if hint is float:  # JSON writes 1.0 as 1.0, but a hand-written 1 is a float field's value too
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (str, bool):
        if isinstance(value, hint):
            return value
    elif hint is Any:
        return value
    raise ResultsError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


# Each layer of the strategy stack contributes one of these per round (protections/base.py,
# `StrategyWrapper.section` and `report`); the field of RoundRecord it fills is named there.
@dataclass
class Comm(Record):
    """`comm` (strategies/traffic.py) and the run's `comm_total`: payload bytes on the wire."""

    bytes_down: int
    bytes_up: int


@dataclass
class WorkloadReport(Record):
    """`workload` (protections/workload/server.py): simulated round times of the clients."""

    name: str
    round_time: float
    round_time_uniform: float
    steps: list[int]
    compute: list[float]


@dataclass
class CompressionReport(Record):
    """`compression` (protections/compression/server.py)."""

    scheme: str
    bytes_up: int
    bytes_up_float32: int
    ratio: float


@dataclass
class ServerAccountedPrivacy(Record):
    """`privacy` of client-level DP (protections/dp/server.py `ClientLevelDP`): the server
    noised and accounted the round. Accountant keys (protections/dp/accounting.py `report`)
    are absent when z = 0 (epsilon = inf); the last three only for `privacy=adaptive`."""

    mechanism: str
    noise_multiplier: float
    clipping_norm: float
    sampling: str
    cohort_divisor: int
    clients_aggregated: int
    epsilon: float
    delta: float
    not_covered: list[str]
    clients_clipped: int | None = None
    sampling_rate: float | None = None
    releases: int | None = None
    accounting: str | None = None
    neighbouring: str | None = None
    epsilon_pld: float | None = None
    update_noise_multiplier: float | None = None
    clipped_count_stddev: float | None = None
    next_clipping_norm: float | None = None

    # results.json's key order (the accountant's keys between the counts and not_covered)
    ORDER = (
        "mechanism", "noise_multiplier", "clipping_norm", "sampling", "cohort_divisor",
        "clients_aggregated", "clients_clipped", "epsilon", "delta", "sampling_rate",
        "releases", "accounting", "neighbouring", "epsilon_pld", "not_covered",
        "update_noise_multiplier", "clipped_count_stddev", "next_clipping_norm",
    )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        plain = super().to_dict()
        return {k: plain[k] for k in self.ORDER if k in plain}


@dataclass
class ClientAccountedPrivacy(Record):
    """`privacy` of `privacy=local` and `privacy=dpsgd` (protections/dp/server.py
    `ClientReportedPrivacy`): each client accounted itself; the server reports the worst."""

    mechanism: str
    epsilon: float
    epsilon_round_max: float
    epsilon_round_mean: float
    delta: float
    accounting: str
    neighbouring: str
    not_covered: list[str]


PrivacyReport = Union[ServerAccountedPrivacy, ClientAccountedPrivacy]


@dataclass
class RollbackReport(Record):
    """`secagg.rolled_back` (protections/he/server.py): most clients refused the model."""

    reports: int
    of_clients: int
    reason: str
    restored: str


@dataclass
class SecAggReport(Record):
    """`secagg` (protections/he/server.py `HomomorphicAggregation`); a round that summed
    nothing has only `scheme` and `skipped` or `rolled_back`."""

    scheme: str
    skipped: str | None = None
    rolled_back: RollbackReport | None = None
    clients_aggregated: int | None = None
    ciphertexts_per_model: int | None = None
    bytes_per_parameter_up: float | None = None
    bytes_per_parameter_down: float | None = None
    rejected: list[str] | None = None


@dataclass
class FailureRecord(Record):
    """One entry of `clients.failures` (app/experiment_server.py `describe_failures`)."""

    node_id: str | None = field(metadata=NULLABLE)
    stage: str
    reason: str


@dataclass
class ClientCounts(Record):
    trained: int
    failed: int
    failures: list[FailureRecord] | None = None


# The RoundRecord fields the strategy layers fill (each names its own with `section`).
LAYER_SECTIONS = ("secagg", "privacy", "rejected_updates", "compression", "workload", "comm")


@dataclass
class RoundRecord(Record):
    """One entry of results.json's `rounds`: the round loop's measurements
    (app/experiment_server.py), then the layers' sections, then the wall time."""

    round: int
    clients: ClientCounts | None = None
    aggregated: bool | None = None
    rolled_back: bool | None = None
    train: FitMetrics | None = None
    centralized: Metrics | None = None
    federated: Metrics | None = None
    # evaluation.per_site: each evaluating client's own metrics, by site (not covered by DP)
    federated_sites: dict[str, Metrics] | None = None
    # True: strategy.evaluate_every skipped this round's federated evaluation (absent: it ran,
    # or the run has none).
    federated_skipped: bool | None = None
    secagg: SecAggReport | None = None
    privacy: PrivacyReport | None = None
    rejected_updates: int | None = None  # protections/validation/server.py: how many
    compression: CompressionReport | None = None
    workload: WorkloadReport | None = None
    comm: Comm | None = None
    seconds: float | None = None

    def sections(self) -> dict[str, Any]:
        """The layers' part of this round as results.json writes it (`round_report`)."""
        out = self.to_dict()
        return {k: out[k] for k in LAYER_SECTIONS if k in out}


@dataclass
class Int8Model(Record):
    """`final.int8_model` (core/edge_model.py `export_int8`)."""

    file: str
    bytes: int
    centralized: Metrics | None = None


@dataclass
class FinalRecord(Record):
    """results.json's `final`, written once the run succeeded (app/server_app.py), plus the
    model file the recorder wrote."""

    rounds_completed: int
    stop_reason: str | None = None
    num_parameters: int | None = None
    num_trainable_parameters: int | None = None
    num_supernodes: int | None = None
    seconds_total: float | None = None
    comm_total: Comm | None = None
    rounds_with_failures: list[int] | None = None
    centralized: Metrics | None = None
    federated: Metrics | None = None
    privacy: PrivacyReport | None = None
    int8_model: Int8Model | None = None
    secagg: SecAggReport | None = None
    model_file: str | None = None
    model_bytes: int | None = None


@dataclass
class TrackingInfo(Record):
    """`run.tracking` (app/tracking.py): where this run is tracked in MLflow. `run_id` is
    MLflow's id of the run (absent until MLflow created it); `error`, one line, says that
    tracking failed and stopped there (the run itself went on)."""

    uri: str
    experiment: str
    run_id: str | None = None
    error: str | None = None


@dataclass
class RunInfo(Record):
    """results.json's `run`: whose results these are and how the run ended; `tracking` is
    absent with tracking.enabled=false."""

    token: str
    flwr_run_id: int | None = field(default=None, metadata=NULLABLE)
    status: str = "running"  # running, completed or failed
    resumed_after_round: int | None = None
    error: str | None = None
    tracking: TrackingInfo | None = None


@dataclass
class InitialRecord(Record):
    centralized: Metrics


@dataclass
class RunRecord(Record):
    """The whole of results.json. `final` is None (written `{}`) until the run succeeded."""

    run: RunInfo
    rounds: list[RoundRecord] = field(default_factory=list)
    final: FinalRecord | None = field(default=None, metadata=NULLABLE)
    initial: InitialRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["final"] = {} if self.final is None else out["final"]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "results"):
        if isinstance(data, dict) and data.get("final") == {}:
            data = {**data, "final": None}
        return super().from_dict(data, where)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def load_results(path: Path) -> RunRecord:
    """A run's results.json (or the directory holding it) as a checked RunRecord.
    ResultsError names the first key or type that does not follow the contract; a file that
    is not JSON raises ValueError (json's own)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    return RunRecord.from_dict(json.loads(path.read_text()))
