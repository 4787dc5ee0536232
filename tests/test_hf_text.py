"""model=hf (core/hf_model.py) on dataset=text (core/text.py), offline: a tiny BERT and a
WordLevel tokenizer saved into a directory (tests/support/hf_text.py), a generated two-class
text file. A federated run with LoRA learns it; only the adapters and the head travel, and
under HE they are what is encrypted, the aggregate equal to the plaintext mean; DP-SGD runs
through Opacus and reports epsilon, and layers Opacus cannot handle are refused at config time;
the same holds for an image model on digits; a model that cannot be loaded offline and a file that does not fit the schema fail naming the
key or the column."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from app.config import load_config
from core.config import ConfigError
from core.data import centralized_test_split, data_spec, load_client_data, partition_layout
from core.finetune import build_finetune_model
from core.models import get_weights, num_parameters
from tests.support.finetune import client_for
from tests.support.hf_text import HIDDEN, LAYERS, texts, write_text_set, write_tiny_model, write_tiny_vit
from tests.support.rounds import in_process_run


R = 4
ADAPTER_VALUES = LAYERS * 2 * (R * HIDDEN + HIDDEN * R)  # query and value of 2 layers: 1024
HEAD_VALUES = HIDDEN * 2 + 2  # classifier: 32 -> 2
LEARN = "training.optimizer=adam training.lr=0.03"  # a random frozen base: Adam moves the head


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_text")
    return write_tiny_model(root / "tiny-bert"), write_text_set(root / "train.csv", 200), root


def overrides(files, extra=""):
    model, train, _ = files
    return (
        f"model=hf model.name_or_path={model} model.lora.r={R} model.lora.target='query,value' "
        f"dataset=text dataset.path={train} dataset.classes=[neg,pos] dataset.max_length=8 "
        f"simulation.num_supernodes=2 strategy.fraction_train=1 strategy.fraction_evaluate=0 {extra}"
    )


def test_federated_lora_run_learns_the_text_set_sending_only_adapters_and_head(files, tmp_path):
    """3 rounds of 2 clients (80 training texts each): 50% (chance) to >= 90% on the server's
    40 held-out texts (0.5, 0.925, 1.0 after rounds 1-3 when written; no dropout: the same
    figures every run). Each way, per client: 1090 values (1024 adapter values and the 66 of
    the head) of a 21k-parameter model."""
    run = in_process_run(overrides(files, f"{LEARN} num_rounds=3"), tmp_path, centralized_test=True)
    assert sum(a.size for a in get_weights(run.model, run.wire)) == ADAPTER_VALUES + HEAD_VALUES
    assert run.wire[-2:] == ["hf.classifier.weight", "hf.classifier.bias"]
    assert all(".lora_A." in n or ".lora_B." in n for n in run.wire[:-2])
    run.fit().finish()
    record = run.recorder.record
    assert record.initial.centralized["accuracy"] == 0.5
    assert record.final.centralized["accuracy"] >= 0.9
    wire_bytes = sum(a.nbytes + 128 for a in get_weights(run.model, run.wire))  # + .npy headers
    assert all(r.comm.bytes_down == 2 * wire_bytes and r.comm.bytes_up == 2 * wire_bytes
               for r in record.rounds)  # fmt: skip
    assert record.final.num_trainable_parameters == ADAPTER_VALUES + HEAD_VALUES
    # model.pt is the merged model: the base's tensors with the adapters folded in
    assert record.final.num_parameters == num_parameters(run.model) - ADAPTER_VALUES > 18 * (ADAPTER_VALUES + HEAD_VALUES)


def test_an_image_model_learns_digits(files, tmp_path):
    """AutoModelForImageClassification on digits' 1x8x8 images: a tiny ViT with LoRA on its
    query and value projections, 2 rounds: from chance (10 classes) to >= 50% (0.70 when
    written); only the adapters and the 10-class head travel."""
    vit = write_tiny_vit(files[2] / "tiny-vit")
    run = in_process_run(
        f"model=hf model.name_or_path={vit} model.lora.r={R} model.lora.target='q_proj,v_proj' "
        f"dataset=digits {LEARN} training.local_epochs=1 num_rounds=2 simulation.num_supernodes=2 "
        "strategy.fraction_train=1 strategy.fraction_evaluate=0",
        tmp_path, centralized_test=True,
    ).fit()  # fmt: skip
    assert sum(a.size for a in get_weights(run.model, run.wire)) == ADAPTER_VALUES + HIDDEN * 10 + 10
    rounds = run.recorder.record.rounds
    assert rounds[-1].centralized["accuracy"] >= 0.5


def test_every_party_builds_the_same_model_and_the_text_is_partitioned(files):
    cfg = load_config(overrides(files, "partitioner=dirichlet partitioner.alpha=1.0"))
    assert cfg.dataset.tokenizer == cfg.model.name_or_path  # null: the model's own
    spec = data_spec(cfg.dataset)
    a, wire = build_finetune_model(cfg.model, spec, seed=cfg.seed)
    b, _ = build_finetune_model(cfg.model, spec, seed=cfg.seed)
    for x, y in zip(get_weights(a), get_weights(b)):
        np.testing.assert_array_equal(x, y)
    other = build_finetune_model(cfg.model, spec, seed=cfg.seed + 1)[0]
    assert not np.array_equal(get_weights(other, wire)[-2], get_weights(a, wire)[-2])  # the head's seed
    ids, labels, test_ids = partition_layout(cfg.dataset, cfg.partitioner, 2, cfg.seed)
    assert len(test_ids) == 40 and sorted(np.concatenate([*ids, test_ids]).tolist()) == list(range(200))
    train, _ = load_client_data(cfg.dataset, cfg.partitioner, 0, 2, cfg.seed)
    assert train.x.shape[1] == 16 and train.x.dtype == np.int64  # 8 token ids, 8 mask values
    # token ids: [CLS] (id 2) first, then the text; the mask covers the 8 tokens
    assert (train.x[:, 0] == 2).all() and (train.x[:, 8:] == 1).all()


def test_dpsgd_trains_the_adapters_and_head_with_opacus_and_reports_epsilon(files):
    cfg = load_config(overrides(files, f"{LEARN} privacy=dpsgd privacy.noise_multiplier=0.8 "
                                       "privacy.sample_rate=0.1 training.local_epochs=1"))  # fmt: skip
    model, wire = build_finetune_model(cfg.model, data_spec(cfg.dataset), seed=cfg.seed)
    sent = get_weights(model, wire)
    res = client_for(cfg, num_partitions=2).fit(FitIns(ndarrays_to_parameters(sent), {"server_round": 1}))
    assert res.status.code == Code.OK
    assert res.metrics["epsilon"] > 0
    back = parameters_to_ndarrays(res.parameters)
    assert [a.shape for a in back] == [a.shape for a in sent]
    assert all(not np.array_equal(b, s) for b, s in zip(back, sent))  # every tensor trained


def test_dpsgd_refuses_what_opacus_cannot_compute_per_example(files):
    dp = "privacy=dpsgd"
    with pytest.raises(ConfigError, match=r"one gradient for the whole batch.*position_embeddings\.weight"):
        load_config(overrides(files, f"{dp} model.lora.r=0 model.trainable=all"))
    with pytest.raises(ConfigError, match=r"no per-sample gradients.*word_embeddings\.lora_embedding_A \(torch\.nn\.modules\.container\.ParameterDict\)"):
        load_config(overrides(files, f"{dp} model.lora.target=word_embeddings"))
    # the embeddings' word table alone is called per example: Opacus' Embedding sampler
    assert load_config(overrides(files, f"{dp} model.lora.r=0 model.trainable='hf.bert.embeddings.word_embeddings,hf.classifier'"))
    assert load_config(overrides(files, "model.lora.target=word_embeddings"))  # without DP-SGD: fine


def test_under_he_the_adapters_and_head_are_encrypted_and_aggregate_to_the_plaintext_mean(files, tmp_path):
    from protections.he.client import decrypt_model
    from protections.he.config import he_params
    from protections.he.context import load_context, provision
    from protections.he.server import HomomorphicAggregation, encrypted_header
    from flwr.server.strategy import FedAvg
    from tests.support.proxies import manager

    # client_fixed's check of the fixed-point slack counts the encrypted values: these 1090
    with pytest.raises(ConfigError, match="the fixed-point rounding of 1090 encrypted values"):
        load_config(overrides(files, "secagg=he privacy=client_fixed privacy.clipping_norm=0.001 "
                                     "secagg.scale_bits=8 privacy.noise_multiplier=0.5"))  # fmt: skip
    cfg = load_config(overrides(files, f"{LEARN} secagg=he training.local_epochs=1"))
    secret, public = provision(he_params(cfg), tmp_path)
    model, wire = build_finetune_model(cfg.model, data_spec(cfg.dataset), seed=cfg.seed)
    initial = get_weights(model, wire)
    strategy = HomomorphicAggregation(FedAvg(fraction_fit=1.0, min_fit_clients=2, min_available_clients=2),
                                      load_context(public))  # fmt: skip
    sent = strategy.configure_fit(1, ndarrays_to_parameters(initial), manager(2))
    results, trained, weights = [], [], []
    for i, (proxy, _) in enumerate(sent):
        client = client_for(cfg, partition_id=i, num_partitions=2, node_config={"he-secret-context": str(secret)})
        config = {"server_round": 1, "he_round": 1, "he_weighting": "examples"}
        res = client.fit(FitIns(ndarrays_to_parameters(initial), config))
        assert encrypted_header(res.parameters)["num_values"] == ADAPTER_VALUES + HEAD_VALUES
        trained.append(get_weights(client.numpy_client.model, wire))  # what this client encrypted
        weights.append(res.num_examples)
        results.append((proxy, FitRes(Status(Code.OK, ""), res.parameters, res.num_examples, {})))
    params, _ = strategy.aggregate_fit(1, results, [])
    mean = decrypt_model(load_context(secret), parameters_to_ndarrays(params), [a.shape for a in initial])
    scale = he_params(cfg).scale
    for i, got in enumerate(mean):
        expected = sum(w * t[i].astype(np.float64) for w, t in zip(weights, trained)) / sum(weights)
        assert np.max(np.abs(got - expected)) <= 0.5 / scale + 1e-9  # fixed-point rounding only
        assert not np.allclose(got, initial[i])  # the clients trained


def test_a_model_that_cannot_be_loaded_or_does_not_fit_names_the_key_and_the_fix(files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    absent = overrides(files).replace(f"model.name_or_path={files[0]}", "model.name_or_path=nobody/absent-model")
    with pytest.raises(ConfigError, match=r"model\.name_or_path='nobody/absent-model' could not be loaded "
                                          r"\(HF_HUB_OFFLINE is set.*save_pretrained"):  # fmt: skip
        load_config(absent)
    missing_dir = overrides(files).replace(f"model.name_or_path={files[0]}", f"model.name_or_path={files[2]}/nothing")
    with pytest.raises(ConfigError, match=r"model\.name_or_path='.*/nothing': no such directory: point"):
        load_config(missing_dir)
    not_a_model = overrides(files).replace(f"model.name_or_path={files[0]}", f"model.name_or_path={files[2]}")
    with pytest.raises(ConfigError, match=r"could not be loaded \(a local directory, but not one transformers can load"):
        load_config(not_a_model)  # the fixture's root: text files, no config.json
    with pytest.raises(ConfigError, match=r"dataset.max_length=65 exceeds the model's 64 positions"):
        load_config(overrides(files).replace("dataset.max_length=8", "dataset.max_length=65"))
    with pytest.raises(ConfigError, match=r"'qkv' matches no module of this model outside its head \['hf.classifier'\].*\['dense', 'key', 'query', 'value'\]"):
        load_config(overrides(files).replace("model.lora.target='query,value'", "model.lora.target=qkv"))
    with pytest.raises(ConfigError, match="model=hf needs a model"):
        load_config("model=hf dataset=digits")


def test_text_file_schema_errors_name_the_column_never_a_value(files):
    root = files[2]
    secret = "patient-7731"  # a cell's value: it must not reach any message
    rows = [(t, lab) for t, lab in texts(20)]
    bad_label = write_text_set(root / "bad_label.jsonl", 0, rows=[*rows[:5], ("fine day", secret), *rows[5:]])
    cfg = load_config(overrides(files).replace(str(files[1]), str(bad_label)))
    with pytest.raises(ValueError, match=r"1 row has a label in column 'label' \(dataset\.label_column\) "
                                         r"that is missing or not one of the 2 declared dataset\.classes, "
                                         r"the first on data row 6") as err:  # fmt: skip
        centralized_test_split(cfg.dataset, cfg.seed)
    assert secret not in str(err.value)
    renamed = root / "renamed.csv"
    renamed.write_text("body,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    cfg = load_config(overrides(files, "dataset.text_column=text").replace(str(files[1]), str(renamed)))
    with pytest.raises(ValueError, match=r"has no column 'text' \(dataset\.text_column\)") as err:
        load_client_data(cfg.dataset, cfg.partitioner, 0, 2, cfg.seed)
    assert "body" not in str(err.value)  # nor the file's other column names (a header may be a row)
    cfg = load_config(overrides(files, "dataset.label_column=outcome"))
    with pytest.raises(ValueError, match=r"has no column 'outcome' \(dataset\.label_column\)"):
        centralized_test_split(cfg.dataset, cfg.seed)
    with pytest.raises(ConfigError, match=r"dataset\.classes=\['neg'\]: declare the label values"):
        load_config(overrides(files).replace("dataset.classes=[neg,pos]", "dataset.classes=[neg]"))
    with pytest.raises(ConfigError, match="dataset=text gives token ids: use model=hf"):
        load_config(f"dataset=text dataset.path={files[1]} dataset.classes=[neg,pos] dataset.tokenizer={files[0]}")


def test_a_site_reads_its_own_text_file(files):
    from core.data import load_file_data

    cfg = load_config(overrides(files))
    site = write_text_set(files[2] / "site.jsonl", 30, seed=3)
    train, val = load_file_data(site, cfg.dataset, seed=0)
    assert (len(train), len(val)) == (27, 3)  # val_fraction 0.1
    assert train.x.shape == (27, 16) and set(np.concatenate([train.y, val.y]).tolist()) == {0, 1}
    torch.manual_seed(0)


README_OVERRIDES = (
    "model=hf model.name_or_path={d}/tiny-bert model.lora.r=4 dataset=text "
    "dataset.path={d}/train.csv dataset.test_path={d}/test.csv dataset.classes=[neg,pos] "
    "dataset.max_length=8 training.optimizer=adam training.lr=0.01 strategy.fraction_train=1.0 "
    "num_rounds=5 output_dir={out}"
)


@pytest.mark.e2e
def test_flwr_run_of_the_readme_text_example(flower, tmp_path):
    """README "Hugging Face models and text": `python -m tests.support.hf_text <dir>`, then
    `flwr run` with model=hf, LoRA on every Linear layer outside the head, 2 SuperNodes."""
    import json

    from tests.support.hf_text import main

    main(str(tmp_path / "hf-text"))
    out = tmp_path / "run"
    proc = flower.run(README_OVERRIDES.format(d=tmp_path / "hf-text", out=out), num_supernodes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    final = results["final"]
    print("hf text e2e:", json.dumps({"initial": results["initial"], "final": final}))
    assert results["run"]["status"] == "completed"
    assert final["centralized"]["accuracy"] >= 0.85 > results["initial"]["centralized"]["accuracy"]
    # 13 adapted Linear layers of 32 -> 32 (or 32 <-> 64): r * (in + out) each; the head 66
    assert final["num_trainable_parameters"] == 4 * (9 * 64 + 4 * 96) + 66
