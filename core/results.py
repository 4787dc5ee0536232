"""Write the results contract (README, "Results") into a run's output directory.

- `config.yaml`: the resolved configuration (written before round 1);
- `results.json`: `{"rounds": [...], "final": {...}}`, rewritten after every round so a run
  that dies still leaves what it measured (parts that were not measured are omitted);
- `metrics.png`: accuracy and loss per round;
- `model.pt`: the final global model's state_dict (LoRA: adapters merged, core/finetune.py);
  under secagg=he the server cannot decrypt it and writes `model_encrypted.npz` (the payload)
  instead. Written atomically (temp file + rename), and only by a run that succeeded.

`results.json["run"]` says whose results these are and how the run ended: `token` (the one
`app.sweep`/`run_experiment` passed in through the run config, so they can tell this run's
results from an earlier run's), Flower's `flwr_run_id`, `status`: `running`, `completed`
or `failed` (with `error`, one line), and `tracking` (where the run is in MLflow). A directory
never mixes two runs: a run that starts in a directory holding another run's artifacts first
moves them to `previous/<their run>/`.

A `RunObserver` (app/tracking.py's MLflow tracker) is told of every change right after it is
written, from the same records, so results.json and the tracking never disagree.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import ExperimentConfig, resolved_yaml
from core.result_types import (  # noqa: F401 - the contract, re-exported for its readers
    LAYER_SECTIONS,
    RESULTS_FILE,
    ClientAccountedPrivacy,
    ClientCounts,
    Comm,
    CompressionReport,
    FailureRecord,
    FinalRecord,
    InitialRecord,
    Int8Model,
    PrivacyReport,
    ResultsError,
    RollbackReport,
    RoundRecord,
    RunInfo,
    RunRecord,
    SecAggReport,
    ServerAccountedPrivacy,
    TrackingInfo,
    WorkloadReport,
    load_results,
)
CONFIG_FILE = "config.yaml"
PLOT_FILE = "metrics.png"
MODEL_FILE = "model.pt"
ENCRYPTED_MODEL_FILE = "model_encrypted.npz"  # secagg=he: `python -m app.he_keys decrypt-model`
LOG_FILE = "flwr.log"  # written by app.sweep / run_experiment around `flwr run`
PREVIOUS_DIR = "previous"
# What a run reports in its directory (the int8 copy and the report too). Not `keys/`: HE key
# files are inputs a run may be pointed at, not results.
RUN_ARTIFACTS = (
    CONFIG_FILE, RESULTS_FILE, PLOT_FILE, MODEL_FILE, ENCRYPTED_MODEL_FILE, LOG_FILE,
    "model_int8.pt", "report.html", "checkpoint",
)  # fmt: skip


def archive_previous_run(output_dir: Path, keep: tuple[str, ...] = ()) -> Path | None:
    """Move the artifacts of an earlier run out of `output_dir` into
    `output_dir/previous/<that run>/` (named after its token, else its results' time), so a
    new run never reports or mixes them. `keep`: names that belong to the new run already.
    Returns where they went, or None when there was nothing."""
    output_dir = Path(output_dir)
    found = [output_dir / n for n in RUN_ARTIFACTS if n not in keep and (output_dir / n).exists()]
    if not found:
        return None
    name = ""
    results = output_dir / RESULTS_FILE
    if results.exists():
        try:  # any earlier file, of any version of the contract: only its token is read
            name = str(json.loads(results.read_text()).get("run", {}).get("token", ""))
        except (ValueError, AttributeError):
            name = ""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(p.stat().st_mtime for p in found)))
    base = output_dir / PREVIOUS_DIR / (name or stamp)
    target, i = base, 1
    while target.exists():
        target, i = base.with_name(f"{base.name}-{i}"), i + 1
    target.mkdir(parents=True)
    for path in found:
        os.replace(path, target / path.name)
    return target


class RunObserver:
    """Told of each change the recorder makes, right after results.json has it (app/tracking.py
    sends them to MLflow). The recorder passes its own records: an observer copies what it
    keeps. Its methods must not raise or block for long; `tracking()` is written into
    results.json's `run.tracking` with every write, and `close()`, after the run's last
    record, may wait for the observer to catch up. This base observes nothing."""

    def tracking(self) -> TrackingInfo | None:
        return None

    def configured(self, cfg: ExperimentConfig) -> None:
        """config.yaml was (re)written with `cfg`."""

    def started(self, record: RunRecord) -> None:
        """The run began (a resumed run: with the checkpoint's rounds in `record`)."""

    def initial(self, initial: InitialRecord) -> None:
        """The initial model's centralized metrics."""

    def round(self, record: RoundRecord) -> None:
        """A round was added."""

    def round_updated(self, record: RoundRecord, added: dict[str, Any]) -> None:
        """An earlier round got the parts in `added` (as results.json writes them): its
        federated evaluation, which strategy.evaluate_with_train measures in the next round."""

    def finished(self, record: RunRecord, files: list[Path]) -> None:
        """The run completed; `files`: the run's artifacts on disk (results.json, config.yaml,
        metrics.png, the model files)."""

    def failed(self, record: RunRecord, files: list[Path]) -> None:
        """The run failed (`record.run.error`)."""

    def close(self) -> None:
        """No more records come."""


class RunRecorder:
    """The one writer of results.json: holds the run's RunRecord and rewrites the file after
    every change, telling its `observer` (core.results.RunObserver) of each."""

    def __init__(
        self,
        output_dir: Path,
        cfg: ExperimentConfig,
        token: str = "",
        flwr_run_id: int | None = None,
        resumed: dict[str, Any] | None = None,
        observer: RunObserver | None = None,
    ) -> None:
        """`token`: set by a launcher that wrote this run's flwr.log into `output_dir`
        already (so that log is kept); without one, an old flwr.log is archived too.
        `resumed`: the results of the checkpoint this run continues (app/checkpoint.py): its
        rounds are kept, nothing is archived (it is the same experiment)."""
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.observer = observer if observer is not None else RunObserver()
        self.archived = None
        if resumed is None:
            self.archived = archive_previous_run(
                self.output_dir, keep=(LOG_FILE,) if token else ()
            )
        self.record = RunRecord(run=RunInfo(token=token, flwr_run_id=flwr_run_id))
        if resumed is not None:
            earlier = RunRecord.from_dict(resumed)
            self.record.initial, self.record.rounds = earlier.initial, earlier.rounds
            self.record.run.resumed_after_round = len(self.record.rounds)
        self.write_config(cfg)
        self.observer.started(self.record)
        self._write()

    def write_config(self, cfg: ExperimentConfig) -> None:
        """config.yaml: the resolved configuration (the ServerApp rewrites it once the
        federation's size is known)."""
        (self.output_dir / CONFIG_FILE).write_text(resolved_yaml(cfg))
        self.observer.configured(cfg)

    @property
    def results(self) -> dict[str, Any]:
        """results.json as a dict (what a checkpoint stores, app/checkpoint.py)."""
        return self.record.to_dict()

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """The rounds as results.json holds them (typed: `record.rounds`)."""
        return [r.to_dict() for r in self.record.rounds]

    def set_initial(self, centralized: dict[str, float]) -> None:
        """Centralized metrics of the initial model (before round 1)."""
        self.record.initial = InitialRecord(centralized=centralized)
        self._write()
        self.observer.initial(self.record.initial)

    def add_round(self, record: RoundRecord | dict[str, Any]) -> None:
        if not isinstance(record, RoundRecord):
            record = RoundRecord.from_dict(record)
        self.record.rounds.append(record)
        self._write()
        self.observer.round(record)

    def update_round(self, server_round: int, **parts: Any) -> None:
        """Add parts to round `server_round`'s record (strategy.evaluate_with_train: its
        `federated`, measured by the next round's clients)."""
        record = next((r for r in self.record.rounds if r.round == server_round), None)
        if record is None:
            raise ValueError(f"round {server_round} is not recorded: nothing to add {sorted(parts)} to")
        for name, value in parts.items():
            if name not in RoundRecord.__dataclass_fields__:
                raise ValueError(f"RoundRecord has no part {name!r}")
            setattr(record, name, value)
        self._write()
        written = record.to_dict()
        self.observer.round_updated(record, {k: written[k] for k in parts if k in written})

    def finish(
        self,
        final: FinalRecord | dict[str, Any],
        model: nn.Module | None,
        encrypted_model: list[np.ndarray] | None = None,
    ) -> None:
        if not isinstance(final, FinalRecord):
            final = FinalRecord.from_dict(final)
        if model is not None:
            tmp = self.output_dir / (MODEL_FILE + ".tmp")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, self.output_dir / MODEL_FILE)  # a full disk leaves no torn model.pt
            final.model_file = MODEL_FILE
            final.model_bytes = (self.output_dir / MODEL_FILE).stat().st_size  # on disk
        if encrypted_model is not None:
            header, ciphertexts = encrypted_model
            tmp = self.output_dir / (ENCRYPTED_MODEL_FILE + ".tmp.npz")
            np.savez(tmp, header=header, ciphertexts=ciphertexts)
            os.replace(tmp, self.output_dir / ENCRYPTED_MODEL_FILE)
            final.model_file = ENCRYPTED_MODEL_FILE
        self.record.final = final
        self.record.run.status = "completed"
        self._write()
        if self.record.rounds:
            plot_rounds(self.record.rounds, self.output_dir / PLOT_FILE)
        self.observer.finished(self.record, self.artifacts())
        self._close_observer()

    def fail(self, error: str) -> None:
        """Mark the run failed with its reason (one line); no model is written."""
        self.record.run.status = "failed"
        self.record.run.error = error
        self._write()
        self.observer.failed(self.record, self.artifacts())
        self._close_observer()

    def artifacts(self) -> list[Path]:
        """The run's files on disk that results.json names or that describe it."""
        names = [RESULTS_FILE, CONFIG_FILE, PLOT_FILE]
        final = self.record.final
        if final is not None:
            names += [final.model_file, final.int8_model.file if final.int8_model else None]
        return [self.output_dir / n for n in names if n and (self.output_dir / n).is_file()]

    def _close_observer(self) -> None:
        """After the last record: let the observer finish, and write what it reports now
        (e.g. that tracking failed) if that changed."""
        written = self.record.run.tracking
        self.observer.close()
        if self.observer.tracking() != written:
            self._write()

    def _write(self) -> None:
        self.record.run.tracking = self.observer.tracking()
        tmp = self.output_dir / (RESULTS_FILE + ".tmp")
        tmp.write_text(self.record.to_json())
        os.replace(tmp, self.output_dir / RESULTS_FILE)


def plot_rounds(rounds: list[RoundRecord], path) -> None:
    """One PNG: accuracy (left) and loss (right) per round, centralized and federated.
    `path`: a file name or a binary file object (app/report.py embeds the PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    for scope, style in (("centralized", "o-"), ("federated", "s--")):
        for metric, ax in (("accuracy", ax_acc), ("loss", ax_loss)):
            points = [
                (r.round, getattr(r, scope)[metric])
                for r in rounds
                if metric in (getattr(r, scope) or {})
            ]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, label=scope, markersize=4)
    for ax, title in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if not ax_acc.lines:  # regression: no accuracy
        ax_acc.text(0.5, 0.5, "no accuracy (regression)", ha="center", transform=ax_acc.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
