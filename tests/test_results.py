"""The typed results contract (core/result_types.py): what the recorder writes reads back into
the same dataclasses and the same text, every section of every layer round-trips, a record
that drifts from the contract is refused with its path; and the stack decodes the global model
once per round (protections/base.py GlobalModel)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.common import Context, RecordDict, ndarrays_to_parameters
from flwr.server.strategy import FedAvg

from app.client_app import build_client
from app.experiment_server import ExperimentServer, NodeTrackingClientManager
from app.config import load_config
from core.data import data_spec, load_client_data
from core.evaluation import evaluate
from core.finetune import build_finetune_model
from core.models import get_weights, set_weights
from core.results import (
    ClientAccountedPrivacy,
    ClientCounts,
    Comm,
    CompressionReport,
    FailureRecord,
    FinalRecord,
    InitialRecord,
    Int8Model,
    ResultsError,
    RollbackReport,
    RoundRecord,
    RunInfo,
    RunRecord,
    RunRecorder,
    SecAggReport,
    ServerAccountedPrivacy,
    WorkloadReport,
    load_results,
)
from protections.base import NoisySecureSum, StrategyWrapper
from protections.dp.server import EncryptedClientSideClipping
from strategies.factory import build_strategy
from tests.support.rounds import in_process_run



def run_loop(overrides: str, tmp_path, num_rounds: int = 3, checkpoints=None):
    """The round loop over two real in-process clients (tests/support/rounds.py); returns the
    server and recorder. `checkpoints`: a list that gets (round, arrays, global model) per round."""

    def checkpoint(server_round, arrays, state):  # with the round's global model
        checkpoints.append((server_round, arrays, run.server.parameters))

    run = in_process_run(f"{overrides} strategy.fraction_train=1.0", tmp_path,
                         checkpoint_fn=None if checkpoints is None else checkpoint)  # fmt: skip
    run.fit(num_rounds)
    return run.server, run.recorder


def test_what_the_recorder_writes_reads_back_into_the_same_record_and_text(tmp_path):
    _, recorder = run_loop("model=linear privacy=adaptive privacy.clipped_count_stddev=1.0 privacy.unprotected_metrics=true "
                           "compression=int8", tmp_path, num_rounds=2)  # fmt: skip
    text = (tmp_path / "results.json").read_text()
    loaded = load_results(tmp_path)
    assert loaded == recorder.record  # dataclass equality, every field of every round
    assert loaded.to_json() == text  # and the very same file, key order included
    r = loaded.rounds[1]
    assert isinstance(r.privacy, ServerAccountedPrivacy) and r.privacy.releases == 2
    assert r.privacy.next_clipping_norm > 0 and r.privacy.epsilon > loaded.rounds[0].privacy.epsilon
    assert isinstance(r.compression, CompressionReport)
    assert r.compression.ratio == r.compression.bytes_up_float32 / r.compression.bytes_up > 2
    assert isinstance(r.workload, WorkloadReport) and len(r.workload.steps) == 2
    assert r.comm.bytes_up == r.compression.bytes_up  # the meter counts the compressed bytes
    assert list(json.loads(text)["rounds"][1]) == [
        "round", "clients", "aggregated", "train", "centralized", "federated", "privacy",
        "compression", "workload", "comm", "seconds",
    ]  # fmt: skip


def every_section() -> RunRecord:
    """A record with every dataclass and optional field of the contract set once."""
    server = ServerAccountedPrivacy(
        mechanism="AdaptiveClipping", noise_multiplier=1.1, clipping_norm=0.5, sampling="poisson",
        cohort_divisor=4, clients_aggregated=3, epsilon=1.25, delta=1e-5, not_covered=["a"],
        clients_clipped=2, sampling_rate=0.4, releases=1, accounting="rdp/poisson",
        neighbouring="add or remove one client", epsilon_pld=1.2, update_noise_multiplier=1.2,
        clipped_count_stddev=0.3, next_clipping_norm=0.45,
    )  # fmt: skip
    he = SecAggReport(
        scheme="bfv", clients_aggregated=3, ciphertexts_per_model=2,
        bytes_per_parameter_up=13.5, bytes_per_parameter_down=25.75, rejected=["node 7: x"],
    )  # fmt: skip
    rounds = [
        RoundRecord(
            round=1, clients=ClientCounts(2, 1, [FailureRecord(None, "train", "boom")]),
            aggregated=True, train={"train_loss": 0.5, "steps": 3}, centralized={"loss": 1.0},
            federated={"accuracy": 0.5}, privacy=server, rejected_updates=1,
            compression=CompressionReport("int8", 10, 40, 4.0),
            workload=WorkloadReport("capability", 2.0, 3.0, [1, 2], [0.5, 1.0]),
            comm=Comm(100, 50), seconds=0.25,
        ),
        RoundRecord(
            round=2, clients=ClientCounts(0, 3), aggregated=False, rolled_back=True,
            secagg=SecAggReport("bfv", rolled_back=RollbackReport(3, 3, "MAC", "none kept")),
            privacy=ClientAccountedPrivacy("dpsgd", 2.0, 2.0, 1.5, 1e-5, "per client", "x", []),
            comm=Comm(0, 0), seconds=0.5,
        ),
    ]  # fmt: skip
    final = FinalRecord(
        rounds_completed=2, stop_reason="completed 2 rounds", num_parameters=10,
        num_trainable_parameters=10, num_supernodes=3, seconds_total=1.5, comm_total=Comm(100, 50),
        rounds_with_failures=[1], centralized={"loss": 1.0}, federated={"accuracy": 0.5},
        privacy=server, int8_model=Int8Model("model_int8.pt", 99, {"accuracy": 0.4}), secagg=he,
        model_file="model.pt", model_bytes=1234,
    )  # fmt: skip
    run = RunInfo(token="t", flwr_run_id=None, status="completed", resumed_after_round=1, error="e")
    return RunRecord(run=run, rounds=rounds, final=final, initial=InitialRecord({"loss": 2.3}))


def test_every_section_round_trips_through_json():
    record = every_section()
    text = record.to_json()
    back = RunRecord.from_dict(json.loads(text))
    assert back == record and back.to_json() == text
    data = json.loads(text)
    assert data["run"]["flwr_run_id"] is None  # nullable: written as null, never dropped
    assert data["rounds"][0]["clients"]["failures"][0]["node_id"] is None
    assert "rolled_back" not in data["rounds"][0] and "secagg" not in data["rounds"][0]  # omitted
    assert isinstance(back.rounds[1].privacy, ClientAccountedPrivacy)  # told apart by its keys
    assert list(data["rounds"][0]["privacy"])[5:9] == [
        "clients_aggregated", "clients_clipped", "epsilon", "delta",
    ]  # the order results.json always had  # fmt: skip
    running = RunRecord(run=RunInfo(token="t"))
    assert json.loads(running.to_json()) == {
        "run": {"token": "t", "flwr_run_id": None, "status": "running"}, "rounds": [], "final": {},
    }  # fmt: skip
    assert RunRecord.from_dict(json.loads(running.to_json())).final is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["rounds"][0]["comm"].update(bytes_sent=1), r"rounds\[0\]\.comm: unknown key\(s\) 'bytes_sent'"),
        (lambda d: d["rounds"][0]["clients"].update(trained="2"), r"clients\.trained: expected int, got '2'"),
        (lambda d: d["rounds"][0]["clients"].update(trained=True), r"clients\.trained: expected int, got True"),
        (lambda d: d["final"].pop("rounds_completed"), r"final: missing key 'rounds_completed'"),
        (lambda d: d["rounds"][0]["workload"].update(steps=[1, "x"]), r"steps\[1\]: expected int"),
        (lambda d: d["rounds"][1]["privacy"].pop("epsilon"), r"missing key 'epsilon'"),
        (lambda d: d.update(rounds={}), r"results\.rounds: expected a list"),
    ],
)  # fmt: skip
def test_a_record_that_drifts_from_the_contract_is_refused_with_its_path(tmp_path, edit, message):
    data = json.loads(every_section().to_json())
    edit(data)
    (tmp_path / "results.json").write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=message):
        load_results(tmp_path)


class Reports(StrategyWrapper):
    section = "comm"

    def report(self, server_round):
        return Comm(server_round, 0)


def test_each_layer_fills_its_own_section_and_two_claiming_one_is_an_error():
    record = RoundRecord(round=3)
    Reports(FedAvg()).contribute(3, record)
    assert record.comm == Comm(3, 0) and Reports(FedAvg()).round_report(3) == {
        "comm": {"bytes_down": 3, "bytes_up": 0}
    }
    with pytest.raises(ValueError, match="two layers report the round's 'comm'"):
        Reports(Reports(FedAvg())).contribute(3, RoundRecord(round=3))
    with pytest.raises(TypeError, match="is not a round section"):
        type("Bad", (StrategyWrapper,), {"section": "accuracy"})(FedAvg())


def test_the_global_model_is_decoded_once_per_round_and_shared_read_only(tmp_path, monkeypatch):
    # DP, validation and compression compare updates with the model sent; evaluation and the
    # checkpoint read it too: each used to decode it itself (5 decodes per round here).
    import importlib

    import flwr.common

    decoded: list = []  # every Parameters object any module decoded, once per decode

    def counting(parameters):
        decoded.append(parameters)
        return flwr.common.parameters_to_ndarrays(parameters)

    for name in ("protections.base", "protections.dp.server", "protections.validation.server",
                 "protections.compression.server", "protections.he.server",
                 "app.experiment_server", "flwr.server.strategy.fedavg"):  # fmt: skip
        module = importlib.import_module(name)
        if hasattr(module, "parameters_to_ndarrays"):
            monkeypatch.setattr(module, "parameters_to_ndarrays", counting)
    checkpoints: list = []
    server, recorder = run_loop(
        "model=linear privacy=server_fixed compression=fp16", tmp_path, 3, checkpoints
    )  # fmt: skip
    globals_ = [parameters for _, _, parameters in checkpoints]
    assert [r.aggregated for r in recorder.record.rounds] == [True, True, True]
    assert len(globals_) == 3 and len({id(g) for g in globals_}) == 3
    # each round's global model: decoded once (evaluation), then read by the checkpoint and
    # the next round's validation, compression and DP layers without another decode
    assert [sum(d is g for d in decoded) for g in globals_] == [1, 1, 1]
    assert server.strategy.global_model.decodes == 1 + 3  # the initial model, then one a round
    assert [r for r, _, _ in checkpoints] == [1, 2, 3]
    final = checkpoints[-1][1]
    assert all(not a.flags.writeable for a in final)
    with pytest.raises(ValueError, match="read-only"):
        final[0][...] = 0.0
    for a, b in zip(final, flwr.common.parameters_to_ndarrays(server.parameters)):
        np.testing.assert_array_equal(a, b)


def test_dp_under_he_needs_only_a_noisy_secure_sum():
    from protections.he.server import HomomorphicAggregation

    assert issubclass(HomomorphicAggregation, NoisySecureSum)
    with pytest.raises(TypeError, match="wraps a secure sum"):
        EncryptedClientSideClipping(
            FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, target_delta=1e-5,
            sampling="without_replacement",
        )  # fmt: skip
