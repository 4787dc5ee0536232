"""Use a trained model: score a file with a run's model, or export it for serving.

    python -m app.predict <run dir> <file> [--out predictions.csv] [--model model.pt]
        scores every row of <file> with the run's final model and writes one line per row
        (default <run dir>/predictions.csv): `row` (its position in the file), `prediction`
        (the class name, dataset.classes, or the value) and for classification `p_<class>`,
        each class's probability. When the file has labels it also prints the metrics
        (core/evaluation.py, with the run's evaluation.threshold) and writes them next to the
        predictions (`<out>.metrics.json`).
    python -m app.predict <run dir> --export [--out model.pt2]
        writes the model as a torch.export program (default <run dir>/model.pt2) that
        `torch.export.load(path).module()` runs on a batch of any size, without this package.

The bundle is the run directory itself: `config.yaml` (the architecture: model and data set
config; the preprocessing: dataset=tabular's schema, columns, categories, missing-value policy
and standardization; the label names: dataset.classes) and `model.pt` (the weights; LoRA
adapters merged, so the architecture is the plain model's). Under secagg=he the run holds only
`model_encrypted.npz`: a key holder decrypts it first (`python -m app.he_keys decrypt-model
<run dir> --data <file>` writes model.pt and prints its metrics on that file).

Files: under dataset=tabular a CSV or Parquet with the schema's columns, read and checked as a
site's file (the label column is optional; `standardize=client` scales the file by its own
statistics, as every site and the server's test file are, which needs 30 rows; `--stats-from
<site's training file>` scales by that file's statistics instead, for a few rows or one patient;
a row with an empty label is scored and left out of the metrics); under dataset=imagefolder a folder
of class folders (`row` is the image's position in the listing); for the other data sets an
`.npz` with `x` (n, features) and optionally `y`.

Why torch.export and not ONNX or TorchScript: ONNX export in torch 2.13 goes through the
`onnx` and `onnxscript` packages, which are not dependencies of this project; TorchScript
(`torch.jit`) is deprecated in favour of torch.export. A `.pt2` program is served with
PyTorch alone (or compiled ahead of time with AOTInductor).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

from core.config import ExperimentConfig, ImageFolderDatasetConfig, TabularDatasetConfig
from core.data_types import ArraySplit
from core.results import CONFIG_FILE, ENCRYPTED_MODEL_FILE, MODEL_FILE

PREDICTIONS_FILE = "predictions.csv"
EXPORT_FILE = "model.pt2"


class PredictError(ValueError):
    """A run or a file that cannot be scored, with the reason and the fix."""


def run_config(run_dir: Path) -> ExperimentConfig:
    """The run's configuration, from its config.yaml (read into the option schemas)."""
    from omegaconf import OmegaConf

    from app.config import schema_for, to_experiment_config

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise PredictError(f"{run_dir} has no {CONFIG_FILE}: give the output_dir of a finished run")
    saved = OmegaConf.load(path)
    return to_experiment_config(OmegaConf.merge(schema_for(saved), saved))


def load_model(run_dir: Path, model_file: Path | None = None) -> tuple[torch.nn.Module, ExperimentConfig]:
    """The run's final model (eval mode, CPU), rebuilt from config.yaml and its weights."""
    from core.data import data_spec
    from core.models import build_model

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    path = Path(model_file) if model_file is not None else run_dir / MODEL_FILE
    if not path.is_file():
        if (run_dir / ENCRYPTED_MODEL_FILE).exists():
            raise PredictError(
                f"{run_dir} holds the encrypted model only ({ENCRYPTED_MODEL_FILE}, secagg=he): a key "
                f"holder decrypts it first, python -m app.he_keys decrypt-model {run_dir}"
            )
        raise PredictError(f"{path} does not exist: give the output_dir of a run that finished")
    # The plain architecture: model.pt holds LoRA adapters merged into their base layers
    # (core/finetune.py merged_model), and every weight, so no pretrained checkpoint is read.
    model = build_model(cfg.model, data_spec(cfg.dataset))
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise PredictError(f"{path} does not fit the model config.yaml describes: {err}") from None
    return model.eval(), cfg


def read_file(
    path: Path, cfg: ExperimentConfig, stats_from: Path | None = None
) -> tuple[ArraySplit, np.ndarray | None, np.ndarray]:
    """(rows, which rows have a label (None: none has), their positions in the file)."""
    from core.data import data_spec

    path = Path(path).expanduser()
    if isinstance(cfg.dataset, TabularDatasetConfig):
        from core.tabular import prediction_file

        return prediction_file(path, cfg.dataset, stats_from)
    if stats_from is not None:
        raise PredictError(f"--stats-from applies to dataset=tabular only (this run: dataset={cfg.dataset.name})")
    if isinstance(cfg.dataset, ImageFolderDatasetConfig):  # a folder of class folders: labelled
        from core.images import read_folder

        x, y, _ = read_folder(path, cfg.dataset, "file")
        return ArraySplit(x, y), np.ones(len(y), dtype=bool), np.arange(len(y))
    if path.suffix != ".npz" or not path.is_file():
        raise PredictError(f"{path}: dataset={cfg.dataset.name} is scored from an .npz file with x (and y)")
    spec = data_spec(cfg.dataset)
    with np.load(path, allow_pickle=False) as npz:
        if "x" not in npz.files:
            raise PredictError(f"{path} has no array x (it has {sorted(npz.files)})")
        x = npz["x"].astype(np.float32)
        y = npz["y"] if "y" in npz.files else None
    x = x.reshape(len(x), -1)
    if x.shape[1] != spec.num_features or not np.isfinite(x).all():
        raise PredictError(
            f"{path}: x has shape {x.shape}; dataset={cfg.dataset.name} needs (n, "
            f"{spec.num_features}) finite features, scaled as the data set's"
        )
    if y is None:
        return ArraySplit(x, np.zeros(len(x), np.int64)), None, np.arange(len(x))
    y = y.reshape(len(y), -1) if spec.task == "regression" else y.reshape(-1)
    if len(y) != len(x):
        raise PredictError(f"{path}: {len(x)} rows of x but {len(y)} labels y")
    if spec.task == "classification":
        if not (np.mod(y, 1) == 0).all() or y.min() < 0 or y.max() >= spec.num_outputs:
            raise PredictError(f"{path}: labels y must be class ids in 0..{spec.num_outputs - 1}")
        y = y.astype(np.int64)
    else:
        y = y.astype(np.float32)
    return ArraySplit(x, y), np.ones(len(y), dtype=bool), np.arange(len(x))


def class_names(cfg: ExperimentConfig, num_outputs: int) -> list[str]:
    classes = getattr(cfg.dataset, "classes", None)
    return list(classes) if classes else [str(k) for k in range(num_outputs)]


@torch.no_grad()
def score(
    run_dir: Path, file: Path, out: Path | None = None, model_file: Path | None = None,
    stats_from: Path | None = None,
) -> tuple[Path, dict[str, float] | None]:
    """Write the predictions of every row of `file` (module docstring); return their path
    and the metrics of the rows that have a label (None when none has)."""
    from core.data import data_spec
    from core.evaluation import evaluate

    model, cfg = load_model(run_dir, model_file)
    rows, labelled, positions = read_file(file, cfg, stats_from)
    spec = data_spec(cfg.dataset)
    outputs = torch.cat([model(torch.from_numpy(rows.x[i : i + 512])) for i in range(0, len(rows), 512)])
    out = Path(out) if out is not None else Path(run_dir) / PREDICTIONS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        if spec.task == "classification":
            names = class_names(cfg, spec.num_outputs)
            probs = torch.softmax(outputs.float(), dim=1).numpy()
            threshold = cfg.evaluation.threshold
            if spec.num_outputs == 2:  # the run's decision threshold, as its metrics use
                decided = (probs[:, 1] >= threshold).astype(int)
            else:
                decided = probs.argmax(axis=1)
            writer.writerow(["row", "prediction", *[f"p_{n}" for n in names]])
            for pos, k, p in zip(positions, decided, probs):
                writer.writerow([int(pos), names[k], *[f"{v:.6g}" for v in p]])
        else:
            values = outputs.float().numpy().reshape(len(rows), -1)
            writer.writerow(["row", *(["prediction"] if values.shape[1] == 1 else [f"prediction_{j}" for j in range(values.shape[1])])])
            for pos, v in zip(positions, values):
                writer.writerow([int(pos), *[f"{x:.6g}" for x in v]])
    metrics = None
    if labelled is not None and labelled.any():  # metrics of the labelled rows only
        scored = ArraySplit(rows.x[labelled], rows.y[labelled])
        metrics = evaluate(model, scored, spec.task, torch.device("cpu"), threshold=cfg.evaluation.threshold,
                           calibration_bins=cfg.evaluation.calibration_bins)  # fmt: skip
        metrics["num_examples"] = float(len(scored))
        metrics["unlabelled_rows"] = float(len(rows) - len(scored))
        Path(f"{out}.metrics.json").write_text(json.dumps(metrics, indent=1))
    return out, metrics


def export(run_dir: Path, out: Path | None = None, model_file: Path | None = None) -> Path:
    """The model as a torch.export program with a dynamic batch size (module docstring)."""
    from core.data import data_spec

    model, cfg = load_model(run_dir, model_file)
    spec = data_spec(cfg.dataset)
    example = torch.zeros((2, spec.num_features), dtype=torch.float32)  # models take flat rows
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    out = Path(out) if out is not None else Path(run_dir) / EXPORT_FILE
    torch.export.save(program, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's output_dir")
    parser.add_argument("file", type=Path, nargs="?", help="the file to score")
    parser.add_argument("--export", action="store_true", help=f"write the model as {EXPORT_FILE}")
    parser.add_argument("--out", type=Path, help="where to write the predictions or the program")
    parser.add_argument("--model", type=Path, help=f"the weights (default <run dir>/{MODEL_FILE})")
    parser.add_argument("--stats-from", type=Path, help="dataset=tabular: a file (the site's training file) whose "
                        "statistics impute and scale the scored rows, instead of the scored file's own")
    args = parser.parse_args(argv)
    if args.export == (args.file is not None):
        parser.error("give a file to score, or --export (one of them)")
    try:
        if args.export:
            print(f"exported: {export(args.run_dir, args.out, args.model)}")
            return 0
        out, metrics = score(args.run_dir, args.file, args.out, args.model, args.stats_from)
    except (PredictError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"predictions: {out}")
    if metrics is not None:
        print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
