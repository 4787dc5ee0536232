"""Write the results contract of DESIGN.md into a run's output directory.

- `config.yaml`: the resolved configuration (written before round 1);
- `results.json`: `{"rounds": [...], "final": {...}}`, rewritten after every round so a run
  that dies still leaves what it measured (parts that were not measured are omitted);
- `metrics.png`: accuracy and loss per round;
- `model.pt`: the final global model's state_dict (LoRA: adapters merged, app/finetune.py);
  under secagg=he the server cannot decrypt it and writes `model_encrypted.npz` (the payload)
  instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.config import ExperimentConfig, resolved_yaml

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
PLOT_FILE = "metrics.png"
MODEL_FILE = "model.pt"
ENCRYPTED_MODEL_FILE = "model_encrypted.npz"  # secagg=he: `python -m app.he_keys decrypt-model`


class RunRecorder:
    def __init__(self, output_dir: Path, cfg: ExperimentConfig) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"rounds": [], "final": {}}
        (self.output_dir / CONFIG_FILE).write_text(resolved_yaml(cfg))

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.results["rounds"]

    def set_initial(self, centralized: dict[str, float]) -> None:
        """Centralized metrics of the initial model (before round 1)."""
        self.results["initial"] = {"centralized": centralized}
        self._write()

    def add_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        self._write()

    def finish(
        self,
        final: dict[str, Any],
        model: nn.Module | None,
        encrypted_model: list[np.ndarray] | None = None,
    ) -> None:
        if model is not None:
            torch.save(model.state_dict(), self.output_dir / MODEL_FILE)
            final["model_file"] = MODEL_FILE
            final["model_bytes"] = (self.output_dir / MODEL_FILE).stat().st_size  # on disk
        if encrypted_model is not None:
            header, ciphertexts = encrypted_model
            np.savez(self.output_dir / ENCRYPTED_MODEL_FILE, header=header, ciphertexts=ciphertexts)
            final["model_file"] = ENCRYPTED_MODEL_FILE
        self.results["final"] = final
        self._write()
        if self.rounds:
            plot_rounds(self.rounds, self.output_dir / PLOT_FILE)

    def _write(self) -> None:
        tmp = self.output_dir / (RESULTS_FILE + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2))
        os.replace(tmp, self.output_dir / RESULTS_FILE)


def plot_rounds(rounds: list[dict[str, Any]], path: Path) -> None:
    """One PNG: accuracy (left) and loss (right) per round, centralized and federated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    for scope, style in (("centralized", "o-"), ("federated", "s--")):
        for metric, ax in (("accuracy", ax_acc), ("loss", ax_loss)):
            points = [(r["round"], r[scope][metric]) for r in rounds if metric in r.get(scope, {})]
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
