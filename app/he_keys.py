"""Key holders' command line for HE secure aggregation.

    python -m app.he_keys provision --out keys/ [Hydra overrides, e.g. secagg.scale_bits=20]
        writes keys/secret.ctx (for SuperNodes, mode 600) and keys/public.ctx (for the server)
        from the `secagg` config group.
    python -m app.he_keys decrypt-model <run dir> [--secret-context keys/secret.ctx] [--out f] [--data file]
        decrypts a run's encrypted final model (model_encrypted.npz) into a PyTorch state_dict
        (default <run dir>/model.pt); the model is rebuilt from the run's config.yaml. With
        --data, scores that file with the decrypted model and prints its metrics (the server
        never could: app/predict.py, predictions next to the model).

The server never runs either command in a deployment: it gets public.ctx only. In simulation
the ServerApp runs `provision` in a child process, so no secret key is ever loaded into the
server's own process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from app.config import load_config, schema_for, to_experiment_config, with_option
from core.config import ExperimentConfig
from protections.he.config import he_params
from protections.he.context import SECRET_FILE, load_context, provision
from core.results import CONFIG_FILE, ENCRYPTED_MODEL_FILE, MODEL_FILE


def run_config(run_dir: Path) -> ExperimentConfig:
    saved = OmegaConf.load(run_dir / CONFIG_FILE)
    return to_experiment_config(OmegaConf.merge(schema_for(saved), saved))


def decrypt_run_model(run_dir: Path, secret_context: Path, out: Path) -> Path:
    from core.data import data_spec
    from core.finetune import build_finetune_model, merged_model
    from core.models import get_weights, set_weights
    from protections.he.client import decrypt_model

    cfg = run_config(run_dir)
    # Fine-tuning: frozen tensors come from the checkpoint, only the trainable ones were encrypted.
    model, wire = build_finetune_model(cfg.model, data_spec(cfg.dataset), seed=cfg.seed)
    with np.load(run_dir / ENCRYPTED_MODEL_FILE) as stored:
        payload = [stored["header"], stored["ciphertexts"]]
    shapes = [a.shape for a in get_weights(model, wire)]
    # Checked as clients check it (MAC, weight, range); client-level DP noise is expected.
    noise = cfg.privacy.name == "client_fixed"
    set_weights(model, decrypt_model(load_context(secret_context), payload, shapes, allow_noise=noise), wire)
    torch.save(merged_model(model).state_dict(), out)  # LoRA: adapters merged, as model.pt
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.he_keys", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("provision", help="generate a secret and a public context")
    p.add_argument("--out", type=Path, required=True, help="directory for secret.ctx, public.ctx")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the secagg group")
    d = commands.add_parser("decrypt-model", help="decrypt a run's encrypted final model")
    d.add_argument("run_dir", type=Path)
    d.add_argument("--secret-context", type=Path, help="default: <run dir>/keys/secret.ctx")
    d.add_argument("--out", type=Path, help=f"default: <run dir>/{MODEL_FILE}")
    d.add_argument("--data", type=Path, help="a labelled file to report the decrypted model's metrics on")
    args = parser.parse_args(argv)
    if args.command == "provision":
        secret, public = provision(he_params(load_config(with_option(args.overrides, "secagg", "he"))), args.out)
        print(f"secret context (SuperNodes only): {secret}\npublic context (server): {public}")
        return 0
    run_dir = args.run_dir
    secret = args.secret_context or run_dir / "keys" / SECRET_FILE
    out = decrypt_run_model(run_dir, secret, args.out or run_dir / MODEL_FILE)
    print(f"decrypted model: {out}")
    if args.data is not None:
        from app.predict import score

        predictions, metrics = score(run_dir, args.data, out.with_name("predictions.csv"), model_file=out)
        print(f"predictions: {predictions}")
        if metrics is None:
            print(f"{args.data} has no labels: no metrics")
        else:
            print("decrypted model on " + str(args.data) + ": " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
