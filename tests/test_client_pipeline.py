"""The client pipeline (clients/pipeline.py): its order per config is the documented one, and
what each protection's client step sends is what its server layer accepts, decodes and
accounts. Real clients (app/client_app.build_client) against the real strategy stack
(strategies/factory.build_strategy), one round in this process."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.common import (
    Context,
    RecordDict,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager

import clients.pipeline
from app.client_app import build_client
from clients.pipeline import build_pipeline
from app.config import load_config
from protections.he.config import he_params
from core.data import data_spec
from core.finetune import build_finetune_model
from core.models import get_weights
from protections.dp.mechanisms import l2_norm, local_dp_epsilon
from protections.he.client import decrypt_model, encrypt_update
from protections.he.context import (
    HE_SECRET_PATH_KEY,
    HEParams,
    load_context,
    new_context,
    provision,
)
from protections.workload.wire import full_local_steps, scaled_steps
from strategies.factory import build_strategy
from tests.support.proxies import InProcessProxy

TWO_NODES = "strategy.fraction_train=1.0 strategy.fraction_evaluate=0"


# ------------------------------------------------------------------ order
def documented_pipelines() -> list[tuple[str, list[str]]]:
    """The (overrides, step names) rows of the table in clients/pipeline.py's docstring."""
    lines = clients.pipeline.__doc__.split("steps, training side first\n", 1)[1].splitlines()
    rows = []
    for line in lines:
        if "|" not in line:
            break
        overrides, steps = (part.strip() for part in line.split("|"))
        rows.append(("" if overrides == "(defaults)" else overrides, steps.split(", ")))
    return rows


def test_the_table_covers_every_privacy_mode_and_both_wire_formats():
    rows = documented_pipelines()
    assert len(rows) == 12
    named = " ".join(overrides for overrides, _ in rows)
    for mode in ("server_fixed", "client_fixed", "adaptive", "local", "dpsgd"):
        assert f"privacy={mode}" in named
    assert "secagg=he" in named and "compression=" in named


@pytest.mark.parametrize("overrides,documented", documented_pipelines())
def test_pipeline_order_is_the_documented_one(overrides, documented):
    steps = build_pipeline(load_config(overrides))
    assert [type(step).__name__ for step in steps] == documented


# ------------------------------------------------------------------ round trips
def one_round(overrides, tmp_path, nodes=2, rounds=1):
    """`rounds` rounds of the configured server stack over `nodes` real clients (partition i
    of `nodes`). Returns (stack, initial weights, clients, {round: results in node order},
    {round: aggregated parameters}, secret HE context or None)."""
    cfg = load_config(f"{TWO_NODES} {overrides}")
    model, wire = build_finetune_model(cfg.model, data_spec(cfg.dataset), seed=cfg.seed)
    initial = get_weights(model, wire)
    he, he_config, secret = None, None, None
    if cfg.secagg.name == "he":
        secret_path, public_path = provision(he_params(cfg), tmp_path / "keys")
        he, secret = load_context(public_path), load_context(secret_path)
        he_config = {HE_SECRET_PATH_KEY: str(secret_path)}
    stack = build_strategy(cfg, ndarrays_to_parameters(initial), None, he_context=he, he_client_config=he_config)
    manager = SimpleClientManager()
    clients = []
    for i in range(nodes):
        context = Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                          node_config={"partition-id": i, "num-partitions": nodes})  # fmt: skip
        clients.append(build_client(cfg, context))
        manager.register(InProcessProxy(str(100 + i), clients[-1]))
    parameters = ndarrays_to_parameters(initial)
    all_results, aggregates = {}, {}
    for r in range(1, rounds + 1):
        sent = stack.configure_fit(r, parameters, manager)
        assert len(sent) == nodes
        # in node order (the manager samples in random order), so results[i] is clients[i]'s
        results = sorted(((proxy, proxy.fit(ins, None, r)) for proxy, ins in sent), key=lambda x: x[0].cid)
        parameters, _ = stack.aggregate_fit(r, results, [])
        assert parameters is not None and stack.rejected_updates(r) == []
        all_results[r], aggregates[r] = results, parameters
    return stack, initial, clients, all_results, aggregates, secret


def trained(client):
    return get_weights(client.numpy_client.model, client.numpy_client.wire_names)


def test_client_fixed_clipping_round_trip(tmp_path):
    """BoundUpdate clips to the norm ClientSideFixedClipping sends; the layer accepts both
    updates (it rejects any above C) and averages them over the cohort of 2 (z = 0)."""
    c = 0.05
    _, initial, _, results, params, _ = one_round(
        f"privacy=client_fixed privacy.clipping_norm={c} privacy.noise_multiplier=0", tmp_path
    )
    updates = []
    for _, res in results[1]:
        assert res.num_examples == 1 and res.metrics == {}
        sent = parameters_to_ndarrays(res.parameters)
        updates.append([s - g for s, g in zip(sent, initial)])
        assert l2_norm(updates[-1]) == pytest.approx(c, rel=1e-4)  # trained further, clipped
    out = parameters_to_ndarrays(params[1])
    for o, g, u, v in zip(out, initial, *updates):
        np.testing.assert_allclose(o, g + (u + v) / 2, atol=1e-6)


def test_local_dp_round_trip_accounts_each_release(tmp_path):
    """BoundUpdate's local release and its accountant in the node's Context: the server's
    ClientReportedPrivacy reports the epsilon of 1, then 2 releases of z = 1."""
    stack, _, _, results, params, _ = one_round(
        "privacy=local privacy.clipping_norm=0.1 privacy.noise_multiplier=1.0 "
        "privacy.noise_seed=1 privacy.allow_reproducible_noise=true",
        tmp_path,
        rounds=2,
    )
    for r in (1, 2):
        report = stack.round_report(r)["privacy"]
        assert report["mechanism"] == "local"
        assert report["epsilon"] == pytest.approx(local_dp_epsilon(1.0, r, 1e-5), rel=1e-9)
        assert all(set(res.metrics) == {"epsilon"} and res.num_examples == 1 for _, res in results[r])
    # weight 1 each: the aggregate is the plain mean of what the two clients sent
    sent = [parameters_to_ndarrays(res.parameters) for _, res in results[2]]
    for o, a, b in zip(parameters_to_ndarrays(params[2]), *sent):
        np.testing.assert_allclose(o, (a + b) / 2, atol=1e-6)


def test_dpsgd_round_trip_reports_the_clients_accountant(tmp_path):
    """DPSGDTraining's epsilon (Opacus' RDP accountant, int(1/q) steps of q = 0.1, z = 1) is
    what ClientReportedPrivacy reports; only it leaves the client, with weight 1."""
    from opacus.accountants import RDPAccountant

    stack, _, _, results, _, _ = one_round(
        "privacy=dpsgd privacy.noise_multiplier=1.0 training.local_epochs=1", tmp_path
    )
    epsilons = []
    for _, res in results[1]:
        assert res.num_examples == 1 and set(res.metrics) == {"epsilon"}
        epsilons.append(float(res.metrics["epsilon"]))
    reference = RDPAccountant()
    reference.history = [(1.0, 0.1, 10)]
    assert epsilons == pytest.approx([reference.get_epsilon(1e-5)] * 2, rel=1e-6)
    report = stack.round_report(1)["privacy"]
    assert report["mechanism"] == "dpsgd" and report["epsilon"] == pytest.approx(max(epsilons))


def test_he_round_trip_decrypts_to_the_example_weighted_mean(tmp_path):
    """HomomorphicEncryption (pairwise masks on) against HomomorphicAggregation: the sum the
    server cannot read decrypts to the example-weighted mean of the two trained models."""
    _, initial, clients, results, params, secret = one_round(
        "secagg=he secagg.pairwise_masks=true", tmp_path
    )
    weights = [res.num_examples for _, res in results[1]]
    assert min(weights) > 1
    models = [trained(client) for client in clients]
    assert not np.allclose(models[0][0], initial[0], atol=1e-3)  # they trained
    shapes = [a.shape for a in initial]
    mean = decrypt_model(secret, parameters_to_ndarrays(params[1]), shapes)
    for i, m in enumerate(mean):
        expected = sum(w * model[i].astype(np.float64) for w, model in zip(weights, models)) / sum(weights)
        np.testing.assert_allclose(m, expected, atol=1e-4)


def test_he_with_client_fixed_clips_within_c_under_encryption(tmp_path):
    """BoundUpdate clips to C minus HE's rounding slack before HomomorphicEncryption; the mean
    of the two encrypted updates (weight 1 each, z = 0) is within C of the global model."""
    c = 0.05
    _, initial, _, results, params, secret = one_round(
        f"secagg=he privacy=client_fixed privacy.clipping_norm={c} privacy.noise_multiplier=0",
        tmp_path,
    )
    assert all(res.num_examples == 1 and res.metrics == {} for _, res in results[1])
    mean = decrypt_model(secret, parameters_to_ndarrays(params[1]), [a.shape for a in initial], allow_noise=True)
    norm = math.sqrt(sum(float(np.sum((m - g.astype(np.float64)) ** 2)) for m, g in zip(mean, initial)))
    assert 0.02 < norm <= c


def test_int8_round_trip_decodes_within_one_quantization_step(tmp_path):
    """CompressUpdate sends int8 tensors and their scales; DecompressUpdates turns them back
    into models: the aggregate is the example-weighted mean of the trained models to within
    each tensor's largest scale (stochastic rounding errs by under one step per value)."""
    _, initial, clients, results, params, _ = one_round("compression=int8", tmp_path)
    weights, scales = [], []
    for _, res in results[1]:
        arrays = parameters_to_ndarrays(res.parameters)
        assert [a.dtype for a in arrays[:-1]] == [np.int8] * len(initial)
        scales.append(arrays[-1])
        weights.append(res.num_examples)
    models = [trained(client) for client in clients]
    bound = np.maximum(*scales)
    for i, o in enumerate(parameters_to_ndarrays(params[1])):
        expected = sum(w * model[i].astype(np.float64) for w, model in zip(weights, models)) / sum(weights)
        assert np.max(np.abs(o - expected)) <= bound[i] + 1e-7


def test_capability_workload_round_trip(tmp_path):
    """ScaleLocalWork runs round(c * S) steps and reports c and S; the server's Workload layer
    computes the round time max(steps / c) from them."""
    stack, _, clients, results, _, _ = one_round(
        "workload=capability workload.capabilities=[1.0,0.25]", tmp_path
    )
    full = []
    for client in clients:
        c = client.numpy_client
        full.append(full_local_steps(len(c.train_data), c.training.local_epochs, c.training.batch_size))
    steps = [int(res.metrics["steps"]) for _, res in results[1]]
    assert steps == [full[0], scaled_steps(full[1], 0.25)] and steps[1] < steps[0]
    assert [res.metrics["full_steps"] for _, res in results[1]] == full
    report = stack.round_report(1)["workload"]
    assert report["steps"] == steps and report["compute"] == [1.0, 0.25]
    assert report["round_time"] == pytest.approx(max(steps[0] / 1.0, steps[1] / 0.25))
    assert report["round_time_uniform"] == pytest.approx(max(full[0] / 1.0, full[1] / 0.25))


# ------------------------------------------------------------------ receive order
def test_a_protected_he_client_refuses_evaluation_before_decrypting(tmp_path):
    """ReleaseOnlyAccounted is outermost, so its `receive` runs before HE's: a model encrypted
    under keys this node does not hold is refused for privacy, never decrypted."""
    from tests.support.he import he_client

    client, _, _, initial = he_client(tmp_path, "secagg=he privacy=client_fixed")
    foreign = new_context(HEParams())
    payload = encrypt_update(foreign, initial, 1, 1)
    with pytest.raises(PermissionError, match="no accountant covers"):
        client.evaluate(payload, {"server_round": 1})
    opted_in, _, _, _ = he_client(tmp_path / "opt", "secagg=he privacy=client_fixed privacy.unprotected_metrics=true")
    with pytest.raises(ValueError, match="encrypted under other keys"):
        opted_in.evaluate(payload, {"server_round": 1})


# ------------------------------------------------------------------ client_fn caches
def test_client_fn_builds_one_model_per_process_and_resets_it_per_message():
    """app/client_app.client_fn: the config is validated once per overrides string and the
    model built once per config; each message gets it back in its built state, whatever the
    previous message did to it."""
    import torch

    from app.client_app import cached_config, client_fn

    overrides = "model.hidden_sizes=[24]"

    def message(i):
        context = Context(run_id=1, node_id=i, state=RecordDict(), run_config={"overrides": overrides},
                          node_config={"partition-id": i, "num-partitions": 4})  # fmt: skip
        return client_fn(context).numpy_client

    first = message(0)
    built = get_weights(first.model)
    first.fit(built, {"server_round": 1})
    assert not np.allclose(get_weights(first.model)[0], built[0])  # the message trained it
    with torch.no_grad():
        for p in first.model.parameters():
            p.add_(1.0)
    second = message(1)
    assert second.model is first.model and cached_config(overrides) is cached_config(overrides)
    cfg = load_config(overrides)
    fresh, _ = build_finetune_model(cfg.model, data_spec(cfg.dataset), seed=cfg.seed)
    for a, b in zip(get_weights(second.model), get_weights(fresh)):
        np.testing.assert_array_equal(a, b)
    assert all(p.grad is None for p in second.model.parameters())
