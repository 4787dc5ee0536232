import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from core.config import load_config
from strategies.factory import build_strategy, weighted_metrics
from strategies.traffic import TrafficMeter, payload_bytes
from protections.validation.server import RejectMalformedUpdates
from tests.support.proxies import LoopbackProxy, fit_res, manager

pytestmark = pytest.mark.unit

GLOBAL = [np.zeros((2, 3), dtype=np.float32), np.zeros(3, dtype=np.float32)]


def test_weighted_metrics_weights_by_examples_and_skips_non_numbers():
    out = weighted_metrics([(10, {"acc": 0.5, "note": "x"}), (30, {"acc": 0.9, "loss": 1.0})])
    assert out == {"acc": pytest.approx((10 * 0.5 + 30 * 0.9) / 40), "loss": pytest.approx(1.0)}


def test_malformed_updates_are_rejected_and_the_round_goes_on():
    strategy = RejectMalformedUpdates(FedAvg(min_available_clients=1, min_fit_clients=1))
    cm = manager(5)
    strategy.configure_fit(1, ndarrays_to_parameters(GLOBAL), cm)
    good_a = [np.full((2, 3), 1.0, np.float32), np.full(3, 1.0, np.float32)]
    good_b = [np.full((2, 3), 4.0, np.float32), np.full(3, 4.0, np.float32)]
    nan = [np.full((2, 3), np.nan, np.float32), np.zeros(3, np.float32)]
    wrong_shape = [np.zeros((3, 2), np.float32), np.zeros(3, np.float32)]
    missing = [np.zeros((2, 3), np.float32)]
    results = [
        (LoopbackProxy("a"), fit_res(good_a, 10)),
        (LoopbackProxy("b"), fit_res(good_b, 30)),
        (LoopbackProxy("c"), fit_res(nan)),
        (LoopbackProxy("d"), fit_res(wrong_shape)),
        (LoopbackProxy("e"), fit_res(missing)),
        (LoopbackProxy("f"), fit_res(good_a, 0)),
    ]
    params, _ = strategy.aggregate_fit(1, results, [])
    aggregate = parameters_to_ndarrays(params)
    np.testing.assert_allclose(aggregate[0], np.full((2, 3), (10 * 1 + 30 * 4) / 40))
    assert strategy.rejected[1] == 4


def test_traffic_meter_counts_every_payload_byte():
    base = FedAvg(fraction_fit=0.6, fraction_evaluate=0.4, min_fit_clients=1,
                  min_evaluate_clients=1, min_available_clients=1)  # fmt: skip
    meter = TrafficMeter(base)
    params = ndarrays_to_parameters(GLOBAL)
    cm = manager(5)
    sent = meter.configure_fit(1, params, cm)
    assert len(sent) == 3
    update = fit_res([np.ones((2, 3), np.float32), np.ones(3, np.float32)])
    meter.aggregate_fit(1, [(proxy, update) for proxy, _ in sent], [])
    evaluated = meter.configure_evaluate(1, params, cm)
    assert len(evaluated) == 2
    traffic = meter.traffic(1)
    assert traffic.bytes_down == (3 + 2) * payload_bytes(params)
    assert traffic.bytes_up == 3 * payload_bytes(update.parameters)
    # .npy payloads: 4 bytes per float32 plus a fixed header per tensor
    assert payload_bytes(params) >= 4 * (6 + 3)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedprox", "fedadam"])
def test_factory_builds_flower_strategies_with_configured_sampling(name):
    cfg = load_config(f"strategy={name} strategy.fraction_train=0.3")
    strategy = build_strategy(cfg, ndarrays_to_parameters(GLOBAL), evaluate_fn=None)
    # TrafficMeter(Workload(RejectMalformedUpdates(base)))
    assert type(strategy.strategy.strategy.strategy).__name__.lower() == name
    sent = strategy.configure_fit(1, ndarrays_to_parameters(GLOBAL), manager(10))
    assert len(sent) == 3
    config = sent[0][1].config
    assert config["server_round"] == 1 and config["local_epochs"] == cfg.training.local_epochs
    if name == "fedprox":
        assert config["proximal_mu"] == pytest.approx(0.1)
