"""Loss and accuracy of a model on arrays: the server's centralized evaluation and the
clients' validation both use this, so the two report the same quantities."""

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
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        out = model(x)
        total_loss += float(criterion(out, y, reduction="sum"))
        if task == "classification":
            correct += int((out.argmax(dim=1) == y).sum())
    n = len(data)
    if task == "regression":
        total_loss /= data.y.shape[1]  # mse_loss(sum) adds over output dims too
    metrics = {"loss": total_loss / n}
    if task == "classification":
        metrics["accuracy"] = correct / n
    return metrics


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device=cuda but no CUDA device is visible: use cpu or auto")
        return torch.device("cuda")
    return torch.device("cpu")


def as_numpy_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
