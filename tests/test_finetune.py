"""Fine-tuning from a pretrained checkpoint with a trainable subset (core/finetune.py,
app/pretrain.py): frozen tensors never travel, only trainable tensors change, a checkpoint
that does not fit is a clear config error, the public split is no client's data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import (
    Code,
    FitIns,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from app.config import load_config
from core.config import ConfigError
from protections.he.config import he_params
from core.data import data_spec, partition_layout, public_split
from core.finetune import build_finetune_model
from protections.he.context import provision
from core.models import get_weights
from app.pretrain import pretrain
from tests.support.finetune import PUBLIC, client_for

# One xdist worker runs this whole file: its module-scoped `checkpoint` (conftest) is built once.
pytestmark = pytest.mark.xdist_group("finetune")


def test_public_split_is_held_by_no_client():
    cfg = load_config(PUBLIC)
    parts, _, test_ids = partition_layout(cfg.dataset, cfg.partitioner, 10, cfg.seed)
    client_ids = np.concatenate(parts)
    public = public_split(cfg.dataset, cfg.seed)
    # the three sets partition digits' 1797 examples: public + clients + server test
    assert len(public) + len(client_ids) + len(test_ids) == 1797
    assert len(public) == pytest.approx(0.2 * (1797 - len(test_ids)), abs=1)
    baseline = load_config("")
    base_parts, _, _ = partition_layout(baseline.dataset, baseline.partitioner, 10, 0)
    assert len(np.concatenate(base_parts)) - len(client_ids) == len(public)


def test_pretrained_checkpoint_learns_on_the_public_split(checkpoint):
    _, meta = checkpoint
    assert meta["public_examples"] == 288
    assert meta["test"]["accuracy"] > 0.8  # 5 epochs on 288 digits


def test_checkpoint_of_another_shape_is_a_config_error(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ConfigError, match=r"shape mismatches: \['0.weight: checkpoint \(64, 64\), model \(32, 64\)"):
        load_config(f"{PUBLIC} model.pretrained={path} model.hidden_sizes=[32]")
    with pytest.raises(ConfigError, match="tensors missing from the checkpoint"):
        load_config(f"{PUBLIC} model.pretrained={path} model=cnn")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(f"model.pretrained={path.parent / 'nope.pt'}")
    with pytest.raises(ConfigError, match="absolute path"):
        load_config("model.pretrained=ckpt.pt")
    with pytest.raises(ConfigError, match="'classifier' is not a module"):
        load_config("model.trainable=classifier")


def test_pretrain_refuses_without_a_public_split(tmp_path):
    with pytest.raises(ConfigError, match="dataset.public_fraction"):
        pretrain([], tmp_path / "x.pt", epochs=1)


def test_frozen_tensors_never_travel_and_only_the_head_changes(checkpoint):
    """The server sends only the head; the client returns only the head, trained; frozen
    tensors are exactly the checkpoint's; sending the full model is an error."""
    path, _ = checkpoint
    cfg = load_config(f"{PUBLIC} model.pretrained={path} model.trainable=head")
    server_model, wire = build_finetune_model(cfg.model, data_spec(cfg.dataset), seed=cfg.seed)
    assert wire == ["2.weight", "2.bias"]  # mlp [64]: Linear 0, ReLU 1, Linear 2
    sent = get_weights(server_model, wire)
    client = client_for(cfg)
    res = client.fit(FitIns(ndarrays_to_parameters(sent), {"server_round": 1}))
    assert res.status.code == Code.OK
    back = parameters_to_ndarrays(res.parameters)
    assert [a.shape for a in back] == [(10, 64), (10,)]
    assert all(not np.array_equal(b, s) for b, s in zip(back, sent))  # the head trained
    ckpt = torch.load(path, weights_only=True)["state_dict"]
    model = client.numpy_client.model
    for name, tensor in model.state_dict().items():
        if name in wire:
            continue
        torch.testing.assert_close(tensor, ckpt[name], rtol=0, atol=0)  # frozen: unchanged
    full = get_weights(server_model)
    with pytest.raises(ValueError, match="4 arrays for a model with 2 trainable tensors"):
        client.fit(FitIns(ndarrays_to_parameters(full), {"server_round": 1}))


def test_under_he_only_the_trainable_tensors_are_encrypted(checkpoint, tmp_path):
    from protections.he.server import encrypted_header

    path, _ = checkpoint
    cfg = load_config(f"{PUBLIC} model.pretrained={path} model.trainable=head secagg=he")
    secret, _ = provision(he_params(cfg), tmp_path)
    model, wire = build_finetune_model(cfg.model, data_spec(cfg.dataset), seed=cfg.seed)
    client = client_for(cfg, node_config={"he-secret-context": str(secret)})
    config = {"server_round": 1, "he_round": 1, "he_weighting": "examples"}
    res = client.fit(FitIns(ndarrays_to_parameters(get_weights(model, wire)), config))
    header = encrypted_header(res.parameters)
    assert header["num_values"] == 10 * 64 + 10  # the head only, not the 4810 of the model
    assert len(header["lengths"]) == 1  # one ciphertext of 4096 slots


@pytest.mark.e2e
def test_federated_fine_tuning_of_the_head_with_int8_updates_end_to_end(
    flower, tmp_path, pretrained_checkpoint
):
    """The README's commands: pretrain on the public split, then `flwr run` fine-tuning the
    head from it with int8 updates and the capability workload. Exactly the head's bytes travel
    down and its int8 form up; the final model keeps the checkpoint's frozen tensors."""
    import json

    from flwr.common import ndarray_to_bytes

    ckpt, out = pretrained_checkpoint, tmp_path / "ft"
    proc = flower.run(
        f"dataset.public_fraction=0.2 model.pretrained={ckpt} model.trainable=head "
        f"compression=int8 workload=capability num_rounds=2 output_dir={out}",
        num_supernodes=4,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    head = [np.zeros((10, 64), np.float32), np.zeros(10, np.float32)]
    down = sum(len(ndarray_to_bytes(a)) for a in head)
    up = sum(len(ndarray_to_bytes(a)) for a in [h.astype(np.int8) for h in head] + [np.zeros(2, np.float32)])
    for r in results["rounds"]:
        # 2 clients train and 2 evaluate (fraction 0.5 of 4): the head only, each way
        assert r["comm"] == {"bytes_down": 4 * down, "bytes_up": 2 * up}
        assert r["compression"]["scheme"] == "int8"
        w = r["workload"]
        assert w["name"] == "capability" and w["round_time"] <= w["round_time_uniform"]
        assert set(w["compute"]) <= {1.0, 0.5, 0.25} and len(w["steps"]) == 2
    final = results["final"]
    assert final["num_trainable_parameters"] == 650 and final["num_parameters"] == 4810
    assert final["centralized"]["accuracy"] > 0.85
    state = torch.load(out / "model.pt", weights_only=True)
    pretrained = torch.load(ckpt, weights_only=True)["state_dict"]
    for name in ("0.weight", "0.bias"):
        torch.testing.assert_close(state[name], pretrained[name], rtol=0, atol=0)
    assert not torch.equal(state["2.weight"], pretrained["2.weight"])
    int8 = final["int8_model"]
    assert int8["bytes"] == (out / "model_int8.pt").stat().st_size
    assert final["model_bytes"] == (out / "model.pt").stat().st_size > 2 * int8["bytes"]
    assert abs(int8["centralized"]["accuracy"] - final["centralized"]["accuracy"]) <= 0.02
