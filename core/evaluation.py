"""What a model scores on arrays: the server's centralized evaluation and the clients'
validation both use this, so the two report the same quantities.

Classification (README "Metrics"): `loss`, `accuracy` (argmax), macro `f1` (over the
classes present or predicted), `recall_<k>` for
each class k present in the split, and `ece`, the expected calibration error of the top-label
confidence over `calibration_bins` equal-width bins. Binary classifiers (two outputs:
dataset=tabular task=binary, breast_cancer) also report what a clinical reader asks for:
`auroc` (scikit-learn's roc_auc_score of the class-1 probability), and `sensitivity`,
`specificity` and `f1` at the decision `p(class 1) >= threshold` (evaluation.threshold,
default 0.5; `accuracy` stays the argmax one): there `f1` is class 1's F1, macro elsewhere.
Regression: `loss` (MSE), `mae`, `rmse` and `r2` (over every output value: with several
outputs scikit-learn's multioutput="variance_weighted"). A metric the split cannot define (AUROC with one class
present, sensitivity without positives, specificity without negatives, R2 without variance)
is left out rather than reported as a number.

Recall, F1 and ECE are a few lines of NumPy over the confusion counts instead of
scikit-learn calls: a ClientApp that trains on its own file does not import scikit-learn
(tests/test_imports.py; its import is seconds of every deployed message's cold start), and
tests/test_evaluation.py checks each against scikit-learn. Federated evaluation reports each
client's own values and the server's example-weighted mean of them
(strategies/factory.py weighted_metrics), which approximates the pooled figure; the
centralized evaluation (dataset.test_path, or the data set's test split) is the exact one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from core.data import ArraySplit

DEFAULT_THRESHOLD = 0.5
DEFAULT_BINS = 15
# The evaluation instructions that carry evaluation.threshold / calibration_bins to the
# clients (strategies/factory.py evaluate_config_fn sends them, clients/torch_client.py reads).
EVAL_THRESHOLD_KEY = "eval_threshold"
EVAL_BINS_KEY = "eval_calibration_bins"
# strategy.evaluate_with_train: a train instruction that asks the client to evaluate the model
# it received on its validation split before training (strategies/factory.py fit_config_fn),
# and the prefix of the fit reply's metrics that carry that evaluation ("eval/loss",
# "eval/num_examples", "eval/accuracy", ...; read by app/experiment_server.py).
EVALUATE_RECEIVED_KEY = "evaluate_received"
RECEIVED_EVAL_PREFIX = "eval/"


def loss_fn(task: str):
    return F.cross_entropy if task == "classification" else F.mse_loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ArraySplit,
    task: str,
    device: torch.device,
    batch_size: int = 512,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    calibration_bins: int = DEFAULT_BINS,
) -> dict[str, float]:
    """Mean loss and the task's metrics (module docstring) over `data`."""
    if len(data) == 0:
        return {}
    model.eval()
    criterion = loss_fn(task)
    total_loss, outputs = 0.0, []
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        out = model(x)
        total_loss += float(criterion(out, y, reduction="sum"))
        if task == "classification":
            outputs.append(torch.softmax(out.float(), dim=1).cpu().numpy())
        else:
            outputs.append(out.float().cpu().numpy())
    n = len(data)
    if task == "regression":
        total_loss /= data.y.shape[1]  # mse_loss(sum) adds over output dims too
        return {"loss": total_loss / n, **regression_metrics(data.y, np.concatenate(outputs))}
    probs = np.concatenate(outputs)
    return {
        "loss": total_loss / n,
        **classification_metrics(np.asarray(data.y), probs, threshold, calibration_bins),
    }


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, threshold: float = DEFAULT_THRESHOLD, bins: int = DEFAULT_BINS
) -> dict[str, float]:
    """accuracy, macro F1, per-class recall, ECE, and for two classes AUROC, sensitivity,
    specificity and F1 at `threshold` (module docstring), from class probabilities."""
    y = y.astype(np.int64)
    num_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    metrics = {"accuracy": float(np.mean(predicted == y))}
    present = np.unique(y)
    if num_classes == 2:
        decided = (probs[:, 1] >= threshold).astype(np.int64)
        metrics.update(binary_metrics(y, probs[:, 1], decided))
        recall, f1 = _recall_f1(y, decided, 2)
        metrics["f1"] = f1[1]
    else:
        recall, f1 = _recall_f1(y, predicted, num_classes)
        labels = np.union1d(present, predicted)  # scikit-learn's macro average: these labels
        metrics["f1"] = float(np.mean([f1[int(k)] for k in labels]))
    for k in present:
        metrics[f"recall_{int(k)}"] = recall[int(k)]
    metrics["ece"] = expected_calibration_error(y, probs, bins)
    return metrics


def _recall_f1(y: np.ndarray, predicted: np.ndarray, num_classes: int) -> tuple[list, list]:
    """Per-class recall and F1 from the confusion counts (0 where a class is never
    predicted nor present, as scikit-learn's zero_division=0)."""
    recall, f1 = [], []
    for k in range(num_classes):
        tp = float(np.sum((predicted == k) & (y == k)))
        fp = float(np.sum((predicted == k) & (y != k)))
        fn = float(np.sum((predicted != k) & (y == k)))
        recall.append(tp / (tp + fn) if tp + fn else 0.0)
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return recall, f1


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """sum over bins of (share of examples) * |accuracy - mean confidence|, for the
    top-label confidence in `bins` equal-width bins of (0, 1] (the first bin holds 0 too)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def regression_metrics(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R2 (1 - SSE / SST) over every output value; R2 only where y varies."""
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    err = np.asarray(predicted, np.float64).reshape(y.shape) - y
    metrics = {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2)))}
    sst = float(np.sum((y - y.mean(axis=0)) ** 2))
    if sst > 0:
        metrics["r2"] = 1.0 - float(np.sum(err**2)) / sst
    return metrics


def binary_metrics(y: np.ndarray, positive_prob: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """AUROC, sensitivity and specificity (see the module docstring), each only where the
    labels define it."""
    metrics: dict[str, float] = {}
    present = set(np.unique(y).tolist())
    if present == {0, 1} and np.isfinite(positive_prob).all():  # a diverged model: no AUROC
        from sklearn.metrics import roc_auc_score  # only for a binary task's AUROC

        metrics["auroc"] = float(roc_auc_score(y, positive_prob))
    if 1 in present:
        metrics["sensitivity"] = float(np.mean(predicted[y == 1] == 1))
    if 0 in present:
        metrics["specificity"] = float(np.mean(predicted[y == 0] == 0))
    return metrics


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device=cuda but no CUDA device is visible: use cpu or auto")
        return torch.device("cuda")
    return torch.device("cpu")


def as_numpy_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
