"""Experiment tracking with MLflow: every run (and every job of a sweep) is an MLflow run.

The ServerApp hands an :class:`MlflowTracker` to its `RunRecorder` (core/results.py), which
tells it of each change right after writing it to results.json, from the same records:

- params: the resolved configuration, flattened to dotted keys (`privacy.noise_multiplier`),
  as config.yaml has it once the federation's size is known; values past MLflow's limit are
  cut (config.yaml, an artifact, has them whole);
- metrics, step = round: every number of each round's results.json entry under its dotted
  path (`centralized.accuracy`, `federated.loss`, `train.train_loss`, `privacy.epsilon`,
  `comm.bytes_up`, `comm.bytes_down`, `clients.failed`, `seconds`, ...); the initial model's
  `centralized.*` at step 0; `final.*` (`final.seconds_total`, `final.comm_total.bytes_up`,
  ...) at the last round. Non-finite values are left out;
- tags: `run.token`, `flwr.run_id`, `output_dir`, and for a sweep's job `sweep` (the sweep
  directory, from the run config's `sweep-dir`) and `sweep.job`; `error` for a failed run;
- status FINISHED or FAILED; artifacts: results.json, config.yaml, metrics.png, the model files.

All MLflow calls run in one background thread, in order, so no round waits for the store;
the thread still takes CPU (and the GIL) from the run: importing MLflow 2-3 s, opening an
existing SQLite store about 2 s (SQLAlchemy and alembic imports), a round's metrics about 30
ms, creating a new store 6-12 s once (the schema migrations); about 2.8 s of CPU a run in all
with an existing store (measured on the repository's 2 cores while they were busy; README,
"Experiment tracking with MLflow", has the run times side by side). A tracking failure
(unwritable store, server down, a schema from another MLflow version) never fails the run: it
is logged once as a warning, written to results.json's `run.tracking.error`, and nothing more
is sent. At the end the ServerApp waits at most `FINISH_WAIT_S` for the thread.

Only the tracking client is a dependency (`mlflow-skinny`); `mlflow ui` needs the full `mlflow`
package, in an environment of its own (README, "Results").
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import threading
import time
from logging import WARNING
from pathlib import Path
from typing import Any, Callable

from flwr.common.logger import log
from omegaconf import OmegaConf

from core.config import ExperimentConfig
from core.results import InitialRecord, RoundRecord, RunObserver, RunRecord, TrackingInfo

STORE_FILE = "mlflow.db"  # the default store: <runs root>/mlflow.db
ARTIFACTS_DIR = "mlartifacts"  # next to a local SQLite store: <store dir>/mlartifacts/<experiment>
FINISH_WAIT_S = 120.0
MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_CHARS = 8000  # MAX_TAG_VAL_LENGTH
BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH (metrics: 1000 a batch)
# Set in the ServerApp's process (start_tracking) unless the environment sets them: no usage
# telemetry sent to MLflow's servers, and a tracking server that is down costs seconds, not
# MLflow's default of 7 retries with backoff (one request to a closed port took 247 s here).
MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def tracking_uri(cfg: ExperimentConfig, runs_root: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else SQLite at <runs root>/mlflow.db."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(runs_root).expanduser().resolve() / STORE_FILE}"


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved configuration as MLflow params: dotted keys, values as config.yaml writes
    them (JSON for lists, null, true/false), cut at MLflow's limit."""
    flat: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
            return
        value = node if isinstance(node, str) else json.dumps(node)
        if len(value) > MAX_PARAM_CHARS:
            note = f"... ({len(value)} characters: config.yaml has them all)"
            value = value[: MAX_PARAM_CHARS - len(note)] + note
        flat[key] = value

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return flat


def numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a results.json part under their dotted paths (lists, strings and
    booleans are left out)."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, (int, float)) and not isinstance(data, bool) and math.isfinite(data):
        out[prefix] = float(data)
    return out


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """A round's metrics: every number of its results.json entry but the round number."""
    metrics = numbers(record.to_dict())
    metrics.pop("round", None)
    return metrics


def now_ms() -> int:
    return int(time.time() * 1000)


def one_line(err: BaseException) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 500 else text[:497] + "..."


class MlflowTracker(RunObserver):
    """The run's MLflow run, written by one background thread (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        run_name: str,
        tags: dict[str, str],
        wait_s: float = FINISH_WAIT_S,
        resumed_from: str | None = None,
    ) -> None:
        self._info = TrackingInfo(uri=uri, experiment=experiment)
        self._resumed_from = resumed_from
        self._lock = threading.Lock()
        self._run_name, self._tags, self._wait_s = run_name, dict(tags), wait_s
        self._params: dict[str, str] | None = None
        self._params_logged = False
        self._client: Any = None
        self._run_id = ""
        self._closed = False
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="mlflow-tracking", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- RunObserver (caller's thread)
    def tracking(self) -> TrackingInfo:
        with self._lock:
            return TrackingInfo(**vars(self._info))

    def configured(self, cfg: ExperimentConfig) -> None:
        self._params = config_params(cfg)  # logged with the next record: the latest config

    def started(self, record: RunRecord) -> None:
        tags = dict(self._tags)
        if record.run.resumed_after_round is not None:
            tags["resumed_after_round"] = str(record.run.resumed_after_round)
        # a resumed run: the checkpoint's initial metrics and rounds too
        steps = [(0, numbers(record.initial.centralized, "centralized"))] if record.initial else []
        steps += [(r.round, round_metrics(r)) for r in record.rounds]

        at = now_ms()

        def start() -> None:
            self._start(tags)
            self._metrics(steps, at)

        # no params yet: the ServerApp rewrites config.yaml once it knows the federation
        self._submit(start, with_params=False)

    def initial(self, initial: InitialRecord) -> None:
        metrics, at = numbers(initial.centralized, "centralized"), now_ms()
        self._submit(lambda: self._metrics([(0, metrics)], at))

    def round(self, record: RoundRecord) -> None:
        step, metrics, at = record.round, round_metrics(record), now_ms()
        self._submit(lambda: self._metrics([(step, metrics)], at))

    def round_updated(self, record: RoundRecord, added: dict[str, Any]) -> None:
        step, metrics, at = record.round, numbers(added), now_ms()
        self._submit(lambda: self._metrics([(step, metrics)], at))

    def finished(self, record: RunRecord, files: list[Path]) -> None:
        final = record.final
        step = final.rounds_completed if final is not None else len(record.rounds)
        metrics = numbers(final.to_dict(), "final") if final is not None else {}
        at = now_ms()
        self._submit(lambda: self._end("FINISHED", [(step, metrics)], at, {}, list(files)))

    def failed(self, record: RunRecord, files: list[Path]) -> None:
        error = (record.run.error or "")[:MAX_TAG_CHARS]
        at = now_ms()
        self._submit(lambda: self._end("FAILED", [], at, {"error": error}, list(files)))

    def close(self) -> None:
        """Wait up to `wait_s` for every record to reach MLflow."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join(self._wait_s)
        if self._thread.is_alive():
            self._fail(f"MLflow did not take the run's records within {self._wait_s:g} s")

    # ----------------------------------------------------------------- the tracking thread
    def _submit(self, job: Callable[[], None], with_params: bool = True) -> None:
        """Queue `job`, preceded by the params (the config as of this record) unless they
        went with an earlier record."""
        if self._closed:
            return
        params = self._params if with_params else None

        def run() -> None:
            if params is not None and not self._params_logged:
                self._log_params(params)
            job()

        self._jobs.put(run)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self.tracking().error is not None:
                continue  # tracking failed: drop the rest, keep draining
            try:
                job()
            except Exception as err:  # noqa: BLE001 - any failure of the store stops tracking only
                self._fail(one_line(err))

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._info.error is not None:
                return
            self._info.error = reason
        log(WARNING, "MLflow tracking failed and is off for the rest of this run (the run goes "
            "on; results.json run.tracking.error records it): %s [tracking.uri=%s]",
            reason, self._info.uri)  # fmt: skip

    def _start(self, tags: dict[str, str]) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._check_local_store()
        client = MlflowClient(tracking_uri=self._info.uri)
        name = self._info.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(name, artifact_location=self._artifact_root())
            except MlflowException:  # created meanwhile by another run
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        if self._resumed_from:
            tags = {**tags, "resumed_from": self._resumed_from}
        run = client.create_run(experiment_id, run_name=self._run_name, tags=tags)
        self._client, self._run_id = client, run.info.run_id
        with self._lock:
            self._info.run_id = self._run_id
        if self._resumed_from:
            self._close_resumed(client, experiment_id)

    def _close_resumed(self, client, experiment_id: str) -> None:
        """The run this one resumes: a new MLflow run holds the whole experiment (the
        checkpoint's rounds were logged again with it), so the earlier run, killed mid-run and
        left RUNNING, is marked KILLED and tagged `resumed_by` this run. MLflow refuses to
        change a logged param (num_rounds may grow on resume), which is why the earlier run
        is not continued. An earlier run this store does not hold (tracking.uri changed) is
        left alone."""
        from mlflow.exceptions import MlflowException

        try:
            earlier = client.get_run(self._resumed_from)
            if earlier.info.experiment_id != experiment_id or earlier.info.lifecycle_stage != "active":
                return  # another experiment's, or deleted in the UI: nothing to link
            client.set_tag(self._resumed_from, "resumed_by", self._run_id)
            if earlier.info.status == "RUNNING":
                client.set_terminated(self._resumed_from, "KILLED")
        except MlflowException as err:  # linking is a courtesy: this run is tracked either way
            log(WARNING, "MLflow: the resumed run %s could not be marked (%s)", self._resumed_from, one_line(err))

    def _local_store(self) -> Path | None:
        """The file of a local SQLite store (None for a server or another database)."""
        uri = self._info.uri
        if not uri.startswith("sqlite:///") or ":memory:" in uri:
            return None
        return Path(uri[len("sqlite:///") :].split("?")[0])

    def _check_local_store(self) -> None:
        """Fail at once where a local store cannot be written: MLflow retries opening an
        SQLite file it cannot create for about 100 s."""
        store = self._local_store()
        if store is None:
            return
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the MLflow store {store}: {err}") from err
        target = store if store.exists() else store.parent
        if not os.access(target, os.W_OK):
            raise PermissionError(f"cannot write the MLflow store {store}: {target} is not writable")

    def _artifact_root(self) -> str | None:
        """A local SQLite store keeps artifacts next to it (MLflow's default would be
        ./mlruns under the ServerApp's working directory); servers choose their own."""
        store = self._local_store()
        if store is None:
            return None
        slug = re.sub(r"[^\w.-]+", "_", self._info.experiment)
        return (store.parent / ARTIFACTS_DIR / slug).as_uri()

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self._client.log_batch(self._run_id, params=items[i : i + BATCH])
        self._params_logged = True

    def _metrics(self, steps: list[tuple[int, dict[str, float]]], at: int) -> None:
        """`at`: when the record was made (ms since the epoch), not when MLflow got it."""
        from mlflow.entities import Metric

        items = [Metric(k, v, at, step) for step, metrics in steps for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self._run_id, metrics=items[i : i + 1000])

    def _end(self, status: str, steps, at: int, tags: dict[str, str], files: list[Path]) -> None:
        self._metrics(steps, at)
        for key, value in tags.items():
            self._client.set_tag(self._run_id, key, value)
        for path in files:
            if path.is_file():
                self._client.log_artifact(self._run_id, str(path))
        self._client.set_terminated(self._run_id, status)


def resumed_tracking_id(results: dict) -> str | None:
    """The MLflow run id a checkpoint's results (results.json as of that round) name, if any."""
    tracking = (results.get("run") or {}).get("tracking") or {}
    run_id = tracking.get("run_id")
    return str(run_id) if run_id else None


def start_tracking(
    cfg: ExperimentConfig,
    runs_root: Path,
    output_dir: Path,
    *,
    token: str = "",
    flwr_run_id: int | None = None,
    sweep_dir: str = "",
    resumed_from: str | None = None,
) -> MlflowTracker | None:
    """The run's tracker (None with tracking.enabled=false). Named after its output directory
    (a sweep's job: `<sweep dir name>/<job>`), tagged with what finds it again. `resumed_from`:
    the MLflow run id of the run this one resumes (its checkpoint's `run.tracking.run_id`)."""
    if not cfg.tracking.enabled:
        return None
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    tags = {"output_dir": str(output_dir), "run.token": token}
    if flwr_run_id is not None:
        tags["flwr.run_id"] = str(flwr_run_id)
    run_name = output_dir.name
    if sweep_dir:
        tags["sweep"] = sweep_dir
        tags["sweep.job"] = output_dir.name
        run_name = f"{Path(sweep_dir).name}/{output_dir.name}"
    return MlflowTracker(
        tracking_uri(cfg, runs_root), cfg.tracking.experiment, run_name=run_name, tags=tags,
        resumed_from=resumed_from,
    )  # fmt: skip
