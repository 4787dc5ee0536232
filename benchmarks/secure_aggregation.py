"""Secure aggregation side by side: plaintext FedAvg, our HE aggregation, Flower's SecAgg+.

    python -m benchmarks.secure_aggregation [--rounds 4] [--supernodes 10] [--models digits,1m]
        [--modes plaintext,he,he-masks,secaggplus] [--json measurements.json] [--plot figure.png]

Each configuration is a full Flower simulation (`flwr.simulation.run_simulation`, Ray backend)
with the same ServerApp and the same clients; only the secure aggregation differs:
- plaintext: `DefaultWorkflow` with our strategy stack (FedAvg);
- HE:        the same with `secagg=he` (HomomorphicAggregation; keys provisioned up front),
             mode `he` without pairwise masks, `he-masks` with them (the default: self and
             pairwise masks, Shamir shares, one get_properties round trip before fit and
             one after, protections/he/masks.py);
- SecAgg+:   `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` and `secaggplus_mod` on
             the clients (Flower's masking protocol), our strategy stack otherwise.
All three run under Flower's legacy workflows so the round machinery is identical (our
`flwr run` app drives the same strategies through `start_grid`).

Measured per training round (federated evaluation off, so a round is sampling + local
training + secure aggregation): wall seconds of the fit workflow, and the bytes of every
message's records in both directions (arrays, and the bytes/numbers of config records, which
is where SecAgg+ carries its key shares), counted by a wrapper around the Grid. Round 1 carries
Ray's warm-up and is left out of the means. Prints one Markdown table; ratios are to plaintext
in the same run. Also prints bytes per parameter of one TenSEAL tutorial CKKS ciphertext
(N=8192, [60,40,40,60], 2^40) for the same model, as the reference point.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path


MODELS = {
    "digits": ("MLP [64] on digits", "model.hidden_sizes=[64]"),
    "1m": ("MLP [1000, 1000] on digits", "model.hidden_sizes=[1000,1000]"),
}
MODES = ("plaintext", "he", "he-masks", "secaggplus")
# The HE modes' overrides: without and with pairwise masks (dropout recovery, the default).
HE_MODES = {"he": "secagg=he secagg.pairwise_masks=false", "he-masks": "secagg=he secagg.pairwise_masks=true"}


def content_bytes(message) -> int:
    """Bytes a message carries: array data, and bytes/numbers/strings of config records."""
    from flwr.common import ArrayRecord

    if not message.has_content():
        return 0
    total = 0
    for record in message.content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
            continue
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


class CountingGrid:
    """Delegates to Flower's Grid and counts the bytes of what goes out and comes back."""

    def __init__(self, grid, stats: dict) -> None:
        import threading

        self._grid = grid
        self._stats = stats
        self._lock = threading.Lock()  # Flower's fit_clients (and the HE mask steps) call from threads

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        sent = sum(content_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        with self._lock:
            self._stats["bytes"] += sent + sum(content_bytes(m) for m in replies)
        return replies


def timed(workflow, stats: dict):
    def run(grid, context):
        stats["bytes"] = 0
        start = time.perf_counter()
        workflow(grid, context)
        stats["rounds"].append({"seconds": time.perf_counter() - start, "bytes": stats["bytes"]})

    return run


def make_apps(cfg, mode: str, keys_dir: Path, stats_file: Path, num_shares: int):
    from flwr.client import ClientApp
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.default_workflows import default_fit_workflow

    from app.client_app import build_client
    from core.data import data_spec
    from protections.he.context import HE_SECRET_PATH_KEY, PUBLIC_FILE, SECRET_FILE, load_context
    from core.models import build_model, get_weights
    from strategies.factory import build_strategy

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        model = build_model(cfg.model, data_spec(cfg.dataset), seed=cfg.seed)
        he_context, he_client_config = None, None
        if mode in HE_MODES:
            he_context = load_context(keys_dir / PUBLIC_FILE)
            he_client_config = {HE_SECRET_PATH_KEY: str(keys_dir / SECRET_FILE)}
        strategy = build_strategy(
            cfg, ndarrays_to_parameters(get_weights(model)), None, he_context, he_client_config
        )
        stats: dict = {"rounds": [], "bytes": 0}
        fit = default_fit_workflow
        if mode == "secaggplus":
            fit = SecAggPlusWorkflow(
                num_shares=num_shares, reconstruction_threshold=num_shares // 2 + 1
            )
        legacy = LegacyContext(
            context, config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy
        )
        DefaultWorkflow(fit_workflow=timed(fit, stats))(CountingGrid(grid, stats), legacy)
        stats_file.write_text(json.dumps(stats["rounds"]))

    mods = [secaggplus_mod] if mode == "secaggplus" else []
    client_app = ClientApp(client_fn=lambda context: build_client(cfg, context), mods=mods)
    return server_app, client_app


def run_one(cfg, mode, keys_dir, work, supernodes, num_shares) -> list[dict]:
    from flwr.simulation import run_simulation

    stats_file = work / f"{mode}-{time.monotonic_ns()}.json"
    server_app, client_app = make_apps(cfg, mode, keys_dir, stats_file, num_shares)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=supernodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return json.loads(stats_file.read_text())


def tenseal_tutorial_bytes_per_parameter(num_values: int) -> float:
    """One CKKS ciphertext at TenSEAL's tutorial parameters, for a slice of the model."""
    import numpy as np
    import tenseal as ts

    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    context.global_scale = 2**40
    n = min(num_values, 100_000)
    vector = ts.ckks_vector(context, np.random.default_rng(0).normal(0, 0.05, n).tolist())
    return len(vector.serialize()) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--supernodes", type=int, default=10)
    parser.add_argument("--models", default="digits,1m")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", type=Path, help="also write the measurements as JSON here")
    parser.add_argument("--plot", type=Path, help="also draw seconds and MB per round (PNG)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)

    from app.config import load_config
    from protections.he.config import he_params
    from protections.he.context import provision
    from core.models import build_model, num_parameters
    from core.data import data_spec

    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for key in args.models.split(","):
            label, model_override = MODELS[key]
            common = (
                f"{model_override} num_rounds={args.rounds} strategy.fraction_evaluate=0 "
                f"simulation.num_supernodes={args.supernodes}"
            )
            cfg_plain = load_config(common)
            params = num_parameters(build_model(cfg_plain.model, data_spec(cfg_plain.dataset)))
            sampled = max(cfg_plain.strategy.min_train_clients,
                          int(cfg_plain.strategy.fraction_train * args.supernodes))  # fmt: skip
            keys_dir = work / f"keys-{key}"
            provision(he_params(load_config(f"secagg=he {common}")), keys_dir)
            measured = {}
            for mode in args.modes.split(","):
                cfg = load_config(f"{common} {HE_MODES[mode]}" if mode in HE_MODES else common)
                print(f"# {label}, {mode}: {args.rounds} rounds ...", flush=True)
                rounds = run_one(cfg, mode, keys_dir, work, args.supernodes, sampled)
                later = rounds[1:] or rounds
                measured[mode] = (
                    statistics.mean(r["seconds"] for r in later),
                    statistics.mean(r["bytes"] for r in later),
                )
            base_s, base_b = measured.get("plaintext", (float("nan"), float("nan")))
            for mode, (seconds, nbytes) in measured.items():
                records.append({"model": label, "parameters": params, "aggregation": mode,
                                "seconds_per_round": seconds, "bytes_per_round": nbytes})  # fmt: skip
                rows.append(
                    f"| {label} ({params:,} params) | {mode} | {seconds:.2f} | "
                    f"{seconds / base_s:.2f}x | {nbytes / 1e6:.2f} | {nbytes / base_b:.1f}x | "
                    f"{nbytes / (2 * sampled * params):.1f} |"
                )
            rows.append(
                f"| {label} | TenSEAL tutorial CKKS (one ciphertext, for reference) | | | | | "
                f"{tenseal_tutorial_bytes_per_parameter(params):.1f} |"
            )
    print(
        f"\n{args.supernodes} SuperNodes, {sampled} sampled per round, 1 CPU per client, "
        f"means over rounds 2-{args.rounds}\n"
    )
    print("| model | aggregation | s / round | vs plaintext | MB / round | vs plaintext | B / param / message |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    if args.plot:
        plot(records, args.plot)


def plot(records: list[dict], path: Path) -> None:
    """Seconds and MB per round, one group of bars per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    modes = list(dict.fromkeys(r["aggregation"] for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.8 / len(modes)
    for ax, key, scale, title in (
        (axes[0], "seconds_per_round", 1.0, "seconds per round"),
        (axes[1], "bytes_per_round", 1e-6, "MB per round"),
    ):
        for i, mode in enumerate(modes):
            values = [
                next(r[key] * scale for r in records if r["model"] == m and r["aggregation"] == mode)
                for m in models
            ]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=mode)
        ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(models))])
        ax.set_xticklabels([m.replace(" on digits", "") for m in models], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title + " (log scale)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    main()
