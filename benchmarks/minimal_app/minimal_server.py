"""Minimal ServerApp: Flower's Message API FedAvg over the project's default experiment,
centralized evaluation every round, each round's wall time into results.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from core.data import centralized_test_split
from core.evaluation import evaluate
from minimal_task import experiment, model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    overrides = str(context.run_config["overrides"])
    cfg, spec = experiment(overrides)
    s = cfg.strategy
    net = model(overrides)
    test = centralized_test_split(cfg.dataset, cfg.seed)
    stamps: list[tuple[int, float, dict]] = []  # (round, when its central evaluation ended, metrics)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(net, test, spec.task, torch.device("cpu"))
        stamps.append((server_round, time.perf_counter(), metrics))
        return MetricRecord(metrics)

    strategy = FedAvg(
        fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_clients, min_evaluate_nodes=s.min_evaluate_clients,
        min_available_nodes=s.min_available_clients,
    )  # fmt: skip
    started = time.perf_counter()
    strategy.start(
        grid=grid, initial_arrays=ArrayRecord(net.state_dict()), num_rounds=cfg.num_rounds,
        train_config=ConfigRecord({}), evaluate_fn=central,
    )  # fmt: skip
    # Round r: from the end of round r-1's central evaluation (round 0: the initial model's)
    # to the end of its own: train, federated evaluation, central evaluation.
    rounds = [
        {"round": r, "seconds": t - t_prev, "centralized": m}
        for (_, t_prev, _), (r, t, m) in zip(stamps, stamps[1:])
    ]
    out = str(context.run_config.get("output-dir", ""))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        final = {"centralized": stamps[-1][2], "seconds_total": time.perf_counter() - started}
        (Path(out) / "results.json").write_text(json.dumps({"rounds": rounds, "final": final}, indent=1))
