"""What the minimal app's ServerApp and ClientApp share: the project's experiment config,
its data spec and model (core/), built the way the project builds them."""

from __future__ import annotations

from functools import lru_cache

from app.config import load_config
from core.data import data_spec
from core.models import build_model


@lru_cache(maxsize=4)
def experiment(overrides: str):
    cfg = load_config(overrides)
    return cfg, data_spec(cfg.dataset)


def model(overrides: str):
    cfg, spec = experiment(overrides)
    return build_model(cfg.model, spec, seed=cfg.seed)
