"""Pairwise masks with dropout recovery (protections/he/masks.py), driven through the real
server stack (strategies/factory.py) and real clients (app/client_app.py `build_client`) in
this process: a client that drops after sharing is recovered exactly, a colluding key holder
sees one client's ciphertext as uniform noise mod t, a client never reveals both kinds of
shares of one peer, and a round below the threshold fails cleanly, recorded."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import tenseal.sealapi as seal
from flwr.common import Context, GetPropertiesIns, RecordDict, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from scipy import stats

from app.client_app import build_client
from app.config import load_config
from core.data import data_spec
from core.finetune import build_finetune_model
from core.models import get_weights
from protections.he import masks
from protections.he.client import decrypt_model
from protections.he.config import he_params
from protections.he.context import (
    HE_SECRET_PATH_KEY, HEError, HEParams, load_ciphertext, load_context, new_context, provision, unpack_payload,
)  # fmt: skip
from protections.he.masks import _box, _x25519_private
from protections.he.server import HomomorphicAggregation
from strategies.factory import build_strategy
from tests.support.proxies import InProcessProxy

pytestmark = pytest.mark.unit

OVERRIDES = "secagg=he strategy.fraction_train=1.0 strategy.fraction_evaluate=0 strategy.min_train_clients=4 strategy.min_available_clients=4 training.local_epochs=1 training.batch_size=64"


class Federation:
    """The configured server stack over `nodes` real clients (node 10x, partition x)."""

    def __init__(self, tmp_path, nodes=4, overrides=OVERRIDES):
        cfg = load_config(overrides)
        self.cfg = cfg
        secret_path, public_path = provision(he_params(cfg), tmp_path / "keys")
        self.secret, self.public = load_context(secret_path), load_context(public_path)
        model, wire = build_finetune_model(cfg.model, data_spec(cfg.dataset), seed=cfg.seed)
        self.initial = get_weights(model, wire)
        self.shapes = [a.shape for a in self.initial]
        self.stack = build_strategy(
            cfg, ndarrays_to_parameters(self.initial), None,
            he_context=self.public, he_client_config={HE_SECRET_PATH_KEY: str(secret_path)},
        )  # fmt: skip
        self.manager = SimpleClientManager()
        self.clients, self.proxies = [], {}
        for i in range(nodes):
            ctx = Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                          node_config={"partition-id": i, "num-partitions": nodes})  # fmt: skip
            self.clients.append(build_client(cfg, ctx))
            self.proxies[str(100 + i)] = InProcessProxy(str(100 + i), self.clients[-1])
            self.manager.register(self.proxies[str(100 + i)])

    def round(self, server_round, parameters, drop=()):
        """configure_fit (advertise, share), fit all but `drop` (they shared, then vanished
        before sending a ciphertext), aggregate_fit (unmask). Returns (aggregate, results)."""
        sent = self.stack.configure_fit(server_round, parameters, self.manager)
        results = sorted(
            ((p, p.fit(ins, None, server_round)) for p, ins in sent if p.cid not in drop), key=lambda x: x[0].cid
        )
        failures = [ConnectionError(f"node {cid} dropped") for cid in drop]
        aggregate, _ = self.stack.aggregate_fit(server_round, results, failures)
        return aggregate, results


def trained(client):
    return get_weights(client.numpy_client.model, client.numpy_client.wire_names)


def alone(secret, res):
    """What a key holder colluding with the server decrypts from one client's payload."""
    header, cts = unpack_payload(parameters_to_ndarrays(res.parameters))
    slots = []
    for data in cts:
        plain = seal.Plaintext()
        secret.decryptor.decrypt(load_ciphertext(secret.public(), data), plain)
        slots.append(np.asarray(secret.encoder.decode_int64(plain), np.int64))
    return np.mod(np.concatenate(slots)[: masks.mask_count(header["num_values"])], secret.plain_modulus)


@pytest.fixture(scope="module")
def dropout_round(tmp_path_factory):
    """4 nodes (threshold ceil(8/3) = 3), node 103 drops after sharing."""
    fed = Federation(tmp_path_factory.mktemp("masks"))
    aggregate, results = fed.round(1, ndarrays_to_parameters(fed.initial), drop=("103",))
    return fed, aggregate, results


def test_a_client_that_drops_after_sharing_is_recovered_to_the_survivors_mean(dropout_round):
    fed, aggregate, results = dropout_round
    assert aggregate is not None and fed.stack.round_report(1)["secagg"]["clients_aggregated"] == 3
    assert he_layer(fed.stack).mask_failures == {}
    weights = [res.num_examples for _, res in results]
    models = [trained(fed.clients[int(p.cid) - 100]) for p, _ in results]
    mean = decrypt_model(fed.secret, parameters_to_ndarrays(aggregate), fed.shapes)
    # each survivor's fixed-point rounding is at most 0.5 unit of 1/scale on its weighted value
    bound = 0.5 * len(weights) / (fed.secret.params.scale * sum(weights)) + 1e-9
    for i, m in enumerate(mean):
        expected = sum(w * model[i].astype(np.float64) for w, model in zip(weights, models)) / sum(weights)
        assert np.max(np.abs(m - expected)) <= bound
        assert not np.allclose(m, fed.initial[i], atol=1e-3)  # the survivors trained


def test_a_colluding_key_holder_sees_one_clients_ciphertext_as_uniform_noise(dropout_round):
    fed, _, results = dropout_round
    t = fed.secret.plain_modulus
    for proxy, res in results:
        view = alone(fed.secret, res)
        update = np.concatenate([a.ravel() for a in trained(fed.clients[int(proxy.cid) - 100])])
        counts = np.bincount((view.astype(np.float64) / t * 32).astype(int), minlength=32)
        # p > 1e-6 per check (not 0.001): the masks come from fresh OS keys every run, so a
        # 0.001 threshold over 3 clients x 3 checks would fail about one CI run in a hundred
        assert stats.chisquare(counts).pvalue > 1e-6, counts
        assert stats.kstest(view.astype(np.float64) / t, "uniform").pvalue > 1e-6
        r = np.corrcoef(view[: update.size].astype(np.float64), update.astype(np.float64))[0, 1]
        assert abs(r) < 5 / np.sqrt(update.size), r  # 5 standard errors of a zero correlation
        # the same key holder reading an unmasked payload sees the model: the test can fail
    unmasked = np.rint(update * res.num_examples * fed.secret.params.scale).astype(np.int64) % t
    assert stats.kstest(unmasked.astype(np.float64) / t, "uniform").pvalue < 1e-6


def test_a_client_asked_for_both_shares_of_one_peer_refuses(dropout_round):
    """After the round's unmask request (b-shares of survivors 100-102, the s-share of dropped
    103), node 100 repeats the same answer, but a server then claiming that 101 dropped and 103
    survived, or that all four survived, gets nothing more from it."""
    fed, _, _ = dropout_round
    proxy = fed.proxies["100"]
    index = he_layer(fed.stack)._cohorts[1]["index"]
    survivors = sorted(index[c] for c in ("100", "101", "102"))
    ask = {masks.MASK_STAGE_KEY: "unmask", masks.MASK_ROUND_KEY: 1}
    again = proxy.get_properties(GetPropertiesIns({**ask, masks.SURVIVORS_KEY: json.dumps(survivors)}), None, 1)
    assert sorted(json.loads(again.properties[masks.B_SHARES_PROPERTY])) == sorted(map(str, survivors))
    assert list(json.loads(again.properties[masks.S_SHARES_PROPERTY])) == [str(index["103"])]
    # the lie: 101 dropped and 103 survived (the threshold of 3 survivors still met)
    lie = sorted(index[c] for c in ("100", "102", "103"))
    both = sorted((index["101"], index["103"]))
    with pytest.raises(HEError, match=re.escape(f"refusing to reveal both shares of peers {both} in round 1")):
        proxy.get_properties(GetPropertiesIns({**ask, masks.SURVIVORS_KEY: json.dumps(lie)}), None, 1)
    # the dropped peer's b-share is never given after its s-share, whatever else is asked
    everyone = sorted(index.values())
    with pytest.raises(HEError, match=re.escape(f"refusing to reveal both shares of peers {[index['103']]} in round 1")):
        proxy.get_properties(GetPropertiesIns({**ask, masks.SURVIVORS_KEY: json.dumps(everyone)}), None, 1)


def he_layer(stack):
    """The HomomorphicAggregation layer of the stack (under the meter and workload layers)."""
    layer = stack
    while not isinstance(layer, HomomorphicAggregation):
        layer = layer.strategy
    return layer


def test_a_round_below_the_threshold_fails_cleanly_and_the_next_round_recovers(dropout_round):
    """Round 2: two of four drop (threshold 3): no update, recorded; round 3: all four."""
    fed, aggregate, _ = dropout_round
    failed, _ = fed.round(2, aggregate, drop=("102", "103"))
    assert failed is None
    report = fed.stack.round_report(2)["secagg"]
    assert report["skipped"] == "masks: 2 of 4 masked nodes survived, the threshold is 3"
    he = he_layer(fed.stack)
    assert he.clients_summed(2) == 0 and he.mask_failures == {2: "2 of 4 masked nodes survived, the threshold is 3"}
    recovered, results = fed.round(3, aggregate)  # the server kept round 1's model
    assert recovered is not None and fed.stack.round_report(3)["secagg"]["clients_aggregated"] == 4
    weights = [res.num_examples for _, res in results]
    mean = decrypt_model(fed.secret, parameters_to_ndarrays(recovered), fed.shapes)
    models = [trained(c) for c in fed.clients]
    expected = sum(w * m[0].astype(np.float64) for w, m in zip(weights, models)) / sum(weights)
    assert np.max(np.abs(mean[0] - expected)) <= 0.5 * 4 / (fed.secret.params.scale * sum(weights)) + 1e-9


class BadShares:
    """Node 101 turned hostile for one round: its unmask answer carries altered b-shares."""

    def __init__(self, proxy):
        self.proxy, self.honest = proxy, proxy.get_properties

    def __enter__(self):
        def tampered(ins, timeout, group_id):
            res = self.honest(ins, timeout, group_id)
            if ins.config.get(masks.MASK_STAGE_KEY) == "unmask":
                shares = json.loads(res.properties[masks.B_SHARES_PROPERTY])
                shares = {j: share[:-2] + ("00" if share[-2:] != "00" else "01") for j, share in shares.items()}
                res.properties[masks.B_SHARES_PROPERTY] = json.dumps(shares)
            return res

        self.proxy.get_properties = tampered

    def __exit__(self, *exc):
        self.proxy.get_properties = self.honest


def test_bad_shares_fail_the_round_recorded_never_a_corrupted_model(dropout_round):
    fed, aggregate, _ = dropout_round
    with BadShares(fed.proxies["101"]):
        failed, _ = fed.round(4, aggregate)
    assert failed is None
    why = he_layer(fed.stack).mask_failures[4]
    # a flipped byte either breaks the shares' padding or yields another seed than committed
    assert re.fullmatch(r"member \d's self-mask seed does not reconstruct \(bad shares: (shares do not combine "
                        r"\(Failed to combine shares\)|not its commitment)\)", why), why
    assert fed.stack.round_report(4)["secagg"]["skipped"] == f"masks: {why}"


# ------------------------------------------------------------------ the node's checks, alone
def nodes_sharing(n, threshold, server_round=1):
    states = [RecordDict() for _ in range(n)]
    keys = [masks.advertise(s, server_round) for s in states]
    peers = [[k[masks.SHARE_PK_PROPERTY], k[masks.MASK_PK_PROPERTY]] for k in keys]
    return states, peers


class BarrierProxy(InProcessProxy):
    """A node that answers a mask step only once every node of the cohort has been asked it:
    sent one node after the other, the first waits alone and the barrier breaks."""

    def __init__(self, inner: InProcessProxy, barrier: threading.Barrier, stages: list) -> None:
        super().__init__(inner.cid, inner.client)
        self.barrier, self.stages = barrier, stages

    def get_properties(self, ins, timeout, group_id):
        self.barrier.wait(timeout=20)
        self.stages.append(str(ins.config[masks.MASK_STAGE_KEY]))
        return super().get_properties(ins, timeout, group_id)


def test_each_mask_step_asks_every_node_at_once(tmp_path):
    """One round trip per protocol step, not one per node: advertise, share and unmask reach
    all four nodes concurrently (each node blocks until all four are asked), and the round
    then aggregates all four."""
    fed = Federation(tmp_path)
    barrier, stages = threading.Barrier(4), []
    fed.manager = SimpleClientManager()
    for cid, proxy in list(fed.proxies.items()):
        fed.proxies[cid] = BarrierProxy(proxy, barrier, stages)
        fed.manager.register(fed.proxies[cid])
    aggregate, results = fed.round(1, ndarrays_to_parameters(fed.initial))
    assert stages == ["advertise"] * 4 + ["share"] * 4 + ["unmask"] * 4
    assert aggregate is not None and he_layer(fed.stack).mask_failures == {}
    assert fed.stack.round_report(1)["secagg"]["clients_aggregated"] == 4 == len(results)


def test_a_node_refuses_a_threshold_at_or_below_half_the_cohort_and_a_second_sharing():
    states, peers = nodes_sharing(4, 2)
    with pytest.raises(HEError, match=r"mask threshold 2 for a cohort of 4: it must be in \(2, 4\]"):
        masks.share(states[0], 1, peers, 2)
    masks.share(states[0], 1, peers, 3)
    with pytest.raises(HEError, match="a second share request for round 1"):
        masks.share(states[0], 1, peers, 3)
    other, _ = nodes_sharing(1, 1)
    with pytest.raises(HEError, match="omits this node"):
        masks.share(other[0], 1, peers, 3)


def test_shares_are_sealed_to_their_peer_and_reconstruct_only_from_the_threshold():
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares

    states, peers = nodes_sharing(3, 2)
    answers = [json.loads(masks.share(s, 1, peers, 2)[masks.SHARES_PROPERTY]) for s in states]
    sealed = bytearray(bytes.fromhex(answers[1][0]))
    sealed[5] ^= 1  # the server flips one bit of what node 1 sends node 0
    config = {masks.PEERS_KEY: json.dumps(peers), masks.MEMBERS_KEY: json.dumps([0, 1, 2]),
              masks.INBOX_KEY: json.dumps({"1": sealed.hex(), "2": answers[2][0]})}  # fmt: skip
    secret = new_context(HEParams())
    with pytest.raises(HEError, match="the shares of member 1 do not open"):
        masks.masked_input(secret, states[0], config, 1, "layout", 10)
    # node 0's s key from two shares (threshold 2) and not from one
    s0 = bytes.fromhex(json.loads(states[0][masks.STATE]["json"])["s"])
    kept = json.loads(states[0][masks.STATE]["json"])["kept"]["0"]
    with pytest.raises(HEError, match="1 shares, the threshold is 2"):
        masks.reconstruct([bytes.fromhex(kept["s"])], 2)
    c1 = _x25519_private(json.loads(states[1][masks.STATE]["json"])["c"])
    box, info = _box(c1, bytes.fromhex(peers[0][0]), 1, 0, 1)
    share_for_1 = json.loads(box.decrypt(bytes(12), bytes.fromhex(answers[0][1]), info))
    assert combine_shares([bytes.fromhex(kept["s"]), bytes.fromhex(share_for_1["s"])]) == s0


@pytest.mark.parametrize("threshold", [1, 5])
def test_a_mask_threshold_outside_two_to_the_smallest_cohort_is_a_config_error(threshold):
    from core.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"{threshold}: use 0 (ceil(2n/3) of each cohort) or a number in [2, strategy.min_train_clients=4]")):
        load_config(f"{OVERRIDES} secagg.mask_threshold={threshold}")
    assert load_config(f"{OVERRIDES} secagg.mask_threshold=4").secagg.mask_threshold == 4
