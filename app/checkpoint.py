"""A checkpoint of the server after every round, and `resume=true` from it.

What is saved (in `<output_dir>/checkpoint/`, replaced atomically after each round, so a
crash, a kill or a full disk loses at most the round in progress and never leaves a torn
file): the global model, the round number, the results recorded so far, the resolved config,
and each strategy layer's state (`StrategyWrapper.state_dict`: the DP accountant's composed
releases, the adaptive clipping norm, FedAdam's moments, FedAvgM's momentum). Arrays go to an
`.npz` read with `allow_pickle=False`; everything else to JSON: loading a checkpoint never
executes code.

Resume refuses what it cannot restore honestly: another configuration (only `num_rounds` may
grow) and `privacy=local|dpsgd` (each client's accountant lives in that run's Flower contexts,
which a new run does not have: resuming would restart their epsilon at 0).

Under `secagg=he` the checkpointed global model is the encrypted aggregate, so a resumed run
needs the first run's keys: in simulation the ServerApp reuses `<output_dir>/keys` instead of
provisioning new ones (app/server_app.py prepare_he_keys), in deployment the operator names
the same `secagg.public_context` (the config check already insists on the same value). The HE
layer's state carries the keys' fingerprint and refuses other keys naming both
(protections/he/server.py `load_state_dict`), with the seeds already summed (a ciphertext
replayed from before the restart is still refused) and the last model the clients accepted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
ARRAY_REF = "__array__"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from, with the reason and the fix."""


@dataclass
class Checkpoint:
    server_round: int
    parameters: list[np.ndarray]
    strategy_state: dict[str, Any]
    results: dict[str, Any]
    config_yaml: str


def _split(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """JSON-able copy of `value` with every ndarray moved into `arrays` (by reference)."""
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {ARRAY_REF: key}
    if isinstance(value, dict):
        return {k: _split(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, arrays) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _join(value: Any, arrays) -> Any:
    if isinstance(value, dict):
        if set(value) == {ARRAY_REF}:
            return arrays[value[ARRAY_REF]]
        return {k: _join(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, arrays) for v in value]
    return value


def save(output_dir: Path, server_round: int, parameters: list[np.ndarray],
         strategy_state: dict, results: dict, config_yaml: str) -> Path:  # fmt: skip
    """Write the checkpoint of `server_round`; the previous one stays whole until the new
    one is complete (both files are written to temporaries, then renamed, state last)."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    state = {
        "round": server_round,
        "parameters": _split(list(parameters), arrays),
        "strategy": _split(strategy_state, arrays),
        "results": results,
        "config": config_yaml,
    }
    name = f"arrays-{server_round}.npz"
    tmp = folder / f"{name}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, folder / name)
    state["arrays_file"] = name
    tmp_state = folder / f"{STATE_FILE}.tmp"
    tmp_state.write_text(json.dumps(state))
    os.replace(tmp_state, folder / STATE_FILE)
    for old in folder.glob("arrays-*.npz"):  # the state now points at the new arrays
        if old.name != name:
            old.unlink()
    return folder


def load(output_dir: Path) -> Checkpoint:
    folder = Path(output_dir) / CHECKPOINT_DIR
    path = folder / STATE_FILE
    if not path.exists():
        raise CheckpointError(
            f"resume=true but {path} does not exist: resume needs the output_dir of a run "
            "that completed at least one round"
        )
    state = json.loads(path.read_text())
    with np.load(folder / state["arrays_file"], allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return Checkpoint(
        server_round=int(state["round"]),
        parameters=list(_join(state["parameters"], arrays)),
        strategy_state=_join(state["strategy"], arrays),
        results=state["results"],
        config_yaml=state["config"],
    )


def check_resumable(checkpoint: Checkpoint, cfg, config_yaml: str) -> None:
    """Refuse a resume that would change the experiment or lose privacy state (`tracking.*`
    may change: it does not touch the experiment)."""
    from omegaconf import OmegaConf

    if cfg.privacy.name in ("local", "dpsgd"):
        raise CheckpointError(
            f"resume is refused under privacy={cfg.privacy.name}: each client's accountant "
            "lives in the first run's Flower contexts, so a resumed run would restart their "
            "epsilon at 0. Start a new run instead"
        )
    from app.config import schema_for

    saved = OmegaConf.create(checkpoint.config_yaml)
    # Merged into the option schemas: a key this version added (absent from an older
    # checkpoint) takes its default, so only a value that differs refuses the resume.
    old = OmegaConf.to_container(OmegaConf.merge(schema_for(saved), saved), resolve=True)
    new = OmegaConf.to_container(OmegaConf.create(config_yaml))
    for c in (old, new):
        c.pop("num_rounds", None)
        c.pop("resume", None)
        c.pop("tracking", None)  # where the run is tracked does not change the experiment
    if old != new:
        changed = sorted(_diff(old, new))
        raise CheckpointError(
            f"resume=true with another configuration than the checkpoint's ({', '.join(changed)} "
            "changed): only num_rounds may change; use the first run's overrides"
        )
    if cfg.num_rounds <= checkpoint.server_round:
        raise CheckpointError(
            f"the checkpoint is at round {checkpoint.server_round} and num_rounds="
            f"{cfg.num_rounds}: nothing left to run; raise num_rounds"
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
