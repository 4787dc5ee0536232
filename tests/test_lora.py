"""LoRA adapters through peft (`model.lora.r`, core/finetune.py): every party builds the same
adapters on the frozen pretrained base, only adapter tensors travel (and are encrypted under
HE), the base never changes, and the saved model is the merged one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.common import Code, FitIns, ndarray_to_bytes, ndarrays_to_parameters, parameters_to_ndarrays
from hypothesis import given, settings
from hypothesis import strategies as st

from app.config import load_config
from core.config import ConfigError
from protections.he.config import he_params
from core.data import data_spec
from core.finetune import build_finetune_model, merged_model
from protections.he.context import provision
from core.models import build_model, get_weights
from tests.support.finetune import PUBLIC, client_for

DIGITS = data_spec(load_config("").dataset)
# mlp [64] on digits: Linear 0 (64 -> 64), ReLU 1, Linear 2 (64 -> 10)
ADAPTER_SHAPES_R4 = [(4, 64), (64, 4), (4, 64), (10, 4)]  # A, B of layer 0, then of layer 2
ADAPTER_VALUES_R4 = 4 * 64 + 64 * 4 + 4 * 64 + 10 * 4  # 808
MLP_VALUES = 64 * 64 + 64 + 64 * 10 + 10  # 4810


def wire_bytes(arrays) -> int:
    """Bytes of the arrays as Flower serializes them into a message (core/results.py counts these)."""
    return sum(len(ndarray_to_bytes(a)) for a in arrays)


def lora_cfg(ckpt, extra=""):
    return load_config(f"{PUBLIC} model.pretrained={ckpt} model.lora.r=4 {extra}")


def test_every_party_builds_the_same_adapters_and_the_initial_model_is_the_base(checkpoint):
    path, _ = checkpoint
    cfg = lora_cfg(path)
    server, wire = build_finetune_model(cfg.model, DIGITS, seed=cfg.seed)
    assert wire == ["0.lora_A.default.weight", "0.lora_B.default.weight",
                    "2.lora_A.default.weight", "2.lora_B.default.weight"]  # fmt: skip
    torch.manual_seed(123)  # a party's own RNG state does not change its adapters
    client = client_for(cfg).numpy_client
    for a, b in zip(get_weights(server, wire), get_weights(client.model, wire)):
        np.testing.assert_array_equal(a, b)
    a0 = get_weights(server, wire)[0]
    assert np.abs(a0).max() > 0 and not np.any(get_weights(server, wire)[1])  # A random, B zero
    base = build_model(cfg.model, DIGITS)
    base.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    x = torch.randn(32, 64)
    torch.testing.assert_close(server(x), base(x), rtol=0, atol=0)  # B = 0: the base's outputs
    other = build_finetune_model(load_config(f"{PUBLIC} model.pretrained={path} model.lora.r=4 seed=1").model, DIGITS, seed=1)[0]
    assert not np.array_equal(get_weights(other, wire)[0], a0)  # the seed decides A


@pytest.mark.parametrize("privacy", ["none", "dpsgd"])
def test_only_adapters_travel_both_ways_and_the_base_never_changes(checkpoint, privacy):
    """Down: the server's adapters (808 values: 3,744 bytes against 19,752 for the 4810-value model);
    up: the trained adapters, nothing else; the client's base tensors are the checkpoint's.
    DP-SGD (Opacus) computes per-sample gradients of peft's adapter layers too."""
    path, _ = checkpoint
    cfg = lora_cfg(path, f"privacy={privacy}")
    server, wire = build_finetune_model(cfg.model, DIGITS, seed=cfg.seed)
    sent = get_weights(server, wire)
    full_model_bytes = wire_bytes(get_weights(build_model(cfg.model, DIGITS)))
    assert sum(a.size for a in sent) == ADAPTER_VALUES_R4
    # float32 values plus a 128-byte .npy header per tensor: 5.3x fewer bytes than the model
    assert (wire_bytes(sent), full_model_bytes) == (808 * 4 + 4 * 128, 4810 * 4 + 4 * 128)
    client = client_for(cfg)
    res = client.fit(FitIns(ndarrays_to_parameters(sent), {"server_round": 1}))
    assert res.status.code == Code.OK
    back = parameters_to_ndarrays(res.parameters)
    assert [a.shape for a in back] == ADAPTER_SHAPES_R4
    assert wire_bytes(back) == wire_bytes(sent)
    assert sum(len(t) for t in res.parameters.tensors) == wire_bytes(sent)  # the message itself
    assert all(not np.array_equal(b, s) for b, s in zip(back, sent))  # every adapter trained
    if privacy == "dpsgd":
        assert res.metrics["epsilon"] > 0
    ckpt = torch.load(path, weights_only=True)["state_dict"]
    state = client.numpy_client.model.state_dict()
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        base = name.replace(".", ".base_layer.", 1)
        torch.testing.assert_close(state[base], ckpt[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="8 arrays for a model with 4 trainable tensors"):
        client.fit(FitIns(ndarrays_to_parameters(get_weights(server)), {"server_round": 1}))


def test_lora_with_a_trainable_head_sends_the_head_too(checkpoint):
    path, _ = checkpoint
    cfg = lora_cfg(path, "model.trainable=head model.lora.target=0")
    _, wire = build_finetune_model(cfg.model, DIGITS, seed=cfg.seed)
    assert wire == ["0.lora_A.default.weight", "0.lora_B.default.weight", "2.weight", "2.bias"]


def test_under_he_only_the_adapters_are_encrypted(checkpoint, tmp_path):
    from protections.he.server import encrypted_header

    path, _ = checkpoint
    cfg = lora_cfg(path, "secagg=he")
    secret, _ = provision(he_params(cfg), tmp_path)
    model, wire = build_finetune_model(cfg.model, DIGITS, seed=cfg.seed)
    client = client_for(cfg, node_config={"he-secret-context": str(secret)})
    config = {"server_round": 1, "he_round": 1, "he_weighting": "examples"}
    res = client.fit(FitIns(ndarrays_to_parameters(get_weights(model, wire)), config))
    assert encrypted_header(res.parameters)["num_values"] == ADAPTER_VALUES_R4


@settings(max_examples=12, deadline=None)
@given(
    r=st.integers(1, 8),
    alpha=st.floats(0.5, 32.0),
    targets=st.sampled_from(["all", "0", "2"]),
    scale=st.floats(0.01, 1.0),
)
def test_merged_model_computes_what_the_adapted_model_computes(r, alpha, targets, scale):
    """Merging folds alpha / r * B @ A into each base layer: same outputs, the base model's
    tensor names and shapes, r * (in + out) wire values per adapted layer."""
    cfg = load_config(f"model.lora.r={r} model.lora.alpha={alpha} model.lora.target={targets}")
    model, wire = build_finetune_model(cfg.model, DIGITS, seed=0)
    dims = {"0": (64, 64), "2": (64, 10)}
    layers = ["0", "2"] if targets == "all" else [targets]
    assert sum(a.size for a in get_weights(model, wire)) == sum(r * sum(dims[n]) for n in layers)
    gen = torch.Generator().manual_seed(r)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))
    merged = merged_model(model)
    base_shapes = {k: v.shape for k, v in build_model(cfg.model, DIGITS).state_dict().items()}
    assert {k: v.shape for k, v in merged.state_dict().items()} == base_shapes
    x = torch.randn(16, 64, generator=gen)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged(x), merged_model(build_finetune_model(cfg.model, DIGITS, seed=0)[0])(x))


def test_lora_config_errors():
    with pytest.raises(ConfigError, match=r"model.lora.target='1': \['1'\] not a Linear module.*\['0', '2'\]"):
        load_config("model.lora.r=4 model.lora.target=1")
    with pytest.raises(ConfigError, match=r"\['features.0'\] not a Linear module.*\['head.0', 'head.2'\]"):
        load_config("model=cnn model.lora.r=4 model.lora.target=features.0")
    with pytest.raises(ConfigError, match="model.lora.r=-1: must be >= 1"):
        load_config("model.lora.r=-1")
    with pytest.raises(ConfigError, match="model.lora.alpha=0.0: must be > 0"):
        load_config("model.lora.r=4 model.lora.alpha=0")
    assert load_config("model=cnn model.lora.r=2 privacy=dpsgd").model.lora.r == 2  # Opacus copes


@pytest.mark.e2e
def test_federated_lora_fine_tuning_end_to_end(flower, tmp_path, pretrained_checkpoint):
    """The README's LoRA commands: pretrain on the public split, then `flwr run` with
    model.lora.r=4. Only adapter bytes travel each way; model.pt is the merged model (base
    names), different from the checkpoint; it reaches 90% accuracy on digits in 3 rounds."""
    ckpt, out = pretrained_checkpoint, tmp_path / "lora"
    proc = flower.run(
        f"dataset.public_fraction=0.2 model.pretrained={ckpt} model.lora.r=4 "
        f"num_rounds=3 output_dir={out}",
        num_supernodes=4,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    adapters = wire_bytes([np.zeros(s, np.float32) for s in ADAPTER_SHAPES_R4])
    for r in results["rounds"]:
        # 2 clients train and 2 evaluate (fraction 0.5 of 4): the adapters only, each way
        assert r["comm"] == {"bytes_down": 4 * adapters, "bytes_up": 2 * adapters}
    final = results["final"]
    assert final["num_trainable_parameters"] == ADAPTER_VALUES_R4 and final["num_parameters"] == MLP_VALUES
    print("LoRA e2e:", json.dumps({"initial": results["initial"], "final": final, "rounds": [r["centralized"] for r in results["rounds"]]}))
    assert final["centralized"]["accuracy"] >= 0.9
    assert final["centralized"]["accuracy"] > results["initial"]["centralized"]["accuracy"]
    state = torch.load(out / "model.pt", weights_only=True)
    pretrained = torch.load(ckpt, weights_only=True)["state_dict"]
    assert list(state) == list(pretrained)  # merged: the base model's tensors, no adapters
    for name in ("0.weight", "2.weight"):  # W + alpha/r * B @ A
        assert not torch.equal(state[name], pretrained[name])
    for name in ("0.bias", "2.bias"):  # lora bias="none": biases stay frozen
        torch.testing.assert_close(state[name], pretrained[name], rtol=0, atol=0)
    assert abs(final["int8_model"]["centralized"]["accuracy"] - final["centralized"]["accuracy"]) <= 0.02


def test_decrypt_model_writes_the_merged_model_of_the_encrypted_adapters(checkpoint, tmp_path):
    """`python -m app.he_keys decrypt-model` rebuilds the same adapters from the run's config,
    loads the decrypted ones and writes the merged model (base tensor names)."""
    from protections.he.context import load_context, pack_payload, unpack_payload
    from app.he_keys import decrypt_run_model
    from core.results import ENCRYPTED_MODEL_FILE, RunRecorder
    from protections.he.client import encrypt_update

    path, _ = checkpoint
    cfg = lora_cfg(path, "secagg=he")
    secret, _ = provision(he_params(cfg), tmp_path / "keys")
    RunRecorder(tmp_path, cfg)  # writes config.yaml, as the ServerApp does
    model, wire = build_finetune_model(cfg.model, DIGITS, seed=cfg.seed)
    gen = torch.Generator().manual_seed(0)
    adapters = [0.1 * torch.randn(a.shape, generator=gen).numpy() for a in get_weights(model, wire)]
    update = encrypt_update(load_context(str(secret)), adapters, 1, 1)
    # what HomomorphicAggregation makes of one client's update of weight 1: the same
    # ciphertexts, tagged as an aggregate with divisor 1
    header, ciphertexts = unpack_payload(update)
    header.update(kind="aggregate", divisor=1)
    header, packed = pack_payload(header, ciphertexts)
    np.savez(tmp_path / ENCRYPTED_MODEL_FILE, header=header, ciphertexts=packed)
    out = decrypt_run_model(tmp_path, secret, tmp_path / "model.pt")
    from core.models import set_weights

    set_weights(model, adapters, wire)
    expected = merged_model(model).state_dict()
    state = torch.load(out, weights_only=True)
    assert list(state) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # each decrypted adapter value is off by at most 0.5 / scale (fixed point); a merged weight
    # alpha/r * sum_k B_ik A_kj then by at most alpha * max|adapter| / scale (+ float32 rounding)
    peak = max(float(np.abs(a).max()) for a in adapters)
    bound = cfg.model.lora.alpha * peak / he_params(cfg).scale + 1e-6
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=bound)
