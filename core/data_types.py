"""The two data types every layer passes around: what a model needs to know about the data
(`DataSpec`) and a split of arrays (`ArraySplit`). Their own module, below core/data.py and
core/tabular.py, so that neither has to import the other for them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data."""

    task: str  # classification | regression
    num_features: int
    num_outputs: int  # classes, or 1 for regression
    image_shape: tuple[int, ...] | None = None  # (C, H, W) when features are images


@dataclass(frozen=True)
class ArraySplit:
    x: np.ndarray  # float32 (n, num_features)
    y: np.ndarray  # int64 (n,) for classification, float32 (n, 1) for regression

    def __len__(self) -> int:
        return len(self.y)
