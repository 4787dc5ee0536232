"""Loss and accuracy of a model on arrays: the server's centralized evaluation and the
clients' validation both use this, so the two report the same quantities.

Binary classifiers (two outputs: dataset=tabular task=binary, breast_cancer) also report what
a clinical reader asks for, computed by scikit-learn from the whole split's predictions:
`auroc` (roc_auc_score of the class-1 probability), `sensitivity` (recall of class 1) and
`specificity` (recall of class 0) at the argmax decision (probability 0.5). A metric the split
cannot define (AUROC with one class present, sensitivity without positives, specificity
without negatives) is left out rather than reported as a number. Federated evaluation
reports each client's own values, and the server's example-weighted mean of them
(strategies/factory.py weighted_metrics) approximates the pooled figure; the centralized
evaluation on dataset.test_path is the exact one."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from core.data import ArraySplit


def loss_fn(task: str):
    return F.cross_entropy if task == "classification" else F.mse_loss


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ArraySplit, task: str, device: torch.device, batch_size: int = 512
) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over `data`."""
    if len(data) == 0:
        return {}
    model.eval()
    criterion = loss_fn(task)
    total_loss, correct, positive_prob, predicted = 0.0, 0, [], []
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        out = model(x)
        total_loss += float(criterion(out, y, reduction="sum"))
        if task == "classification":
            correct += int((out.argmax(dim=1) == y).sum())
            if out.shape[1] == 2:
                positive_prob.append(torch.softmax(out.float(), dim=1)[:, 1].cpu().numpy())
                predicted.append(out.argmax(dim=1).cpu().numpy())
    n = len(data)
    if task == "regression":
        total_loss /= data.y.shape[1]  # mse_loss(sum) adds over output dims too
    metrics = {"loss": total_loss / n}
    if task == "classification":
        metrics["accuracy"] = correct / n
    if positive_prob:
        metrics.update(binary_metrics(data.y, np.concatenate(positive_prob), np.concatenate(predicted)))
    return metrics


def binary_metrics(y: np.ndarray, positive_prob: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """AUROC, sensitivity and specificity (see the module docstring), each only where the
    labels define it."""
    from sklearn.metrics import recall_score, roc_auc_score

    metrics: dict[str, float] = {}
    present = set(np.unique(y).tolist())
    if present == {0, 1}:
        metrics["auroc"] = float(roc_auc_score(y, positive_prob))
    if 1 in present:
        metrics["sensitivity"] = float(recall_score(y, predicted, pos_label=1))
    if 0 in present:
        metrics["specificity"] = float(recall_score(y, predicted, pos_label=0))
    return metrics


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device=cuda but no CUDA device is visible: use cpu or auto")
        return torch.device("cuda")
    return torch.device("cpu")


def as_numpy_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
