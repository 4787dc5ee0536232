"""Checkpoint after every round and resume: the state of every layer survives a restart, and
what cannot be restored honestly is refused."""

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from app.checkpoint import Checkpoint, CheckpointError, check_resumable, load, save
from app.config import load_config
from core.config import ConfigError, resolved_yaml
from strategies.factory import build_strategy
from tests.support.proxies import fit_res, manager

SHAPES = [(3, 4), (4,)]


def zeros():
    return [np.zeros(s, np.float32) for s in SHAPES]


def run_round(stack, r, cm, global_arrays, rng):
    sent = stack.configure_fit(r, ndarrays_to_parameters(global_arrays), cm)
    results = [(p, fit_res([g + rng.normal(0, 1, g.shape).astype(np.float32) for g in global_arrays]))
               for p, _ in sent]  # fmt: skip
    params, _ = stack.aggregate_fit(r, results, [])
    return parameters_to_ndarrays(params)


@pytest.mark.parametrize("overrides", [
    "strategy=fedadam privacy=adaptive privacy.noise_multiplier=0.2 privacy.clipped_count_stddev=1",
    "strategy=fedavgm privacy=server_fixed",
])  # fmt: skip
def test_a_resumed_stack_continues_exactly_where_the_first_stopped(tmp_path, overrides):
    """Two rounds, checkpoint, a fresh stack loaded from it: round 3 on the resumed stack
    equals round 3 on the original (same noise draws injected into both): the accountant,
    the adaptive clipping norm and the server optimizer's moments all carried over."""
    from protections.dp.server import ClientLevelDP

    cfg = load_config(overrides + " strategy.fraction_train=1.0")
    cm = manager(10)

    def fresh():
        return build_strategy(cfg, ndarrays_to_parameters(zeros()), None)

    def dp_layer(stack):
        while not isinstance(stack, ClientLevelDP):
            stack = stack.strategy
        return stack

    first, g = fresh(), zeros()
    for r in (1, 2):
        g = run_round(first, r, cm, g, np.random.default_rng(r))
    save(tmp_path, 2, g, first.state_dict(), {"rounds": [{}, {}]}, resolved_yaml(cfg))
    checkpoint = load(tmp_path)
    resumed = fresh()
    resumed.load_state_dict(checkpoint.strategy_state)
    assert dp_layer(resumed).clipping_norm == dp_layer(first).clipping_norm
    outputs = []
    for stack in (first, resumed):
        dp_layer(stack).noise = np.random.default_rng(7)
        outputs.append(run_round(stack, 3, cm, checkpoint.parameters, np.random.default_rng(3)))
    for a, b in zip(*outputs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    a, b = (s.round_report(3)["privacy"] for s in (first, resumed))
    assert b["epsilon"] == pytest.approx(a["epsilon"], rel=1e-9) and b["releases"] == 3
    # and it is not what a fresh optimizer would do from the same model
    restarted = build_strategy(cfg, ndarrays_to_parameters(checkpoint.parameters), None)
    dp_layer(restarted).noise = np.random.default_rng(7)
    restarted = run_round(restarted, 1, cm, checkpoint.parameters, np.random.default_rng(3))
    assert max(float(np.abs(x - y).max()) for x, y in zip(restarted, outputs[1])) > 1e-4


def test_checkpoint_write_is_atomic_and_replaces_the_previous(tmp_path):
    cfg = load_config("")
    for r in (1, 2):
        save(tmp_path, r, [np.full(3, r, np.float32)], {"base": {}}, {"rounds": []}, resolved_yaml(cfg))
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["arrays-2.npz", "state.json"]
    assert load(tmp_path).parameters[0].tolist() == [2, 2, 2]


@pytest.mark.parametrize("overrides,says", [
    ("privacy=dpsgd", "each client's accountant lives in the first run's Flower contexts"),
    ("privacy=local", "restart their epsilon at 0"),
    ("model=cnn", "model.name"),
    ("num_rounds=2", "nothing left to run; raise num_rounds"),
])  # fmt: skip
def test_resume_refuses_what_it_cannot_restore(tmp_path, overrides, says):
    first = load_config(f"output_dir={tmp_path}")
    save(tmp_path, 2, zeros(), {"base": {}}, {"rounds": []}, resolved_yaml(first))
    cfg = load_config(f"{overrides} output_dir={tmp_path} resume=true")
    with pytest.raises(CheckpointError) as err:
        check_resumable(load(tmp_path), cfg, resolved_yaml(cfg))
    assert says in str(err.value)


def test_resume_needs_a_checkpoint_and_an_output_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist: resume needs the output_dir"):
        load(tmp_path)
    with pytest.raises(ConfigError, match="resume=true continues the run in output_dir"):
        load_config("resume=true")


@pytest.mark.e2e
def test_a_run_resumes_from_its_checkpoint_end_to_end(flower, tmp_path):
    """`flwr run` for 2 rounds, then `resume=true num_rounds=4` into the same folder: rounds 3
    and 4 run on the checkpointed model and accountant; results.json holds all four."""
    import json

    out = tmp_path / "run"
    common = f"privacy=server_fixed privacy.noise_multiplier=0.5 output_dir={out}"
    proc = flower.run(f"{common} num_rounds=2", num_supernodes=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = json.loads((out / "results.json").read_text())
    assert load(out).server_round == 2
    proc = flower.run(f"{common} num_rounds=4 resume=true", num_supernodes=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["status"] == "completed" and results["run"]["resumed_after_round"] == 2
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4]
    assert results["rounds"][:2] == first["rounds"]
    epsilons = [r["privacy"]["epsilon"] for r in results["rounds"]]
    assert epsilons == sorted(epsilons) and epsilons[3] > epsilons[1]  # accountant carried on
    assert results["rounds"][3]["privacy"]["releases"] == 4
    assert results["final"]["rounds_completed"] == 4 and (out / "model.pt").exists()


# ------------------------------------------------------------------ resume under HE
def _results(run, pending=None):
    """What the ServerApp's checkpoint stores: the results so far, with a round in progress."""
    results = run.recorder.results
    if pending is not None:
        results = {**results, "rounds": [*results["rounds"], pending.to_dict()]}
    return results


def _checkpointed_run(overrides, out, rounds):
    """An in-process run of `overrides` that checkpoints as the ServerApp does and stops after
    `rounds` rounds (a crash between rounds): its checkpoint."""
    from tests.support.rounds import in_process_run

    holder = {}

    def checkpoint(server_round, arrays, state, pending=None):
        run = holder["run"]
        save(out, server_round, arrays, state, _results(run, pending), resolved_yaml(run.cfg))

    holder["run"] = in_process_run(overrides, out, num_nodes=3, seed=0, checkpoint_fn=checkpoint)
    holder["run"].fit(num_rounds=rounds)
    return load(out)


def _decrypted(run):
    from protections.he.client import decrypt_model
    from protections.he.context import load_context
    from core.models import get_weights

    arrays = list(run.server.strategy.global_model.arrays(run.server.parameters))
    shapes = [a.shape for a in get_weights(run.model, run.wire)]
    return decrypt_model(load_context(run.path / "keys" / "secret.ctx"), arrays, shapes)


@pytest.mark.parametrize("privacy", ["", "privacy=client_fixed privacy.noise_multiplier=0.5"])
def test_an_he_run_resumes_from_its_encrypted_checkpoint(tmp_path, privacy):
    """secagg=he (pairwise masks on, the default): 1 round, a stop, resume=true for rounds 2
    and 3 with the first run's keys. Without DP the decrypted final model equals an
    uninterrupted 3-round run's bit for bit (BFV sums exactly, masks cancel exactly); with
    client-level DP the accountant continues (round 3's epsilon is the uninterrupted run's)."""
    from protections.he.context import is_payload
    from tests.support.rounds import in_process_run

    overrides = f"secagg=he model=linear num_rounds=3 {privacy}".strip()
    full = in_process_run(overrides, tmp_path / "full", num_nodes=3, seed=0).fit()
    out = tmp_path / "resumed"
    checkpoint = _checkpointed_run(overrides, out, 1)
    assert checkpoint.server_round == 1 and is_payload(checkpoint.parameters)  # the encrypted sum
    cfg = load_config(overrides)
    check_resumable(checkpoint, cfg, resolved_yaml(cfg))
    resumed = in_process_run(overrides, out, num_nodes=3, seed=0, resume=checkpoint).fit()
    rounds = resumed.recorder.record.rounds
    assert [r.round for r in rounds] == [1, 2, 3] and resumed.recorder.record.run.resumed_after_round == 1
    assert all(r.aggregated is not False for r in rounds)
    if not privacy:
        for a, b in zip(_decrypted(full), _decrypted(resumed)):
            assert np.array_equal(a, b)
    else:
        eps = [r.privacy.epsilon for r in rounds]
        assert eps == sorted(eps) and eps[2] == pytest.approx(full.recorder.record.rounds[2].privacy.epsilon, rel=1e-9)


def test_an_he_resume_with_other_keys_is_refused_naming_both_fingerprints(tmp_path):
    from protections.he.context import HEError, load_context, provision
    from protections.he.config import he_params
    from tests.support.rounds import in_process_run

    overrides = "secagg=he model=linear num_rounds=3"
    out = tmp_path / "run"
    checkpoint = _checkpointed_run(overrides, out, 1)
    first = load_context(out / "keys" / "public.ctx").fingerprint
    provision(he_params(load_config(overrides)), out / "keys")  # the keys replaced
    other = in_process_run(overrides, out, num_nodes=3, seed=0, resume=checkpoint)
    with pytest.raises(HEError) as err:
        other.fit()
    assert f"encrypted under the HE keys with fingerprint {first}" in str(err.value)
    assert load_context(out / "keys" / "public.ctx").fingerprint in str(err.value)



def test_a_crash_during_federated_evaluation_under_dp_does_not_release_a_round_twice(tmp_path, monkeypatch):
    """Client-level DP with federated evaluation on: round 2's aggregate goes to the
    evaluating clients, then the run dies before the round's end. The round was checkpointed
    before its model left the server, so the resumed run goes on with round 3: every round's
    model reaches the evaluators once, and the accountant counts exactly the 3 releases."""
    from collections import Counter

    from clients.torch_client import TorchClient
    from tests.support.rounds import in_process_run

    evaluated = []
    original = TorchClient.evaluate

    def evaluate(self, parameters, config):
        evaluated.append(int(config["server_round"]))
        return original(self, parameters, config)

    monkeypatch.setattr(TorchClient, "evaluate", evaluate)
    overrides = ("model=linear num_rounds=3 strategy.fraction_train=1.0 privacy=client_fixed "
                 "privacy.noise_multiplier=1.0 privacy.unprotected_metrics=true")  # fmt: skip
    out, holder = tmp_path / "run", {}

    def checkpoint(server_round, arrays, state, pending=None):
        if server_round == 2 and pending is None:  # round 2 evaluated; killed before its end
            raise KeyboardInterrupt
        save(out, server_round, arrays, state, _results(holder["run"], pending), resolved_yaml(holder["run"].cfg))

    holder["run"] = in_process_run(overrides, out, num_nodes=3, checkpoint_fn=checkpoint)
    with pytest.raises(KeyboardInterrupt):
        holder["run"].fit()
    checkpoint_2 = load(out)
    assert checkpoint_2.server_round == 2 and [r["round"] for r in checkpoint_2.results["rounds"]] == [1, 2]
    resumed = in_process_run(overrides, out, num_nodes=3, resume=checkpoint_2).fit()
    counts = Counter(evaluated)
    assert sorted(counts) == [1, 2, 3] and len(set(counts.values())) == 1  # each model released once
    rounds = resumed.recorder.record.rounds
    assert [r.round for r in rounds] == [1, 2, 3] and rounds[-1].privacy.releases == 3


def test_a_checkpoint_written_before_a_key_existed_resumes_when_the_key_keeps_its_default(tmp_path):
    from omegaconf import OmegaConf

    cfg = load_config(f"output_dir={tmp_path} num_rounds=2")
    older = OmegaConf.to_container(OmegaConf.create(resolved_yaml(cfg)))
    del older["evaluation"], older["strategy"]["evaluate_every"]  # keys added since
    resumed = load_config(f"output_dir={tmp_path} num_rounds=4 resume=true")
    check_resumable(Checkpoint(2, [], {}, {}, OmegaConf.to_yaml(older)), resumed, resolved_yaml(resumed))
    changed = load_config(f"output_dir={tmp_path} num_rounds=4 resume=true strategy.evaluate_every=2")
    with pytest.raises(CheckpointError, match=r"strategy.evaluate_every changed"):
        check_resumable(Checkpoint(2, [], {}, {}, OmegaConf.to_yaml(older)), changed, resolved_yaml(changed))


def test_the_server_app_reuses_the_first_runs_keys_on_resume_and_refuses_a_secret_one(tmp_path):
    """app/server_app.py prepare_he_keys(resume=True): no key is provisioned; missing keys
    and a public.ctx that holds the secret key are refused, naming the folder."""
    import shutil

    from app.server_app import prepare_he_keys
    from protections.he.config import he_params
    from protections.he.context import HE_SECRET_PATH_KEY, HEError, provision

    cfg = load_config("secagg=he")
    with pytest.raises(HEError, match="needs the first run's keys in"):
        prepare_he_keys(cfg, "secagg=he", tmp_path, resume=True)
    secret, public = provision(he_params(cfg), tmp_path / "keys")
    context, client_config = prepare_he_keys(cfg, "secagg=he", tmp_path, resume=True)
    assert not context.is_secret and client_config == {HE_SECRET_PATH_KEY: str(secret)}
    shutil.copy(secret, public)
    with pytest.raises(HEError, match="holds a secret key: put the first run's public.ctx back"):
        prepare_he_keys(cfg, "secagg=he", tmp_path, resume=True)
