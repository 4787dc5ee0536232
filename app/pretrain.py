"""Pretrain a model centrally on the public split and save a checkpoint for fine-tuning.

    python -m app.pretrain --out /abs/ckpt.pt [--epochs 20] dataset.public_fraction=0.2 [overrides]

The public split is `dataset.public_fraction` of the non-test data, carved out before the
clients' partitions (core/data.py), so no client holds any of it: the pretrained model has seen
nothing private. The federated run then uses the same overrides plus
`model.pretrained=/abs/ckpt.pt` (and, e.g., `model.trainable=head`). The checkpoint stores the
state_dict with the architecture and data shape, so a run with another model fails clearly.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from app.config import load_config
from core.config import ConfigError, LocalDatasetConfig
from core.data import centralized_test_split, data_spec, public_split
from core.evaluation import evaluate, resolve_device
from core.finetune import save_checkpoint
from core.models import build_model
from core.training import train


def pretrain(overrides: list[str], out: Path, epochs: int) -> dict:
    cfg = load_config(overrides)
    if not isinstance(cfg.dataset, LocalDatasetConfig) or cfg.dataset.public_fraction <= 0:
        raise ConfigError(
            "python -m app.pretrain trains on the public split: set dataset.public_fraction "
            "(e.g. dataset.public_fraction=0.2), and the same value in the federated run"
        )
    if cfg.training.torch_threads > 0:
        torch.set_num_threads(cfg.training.torch_threads)
    spec = data_spec(cfg.dataset)
    data = public_split(cfg.dataset, cfg.seed)
    device = resolve_device(cfg.training.device)
    model = build_model(cfg.model, spec, seed=cfg.seed)
    result = train(
        model, data, replace(cfg.training, local_epochs=epochs), spec.task, device, seed=cfg.seed
    )
    metrics = evaluate(model, centralized_test_split(cfg.dataset, cfg.seed), spec.task, device)
    meta = {
        "dataset": cfg.dataset.name,
        "public_fraction": cfg.dataset.public_fraction,
        "seed": cfg.seed,
        "public_examples": len(data),
        "epochs": epochs,
        "train_loss": result.train_loss,
        "test": metrics,
    }
    save_checkpoint(out, model.cpu(), cfg.model, spec, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    parser.add_argument("--epochs", type=int, default=20, help="epochs over the public split")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for the federated run")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    try:
        meta = pretrain(args.overrides, args.out, args.epochs)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    test = " ".join(f"{k} {v:.4f}" for k, v in meta["test"].items())
    print(
        f"pretrained on {meta['public_examples']} public examples ({meta['epochs']} epochs): "
        f"test {test}\ncheckpoint: {args.out.resolve()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
