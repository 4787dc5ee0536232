"""Compressed updates (protections/compression/wire.py, protections/compression/server.py), the int8 edge model
(core/edge_model.py) and the capability workload (protections/workload/wire.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Code, Context, FitIns, RecordDict, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from app.client_app import build_client
from protections.workload.client import ScaleLocalWork
from protections.compression.wire import compress_update, decompress_update
from app.config import load_config
from core.config import ConfigError
from core.data import centralized_test_split, data_spec, load_client_data
from core.edge_model import export_int8
from core.evaluation import evaluate
from core.models import build_model, get_weights
from protections.workload.wire import round_times
from core.training import train
from strategies.factory import build_strategy
from tests.support.proxies import manager

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
values = st.floats(-4, 4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    global_=arrays(np.float32, st.integers(1, 50), elements=values),
    delta=arrays(np.float32, 50, elements=st.floats(-1, 1, width=32)),
    seed=st.integers(0, 2**32 - 1),
)
def test_int8_round_trip_within_one_quantization_step(global_, delta, seed):
    trained = global_ + delta[: global_.size]
    arrays_ = compress_update([global_], [trained], "int8", np.random.default_rng(seed))
    assert [a.dtype for a in arrays_] == [np.int8, np.float32]
    back = decompress_update([global_], arrays_, "int8")[0]
    update = trained.astype(np.float64) - global_
    step = np.abs(update).max() / 127
    err = np.abs(back.astype(np.float64) - trained)
    assert np.all(err <= step + 1e-6 * (1 + np.abs(trained)))  # < one step (+ float32 rounding)


@settings(max_examples=60, deadline=None)
@given(
    global_=arrays(np.float32, st.integers(1, 50), elements=values),
    delta=arrays(np.float32, 50, elements=st.floats(-1, 1, width=32)),
    seed=st.integers(0, 2**32 - 1),
)
def test_fp16_round_trip_within_one_float16_spacing(global_, delta, seed):
    trained = global_ + delta[: global_.size]
    arrays_ = compress_update([global_], [trained], "fp16", np.random.default_rng(seed))
    assert arrays_[0].dtype == np.float16
    back = decompress_update([global_], arrays_, "fp16")[0]
    update = trained.astype(np.float32) - global_
    bound = np.maximum(np.abs(update) * 2.0**-10, 2.0**-24)
    err = np.abs(back.astype(np.float64) - (global_.astype(np.float64) + update))
    assert np.all(err <= bound + 1e-6 * (1 + np.abs(trained)))


@pytest.mark.parametrize("scheme", ["int8", "fp16"])
def test_stochastic_rounding_is_unbiased(scheme):
    global_ = np.zeros(20_000, dtype=np.float32)
    trained = np.full(20_000, 0.3, dtype=np.float32)
    trained[0] = 1.0  # int8: scale 1/127, 0.3 * 127 = 38.1 -> 38 or 39
    back = decompress_update([global_], compress_update([global_], [trained], scheme, np.random.default_rng(0)), scheme)[0]
    assert back[1:].mean() == pytest.approx(0.3, abs=2e-4)


def client(cfg, partition_id=0, node_config=None):
    ctx = Context(
        run_id=1, node_id=1, state=RecordDict(), run_config={},
        node_config={"partition-id": partition_id, "num-partitions": 4, **(node_config or {})},
    )  # fmt: skip
    return build_client(cfg, ctx)


@pytest.mark.parametrize("scheme,per_value", [("none", 4), ("fp16", 2), ("int8", 1)])
def test_bytes_counted_equal_the_bytes_in_the_messages(scheme, per_value):
    """A real client's fit result, as the Flower message record it travels in: the traffic
    meter counts exactly its array bytes, and the server rebuilds a float32 model."""
    cfg = load_config(f"compression={scheme} strategy.fraction_train=1.0 training.local_epochs=1")
    model = build_model(cfg.model, data_spec(cfg.dataset), seed=0)
    strategy = build_strategy(cfg, ndarrays_to_parameters(get_weights(model)), evaluate_fn=None)
    sent = strategy.configure_fit(1, ndarrays_to_parameters(get_weights(model)), manager(2))
    results = []
    for i, (proxy, ins) in enumerate(sent):
        res = client(cfg, i).fit(FitIns(ins.parameters, ins.config))
        assert res.status.code == Code.OK
        results.append((proxy, res))
    in_messages = sum(
        len(array.data)
        for _, res in results
        for array in fitres_to_recorddict(res, keep_input=True).array_records["fitres.parameters"].values()
    )
    params, _ = strategy.aggregate_fit(1, results, [])
    assert params is not None
    report = strategy.round_report(1)
    assert report["comm"]["bytes_up"] == in_messages
    values_ = 2 * model_size(model)
    overhead = in_messages - per_value * values_
    # .npy headers (128 bytes per array, 4 or 5 arrays per client) and int8's 4 float32 scales
    assert 0 < overhead <= 2 * (5 * 128 + 4 * 4)
    if scheme != "none":
        assert report["compression"]["bytes_up"] == in_messages
        assert report["compression"]["ratio"] == pytest.approx(4 / per_value, rel=0.15)


def model_size(model):
    return sum(p.numel() for p in model.parameters())


def test_compression_combinations_that_cannot_work_fail_at_config_time():
    with pytest.raises(ConfigError, match="compression.name='int8'.*secagg=he"):
        load_config("compression=int8 secagg=he")
    with pytest.raises(ConfigError, match="compression.name='fp16'.*server_fixed"):
        load_config("compression=fp16 privacy=client_fixed")
    with pytest.raises(ConfigError, match="compression.name='zip' is not one of none, fp16, int8"):
        load_config("compression.name=zip")
    with pytest.raises(ConfigError, match=r"workload.capabilities=\[1.0, 0.0\]: each capability must be in \(0, 1\]"):
        load_config("workload=capability workload.capabilities=[1.0,0.0]")
    with pytest.raises(ConfigError, match="workload=uniform with privacy=dpsgd"):
        load_config("workload=capability privacy=dpsgd")


def test_int8_model_is_3x_smaller_on_disk_and_within_a_point(tmp_path):
    cfg = load_config("model.hidden_sizes=[256,256] training.local_epochs=30")
    spec = data_spec(cfg.dataset)
    model = build_model(cfg.model, spec, seed=0)
    data, _ = load_client_data(cfg.dataset, cfg.partitioner, 0, 1, cfg.seed)
    train(model, data, cfg.training, spec.task, CPU, seed=0)
    test = centralized_test_split(cfg.dataset, cfg.seed)
    fp32 = evaluate(model, test, spec.task, CPU)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    report = export_int8(model, tmp_path, lambda m: evaluate(m, test, spec.task, CPU))
    assert report["bytes"] == (tmp_path / "model_int8.pt").stat().st_size
    assert (tmp_path / "model.pt").stat().st_size >= 3 * report["bytes"]
    assert fp32["accuracy"] > 0.95
    assert abs(report["centralized"]["accuracy"] - fp32["accuracy"]) <= 0.01


@pytest.mark.parametrize("compute", [1.0, 0.25])
def test_capability_workload_runs_its_share_of_the_steps(compute):
    """Partition 0 of 4 holds 324 training digits: ceil(324/16) = 21 steps per epoch; 4
    epochs are 84 steps, a quarter of them 21."""
    cfg = load_config("workload=capability training.local_epochs=4")
    c = client(cfg, node_config={"compute": compute})
    model = build_model(cfg.model, data_spec(cfg.dataset), seed=0)
    config = {"server_round": 1, "workload": "capability"}
    res = c.fit(FitIns(ndarrays_to_parameters(get_weights(model)), config))
    n = len(c.numpy_client.train_data)
    full = 4 * -(-n // 16)
    assert (n, res.metrics["full_steps"]) == (324, full) and full == 84
    assert res.metrics["steps"] == round(compute * full)
    assert res.metrics["compute"] == compute
    uniform = c.fit(FitIns(ndarrays_to_parameters(get_weights(model)), {"server_round": 1, "workload": "uniform"}))
    assert uniform.metrics["steps"] == full


def test_simulation_assigns_capabilities_and_the_round_time_model():
    cfg = load_config("workload=capability workload.capabilities=[1.0,0.25]")
    def compute(c):  # the capability its workload step scales local steps by
        (step,) = [s for s in c.numpy_client.pipeline.steps if isinstance(s, ScaleLocalWork)]
        return step.compute

    assert [compute(client(cfg, i)) for i in range(4)] == [1.0, 0.25, 1.0, 0.25]
    # a full node with 76 steps and a quarter node with 19 of its 76: both take 76 units;
    # uniformly the quarter node would take 76 / 0.25 = 304
    assert round_times([(1.0, 76, 76), (0.25, 19, 76)]) == {"round_time": 76.0, "round_time_uniform": 304.0}
