"""The ServerApp's round loop in this process: `ExperimentServer` with the configured strategy
stack (strategies/factory.py), recorded by the real `RunRecorder`, over real clients built by
the ClientApp's `build_client` and reached through `InProcessProxy`. No Ray, no processes: the
unit tier's way to run a whole experiment (the `flwr run` path is the e2e tier's)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.common import Context, RecordDict, ndarrays_to_parameters

from app.client_app import build_client
from app.config import load_config
from app.experiment_server import ExperimentServer, NodeTrackingClientManager
from app.server_app import federated_evaluation_every, finish_run
from core.config import ExperimentConfig
from core.data import centralized_test_split, data_spec, load_client_data
from core.evaluation import evaluate
from core.finetune import build_finetune_model
from core.models import get_weights, set_weights
from core.results import RunRecorder
from protections.he.config import he_params
from protections.he.context import HE_SECRET_PATH_KEY, load_context, provision
from strategies.factory import build_strategy, evaluates_with_train
from tests.support.proxies import InProcessProxy


@dataclass
class InProcessRun:
    cfg: ExperimentConfig
    server: ExperimentServer
    recorder: RunRecorder
    model: torch.nn.Module
    wire: list[str] | None
    path: Path
    evaluate_model: Callable[[torch.nn.Module], dict[str, float]]
    history: Any = None
    started: float = field(default_factory=time.perf_counter)

    def fit(self, num_rounds: int | None = None) -> InProcessRun:
        self.history, _ = self.server.fit(num_rounds=num_rounds or self.cfg.num_rounds, timeout=None)
        return self

    def finish(self) -> InProcessRun:
        """The ServerApp's end of run (app/server_app.py finish_run): final, model, int8 copy."""
        num_nodes = len(self.server.client_manager().all())
        finish_run(self.server, self.recorder, self.model, self.wire, num_nodes, self.started,
                   self.path, self.evaluate_model)  # fmt: skip
        return self


def in_process_run(
    overrides: str,
    path: Path,
    *,
    num_nodes: int = 2,
    node_ids: list[int] | None = None,
    seed: int | None = None,
    checkpoint_fn=None,
    centralized_test: bool = False,
    token: str = "t",
    observer=None,
    resume=None,
) -> InProcessRun:
    """A run of `overrides` over `num_nodes` in-process clients (partition i on node
    `node_ids[i]`, default 100 + i), written to `path`. `seed`: the client manager's sampling
    seed (None: Flower's sampling). The server evaluates on partition 0's training split, or
    with `centralized_test` on the data set's centralized test split (as the ServerApp does).
    `token`: the run token the recorder writes (what app.sweep's verdict checks); `observer`:
    the recorder's (core.results.RunObserver: the MLflow tracker, tests/test_tracking.py).
    `resume`: an app.checkpoint.Checkpoint the run continues from, as the ServerApp's
    `resume=true` does (under HE with the keys already in `path/keys`)."""
    cfg = load_config(overrides)
    spec = data_spec(cfg.dataset)
    if centralized_test:
        test = centralized_test_split(cfg.dataset, cfg.seed)
    else:
        test = load_client_data(cfg.dataset, cfg.partitioner, 0, num_nodes, cfg.seed)[0]
    model, wire = build_finetune_model(cfg.model, spec, seed=cfg.seed)
    eval_model = build_finetune_model(cfg.model, spec, seed=cfg.seed)[0]

    def evaluate_model(m):
        return evaluate(m, test, spec.task, torch.device("cpu"))

    def evaluate_centrally(server_round, weights, config):
        set_weights(eval_model, weights, wire)
        metrics = evaluate_model(eval_model)
        return metrics.pop("loss"), metrics

    started = time.perf_counter()
    he_context, he_client_config = None, None
    if cfg.secagg.name == "he":  # keys as the ServerApp provisions them in simulation, here in-process
        keys = Path(path) / "keys"
        if resume is not None:  # the first run's keys, as the ServerApp reuses them
            secret_path, public_path = keys / "secret.ctx", keys / "public.ctx"
        else:
            secret_path, public_path = provision(he_params(cfg), keys)
        he_context, he_client_config = load_context(public_path), {HE_SECRET_PATH_KEY: str(secret_path)}
    strategy = build_strategy(
        cfg, ndarrays_to_parameters(get_weights(model, wire)),
        evaluate_centrally,
        he_context=he_context, he_client_config=he_client_config,
    )  # fmt: skip
    recorder = RunRecorder(path, cfg, token=token, observer=observer,
                           resumed=None if resume is None else resume.results)  # fmt: skip
    manager = NodeTrackingClientManager(seed=seed)
    node_ids = node_ids or [100 + i for i in range(num_nodes)]
    for i in range(num_nodes):
        context = Context(
            run_id=1, node_id=node_ids[i], state=RecordDict(), run_config={},
            node_config={"partition-id": i, "num-partitions": num_nodes},
        )  # fmt: skip
        manager.register(InProcessProxy(str(node_ids[i]), build_client(cfg, context)))
    server = ExperimentServer(client_manager=manager, strategy=strategy, recorder=recorder,
                              checkpoint_fn=checkpoint_fn, resume=resume,
                              per_site_metrics=cfg.evaluation.per_site_enabled(cfg.privacy.name),
                              evaluate_every=federated_evaluation_every(cfg),
                              evaluate_with_train=evaluates_with_train(cfg))  # fmt: skip
    return InProcessRun(cfg, server, recorder, model, wire, Path(path), evaluate_model, started=started)
