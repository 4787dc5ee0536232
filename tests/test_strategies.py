import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from app.config import load_config
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


def base_step(name, cfg, current, mean, state):
    """The server step of each base strategy after the weighted mean `mean` (float64), written
    from the algorithms (McMahan et al.; Hsu et al. 2019 for momentum; Reddi et al. 2021 for
    FedAdam, with Flower's bias-corrected step size); `state` carries momentum / moments."""
    s = cfg.strategy
    if name in ("fedavg", "fedprox"):  # FedProx changes the clients' loss, not the server step
        return mean
    if name == "fedavgm":
        grad = [w - m for w, m in zip(current, mean)]
        state["momentum"] = [s.server_momentum * v + g for v, g in zip(state["momentum"], grad)] if "momentum" in state else grad
        return [w - s.server_learning_rate * v for w, v in zip(current, state["momentum"])]
    delta = [m - w for m, w in zip(mean, current)]
    state["m"] = [s.beta_1 * m + (1 - s.beta_1) * d for m, d in zip(state.get("m", [0.0] * len(delta)), delta)]
    state["v"] = [s.beta_2 * v + (1 - s.beta_2) * d * d for v, d in zip(state.get("v", [0.0] * len(delta)), delta)]
    state["t"] = state.get("t", 0) + 1
    eta = s.eta * np.sqrt(1 - s.beta_2 ** (state["t"] + 1)) / (1 - s.beta_1 ** (state["t"] + 1))
    return [w + eta * m / (np.sqrt(v) + s.tau) for w, m, v in zip(current, state["m"], state["v"])]


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedprox", "fedadam"])
def test_factory_stack_samples_as_configured_meters_rejects_and_takes_the_base_step(name):
    """The stack build_strategy makes for `strategy=<name>`, observed from outside over two
    rounds: it samples the configured fraction, sends the training instructions (FedProx's mu
    too), counts every byte, rejects a non-finite update with its node, and moves the model
    the way the named algorithm with the configured settings does."""
    cfg = load_config(f"strategy={name} strategy.fraction_train=0.3")
    stack = build_strategy(cfg, ndarrays_to_parameters(GLOBAL), evaluate_fn=None)
    rng = np.random.default_rng(0)
    current, state = [g.astype(np.float64) for g in GLOBAL], {}
    for server_round in (1, 2):
        sent_params = ndarrays_to_parameters([w.astype(np.float32) for w in current])
        sent = stack.configure_fit(server_round, sent_params, manager(10))
        assert len(sent) == 3  # 0.3 of 10 nodes
        for _, ins in sent:
            assert ins.config["server_round"] == server_round
            assert ins.config["local_epochs"] == cfg.training.local_epochs and ins.config["lr"] == cfg.training.lr
            assert ins.config["workload"] == "uniform"
            assert ins.config.get("proximal_mu") == (pytest.approx(0.1) if name == "fedprox" else None)
        updates = [[(w + rng.normal(0, 1, w.shape)).astype(np.float32) for w in current] for _ in sent]
        examples = [10, 20, 30]
        results = [(proxy, fit_res(u, n)) for (proxy, _), u, n in zip(sent, updates, examples)]
        results.append((LoopbackProxy("bad"), fit_res([np.full((2, 3), np.nan, np.float32), np.zeros(3, np.float32)])))
        params, _ = stack.aggregate_fit(server_round, results, [])
        assert stack.rejected_updates(server_round) == [("bad", "tensor 0 has non-finite values")]
        traffic = stack.traffic(server_round)
        assert traffic.bytes_down == 3 * payload_bytes(sent_params)
        assert traffic.bytes_up == sum(payload_bytes(res.parameters) for _, res in results)
        mean = [sum(n * u[i].astype(np.float64) for u, n in zip(updates, examples)) / sum(examples)
                for i in range(len(current))]  # fmt: skip
        current = base_step(name, cfg, current, mean, state)
        got = parameters_to_ndarrays(params)
        for g, want in zip(got, current):
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
        current = [g.astype(np.float64) for g in got]
