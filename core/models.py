"""Models (`model=linear|mlp|cnn`, and `model=hf`: core/hf_model.py) and the parameter <->
NumPy conversion both sides share.

No BatchNorm anywhere: Opacus DP-SGD needs per-sample gradients, which BatchNorm mixes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.config import ModelConfig
from core.data import DataSpec


class CNN(nn.Module):
    """Small conv net for 1x8x8 digit images (flattened input is reshaped here)."""

    def __init__(self, spec: DataSpec, channels: list[int], hidden_sizes: list[int]):
        super().__init__()
        if spec.image_shape is None:
            raise ValueError("model=cnn needs image data (dataset=digits)")
        self.image_shape = spec.image_shape
        in_ch, height, width = spec.image_shape
        convs: list[nn.Module] = []
        for out_ch in channels:
            convs += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU()]
            in_ch = out_ch
        convs.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*convs)
        self.head = _mlp(in_ch * (height // 2) * (width // 2), hidden_sizes, spec.num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, *self.image_shape)
        return self.head(torch.flatten(self.features(x), 1))


def _mlp(num_in: int, hidden_sizes: list[int], num_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [nn.Linear(num_in, width), nn.ReLU()]
        num_in = width
    layers.append(nn.Linear(num_in, num_out))
    return nn.Sequential(*layers)


def build_model(cfg: ModelConfig, spec: DataSpec, seed: int | None = None) -> nn.Module:
    """Build the configured model; with `seed`, its initial weights are reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.name == "linear":
        return nn.Sequential(nn.Linear(spec.num_features, spec.num_outputs))
    if cfg.name == "mlp":
        return _mlp(spec.num_features, cfg.hidden_sizes, spec.num_outputs)
    if cfg.name == "cnn":
        return CNN(spec, cfg.channels, cfg.hidden_sizes)
    if cfg.name == "hf":
        from core.hf_model import build_hf_model  # transformers: imported for model=hf only

        return build_hf_model(cfg, spec)
    raise ValueError(f"model.name={cfg.name!r}: use linear, mlp, cnn or hf")


def get_weights(model: nn.Module, names: list[str] | None = None) -> list[np.ndarray]:
    """The model's state as NumPy arrays, in `state_dict` order (the wire order); with `names`
    only those tensors (fine-tuning: the trainable ones, core/finetune.py)."""
    state = model.state_dict()
    keys = list(state) if names is None else names
    return [state[k].detach().cpu().numpy().copy() for k in keys]


def set_weights(model: nn.Module, weights: list[np.ndarray], names: list[str] | None = None) -> None:
    """Load arrays in `state_dict` order (with `names`: into those tensors only, the others
    keep their values); a count or shape mismatch is a clear error."""
    state = model.state_dict()
    keys = list(state) if names is None else names
    if len(weights) != len(keys):
        raise ValueError(
            f"Received {len(weights)} arrays for a model with {len(keys)} "
            f"{'trainable ' if names is not None else ''}tensors: server and client disagree "
            "on the model (check model= and model.trainable= in both configs)"
        )
    new_state = dict(state)
    for name, array in zip(keys, weights):
        current = state[name]
        if tuple(current.shape) != tuple(array.shape):
            raise ValueError(
                f"Tensor {name!r}: received shape {tuple(array.shape)}, "
                f"model expects {tuple(current.shape)}"
            )
        # The server's decoded global model is read-only (protections/base.py GlobalModel):
        # torch would share, and warn about, its memory; copy it instead.
        read_only = isinstance(array, np.ndarray) and not array.flags.writeable
        convert = torch.tensor if read_only else torch.as_tensor
        new_state[name] = convert(array, dtype=current.dtype)
    model.load_state_dict(new_state, strict=True)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
