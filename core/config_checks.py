"""The checks of an experiment configuration that need the data spec or the model built.

They sit above core/config.py (which imports no task code, so core.data, core.models and
core.finetune can import it without a cycle) and below app/config.py, which runs them after the
schema checks: a data set too small for the federation, a partitioner asking for more classes
than there are, or a checkpoint that does not fit the configured model fails here, before any
training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from core.config import (
    ConfigError,
    ExperimentConfig,
    LocalDatasetConfig,
    PathologicalPartitionerConfig,
    Require,
    TextDatasetConfig,
)
from core.data import client_pool_size, data_spec
from core.finetune import FineTuneError, build_finetune_model
from core.hf_model import HFModelError


def check_data_ranges(cfg: ExperimentConfig) -> None:
    """Numbers that fit their type but not the configured data set."""
    d, p, n = cfg.dataset, cfg.partitioner, cfg.simulation.num_supernodes
    if not isinstance(d, LocalDatasetConfig):  # a hub data set's size is known once loaded
        return
    if isinstance(p, PathologicalPartitionerConfig):
        classes = data_spec(d).num_outputs
        if p.classes_per_partition > classes:
            raise ConfigError(
                "Invalid experiment configuration: partitioner.classes_per_partition="
                f"{p.classes_per_partition}: dataset={d.name} has only {classes} classes: "
                f"use 1..{classes}"
            )
    pool = client_pool_size(d, 0)  # the size does not depend on the seed
    if n > pool:
        raise ConfigError(
            f"Invalid experiment configuration: simulation.num_supernodes={n}: dataset={d.name} "
            f"has {pool} examples for the clients and every SuperNode needs at least one: use "
            f"at most {pool}"
        )


def check_finetune(cfg: ExperimentConfig, require: Require) -> None:
    """LoRA, checkpoint and trainable selection: the model is built here, so a checkpoint that
    does not fit the configured model fails before any training."""
    m = cfg.model
    require(m.lora.r >= 0, "model.lora.r", "must be >= 1 for LoRA adapters, or 0 for none")
    if m.lora.r > 0:
        require(m.lora.alpha > 0, "model.lora.alpha", "must be > 0")
        require(
            importlib.util.find_spec("peft") is not None,
            "model.lora.r",
            "LoRA adapters need peft: pip install -e '.[lora]'",
        )
    if m.pretrained is not None:
        require(
            Path(m.pretrained).expanduser().is_absolute(),
            "model.pretrained",
            "must be an absolute path: the ServerApp and ClientApps run from Flower's app "
            "folder, not from your checkout",
        )
    # The data spec of these is known from the config (a hub data set's needs the network);
    # model=hf: the model is loaded here, so a name_or_path that cannot be fails now.
    if isinstance(cfg.dataset, (LocalDatasetConfig, TextDatasetConfig)):
        try:
            model, _ = build_finetune_model(m, data_spec(cfg.dataset))
            if isinstance(cfg.dataset, TextDatasetConfig):
                _check_tokenizer_fits(cfg.dataset, model)
        except (FineTuneError, HFModelError) as err:
            raise ConfigError(f"Invalid experiment configuration: {err}") from err


def _check_tokenizer_fits(d: TextDatasetConfig, model) -> None:
    """Token ids the model has no embedding for, or more positions than it has, fail in a
    client's first batch as an IndexError deep inside the model: caught here instead."""
    from core.text import tokenizer_for

    config = model.hf.config
    tokens = len(tokenizer_for(d.tokenizer))
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and tokens > vocab:
        raise HFModelError(
            f"dataset.tokenizer={d.tokenizer!r} has {tokens} tokens but the model embeds "
            f"{vocab} (its config's vocab_size): use the model's own tokenizer "
            "(dataset.tokenizer=null)"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and d.max_length > positions:
        raise HFModelError(
            f"dataset.max_length={d.max_length} exceeds the model's {positions} positions "
            f"(max_position_embeddings): use dataset.max_length <= {positions}"
        )
