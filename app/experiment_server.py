"""The round loop: Flower's legacy `Server` with every round recorded and logged.

`flwr.server.Server.fit` keeps its measurements in a `History` and logs Flower's own lines; we
need per-round wall time, traffic, client counts and metrics written to `results.json` as the
run goes, one readable log line per round, and (for the privacy budget) a say in whether the
next round runs. So `fit` is overridden; the round mechanics (`fit_round`, `evaluate_round`,
sampling, failures) stay Flower's.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

from flwr.common.logger import log
from flwr.server import History, Server
from flwr.server.client_manager import ClientManager

from app.results import RunRecorder
from strategies.wrapper import StrategyWrapper


class ExperimentServer(Server):
    def __init__(
        self, *, client_manager: ClientManager, strategy: StrategyWrapper, recorder: RunRecorder
    ) -> None:
        super().__init__(client_manager=client_manager, strategy=strategy)
        self.recorder = recorder
        self.rounds_completed = 0
        self.stop_reason = "not started"

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        history = History()
        self.parameters = self._get_initial_parameters(server_round=0, timeout=timeout)
        initial = self.strategy.evaluate(0, parameters=self.parameters)
        if initial is not None:
            self.recorder.set_initial(_metrics(*initial))
            log(INFO, "initial model | central %s", _fmt(_metrics(*initial)))

        start = time.perf_counter()
        self.stop_reason = f"completed {num_rounds} rounds"
        for server_round in range(1, num_rounds + 1):
            reason = self.strategy.stop_reason()
            if reason:
                self.stop_reason = reason
                break
            round_start = time.perf_counter()
            record: dict[str, Any] = {"round": server_round}

            res_fit = self.fit_round(server_round=server_round, timeout=timeout)
            if res_fit is None:
                self.stop_reason = self.strategy.stop_reason() or (
                    f"round {server_round}: no clients could be sampled"
                )
                log(INFO, "Stopping: %s", self.stop_reason)
                break
            parameters, fit_metrics, (results, failures) = res_fit
            if parameters is not None:
                self.parameters = parameters
            history.add_metrics_distributed_fit(server_round, fit_metrics)
            record["clients"] = {"trained": len(results), "failed": len(failures)}
            if fit_metrics:
                record["train"] = dict(fit_metrics)

            res_cen = self.strategy.evaluate(server_round, parameters=self.parameters)
            if res_cen is not None:
                record["centralized"] = _metrics(*res_cen)
                history.add_loss_centralized(server_round, res_cen[0])
                history.add_metrics_centralized(server_round, res_cen[1])

            res_fed = self.evaluate_round(server_round=server_round, timeout=timeout)
            if res_fed is not None and res_fed[0] is not None:
                record["federated"] = _metrics(res_fed[0], res_fed[1])
                history.add_loss_distributed(server_round, res_fed[0])
                history.add_metrics_distributed(server_round, res_fed[1])

            record.update(self.strategy.round_report(server_round))
            record["seconds"] = time.perf_counter() - round_start
            self.recorder.add_round(record)
            self.rounds_completed = server_round
            log(INFO, _round_line(record, num_rounds, time.perf_counter() - start))
        return history, time.perf_counter() - start


def _metrics(loss: float, metrics: dict[str, Any]) -> dict[str, float]:
    out = {"loss": float(loss)}
    out.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return out


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _round_line(record: dict[str, Any], num_rounds: int, total: float) -> str:
    parts = [f"round {record['round']}/{num_rounds}"]
    if "centralized" in record:
        parts.append(f"central {_fmt(record['centralized'])}")
    if "federated" in record:
        parts.append(f"federated {_fmt(record['federated'])}")
    if "privacy" in record:
        parts.append(f"epsilon {record['privacy']['epsilon']:.3f} (delta {record['privacy']['delta']:g})")
    if "train" in record and "train_loss" in record["train"]:
        parts.append(f"train loss {record['train']['train_loss']:.4f}")
    clients = record["clients"]
    parts.append(f"clients {clients['trained']} ok {clients['failed']} failed")
    kib = (record["comm"]["bytes_down"] + record["comm"]["bytes_up"]) / 1024
    parts.append(f"{kib:.0f} KiB")
    parts.append(f"{record['seconds']:.1f} s (total {total:.1f} s)")
    return " | ".join(parts)
