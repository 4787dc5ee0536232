"""The final model for edge inference: dynamically quantized to int8 next to `model.pt`.

`torch.ao.quantization.quantize_dynamic` stores every Linear layer's weights as int8 with a
per-tensor scale and quantizes activations on the fly at inference; other layers (the cnn's
convolutions) stay float32. Sizes are measured as bytes of the files on disk (torch.save's zip
container included), never as the in-memory size of a state dict: for the default 4.8k-parameter
MLP the container's fixed overhead keeps the ratio near 2.5x; it nears 4x as models grow.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

INT8_MODEL_FILE = "model_int8.pt"


def quantize_linear_layers_int8(model: nn.Module) -> nn.Module:
    """A dynamically quantized copy of `model` (CPU; quantized kernels run there)."""
    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao's eager quantization as migrating to torchao, which is not
        # a dependency here; the API still works and is the one the issue asks for.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8
        )


def export_int8(
    model: nn.Module, output_dir: Path, evaluate_fn: Callable[[nn.Module], dict] | None
) -> dict:
    """Write `model_int8.pt` (its state_dict) and return its size on disk and, with
    `evaluate_fn`, its metrics on the server's test split."""
    quantized = quantize_linear_layers_int8(model)
    path = Path(output_dir) / INT8_MODEL_FILE
    torch.save(quantized.state_dict(), path)
    report: dict = {"file": INT8_MODEL_FILE, "bytes": path.stat().st_size}
    if evaluate_fn is not None:
        report["centralized"] = evaluate_fn(quantized)
    return report
