"""Using a run's model afterwards (app/predict.py): a finished run's directory is the bundle;
`python -m app.predict` scores a file with it (metrics when labelled, the run's threshold),
exports it as a torch.export program, and refuses what it cannot score, saying why."""

import csv
import json

import numpy as np
import pytest
import torch

from app.predict import PredictError, export, load_model, main, score
from core.evaluation import classification_metrics
from tests.support.hospitals import hospitals
from tests.support.rounds import in_process_run

FEATURES = "[age,bp,lactate]"
CATEGORICAL = "[{column:ward,categories:[icu,surgery,medicine]},{column:sex,categories:[F,M]}]"


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory):
    """A finished 2-round run on three generated hospitals (dataset=tabular, model=mlp)."""
    folder = tmp_path_factory.mktemp("hospitals")
    named = {0: "survived", 1: "died"}  # label names: dataset.classes
    train = hospitals(60, seed=1)
    train.assign(outcome=train["outcome"].map(named)).to_csv(folder / "train.csv", index=False)
    test = hospitals(30, seed=2)
    test = test.assign(outcome=test["outcome"].map(named))
    test.to_csv(folder / "test.csv", index=False)
    test.drop(columns=["outcome"]).to_csv(folder / "unlabelled.csv", index=False)
    overrides = (
        f"dataset=tabular dataset.path={folder / 'train.csv'} dataset.features={FEATURES} "
        f"dataset.categorical={CATEGORICAL} dataset.label=outcome dataset.missing=mean "
        f"dataset.site_column=hospital_id dataset.classes=[survived,died] model=mlp "
        f"model.hidden_sizes=[8] num_rounds=2 strategy.fraction_train=1.0 evaluation.threshold=0.4"
    )
    out = folder / "run"
    in_process_run(overrides, out, num_nodes=3, seed=0).fit().finish()
    return out, folder


def test_a_labelled_file_is_scored_with_the_runs_model_and_threshold(tabular_run, tmp_path):
    run, folder = tabular_run
    out, metrics = score(run, folder / "test.csv", tmp_path / "p.csv")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 90 and list(rows[0]) == ["row", "prediction", "p_survived", "p_died"]
    probs = np.array([[float(r["p_survived"]), float(r["p_died"])] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert all(r["prediction"] == ("died" if float(r["p_died"]) >= 0.4 else "survived") for r in rows)
    # the metrics are those of the printed probabilities against the file's labels
    labels = (folder / "test.csv").read_text().splitlines()
    header = labels[0].split(",")
    y = np.array([["survived", "died"].index(line.split(",")[header.index("outcome")]) for line in labels[1:]])
    want = classification_metrics(y, probs, threshold=0.4)
    for key in ("accuracy", "auroc", "sensitivity", "specificity", "f1"):
        assert metrics[key] == pytest.approx(want[key], abs=1e-4)
    assert json.loads((tmp_path / "p.csv.metrics.json").read_text())["num_examples"] == 90
    assert metrics["auroc"] > 0.6  # it learned something


def test_an_unlabelled_file_gets_predictions_and_no_metrics(tabular_run, tmp_path, capsys):
    run, folder = tabular_run
    assert main([str(run), str(folder / "unlabelled.csv"), "--out", str(tmp_path / "u.csv")]) == 0
    printed = capsys.readouterr().out
    assert f"predictions: {tmp_path / 'u.csv'}" in printed and "auroc" not in printed
    labelled = [r["p_died"] for r in csv.DictReader(score(run, folder / "test.csv", tmp_path / "l.csv")[0].open())]
    assert [r["p_died"] for r in csv.DictReader((tmp_path / "u.csv").open())] == labelled


def test_a_file_without_a_feature_column_fails_naming_it(tabular_run, tmp_path, capsys):
    run, folder = tabular_run
    bad = tmp_path / "bad.csv"
    hospitals(5, seed=3).drop(columns=["lactate"]).to_csv(bad, index=False)
    assert main([str(run), str(bad)]) == 2
    assert "lacks the columns ['lactate'] that the schema declares" in capsys.readouterr().err


def test_the_exported_program_computes_what_the_model_computes(tabular_run, tmp_path):
    run, _ = tabular_run
    path = export(run, tmp_path / "model.pt2")
    program = torch.export.load(path).module()
    model, _ = load_model(run)
    for n in (1, 7, 300):  # any batch size
        x = torch.randn(n, 8)
        torch.testing.assert_close(program(x), model(x), rtol=0, atol=1e-6)


def test_an_encrypted_run_is_decrypted_by_a_key_holder_then_scored(tmp_path, capsys):
    run = in_process_run("secagg=he model=linear num_rounds=1", tmp_path / "he", num_nodes=2, seed=0)
    run.fit().finish()
    with pytest.raises(PredictError, match="holds the encrypted model only .* decrypt-model"):
        load_model(tmp_path / "he")
    # the key holder decrypts and reports the decrypted model's metrics on a file it names
    from app.he_keys import main as he_keys
    from core.data import centralized_test_split

    test = centralized_test_split(run.cfg.dataset, run.cfg.seed)
    np.savez(tmp_path / "test.npz", x=test.x, y=test.y)
    assert he_keys(["decrypt-model", str(tmp_path / "he"), "--data", str(tmp_path / "test.npz")]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("decrypted model on"))
    accuracy = float(line.split("accuracy ")[1].split()[0])
    assert accuracy > 0.5  # digits after one round of a linear model
    _, metrics = score(tmp_path / "he", tmp_path / "test.npz", tmp_path / "again.csv")
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-4)


def test_a_patients_score_does_not_depend_on_who_else_is_in_the_file(tabular_run, tmp_path, capsys):
    """standardize=client: a file's own statistics scale it only with 30 rows or more; with
    --stats-from (the site's training file) each row's score is the same alone or in a file."""
    import pandas as pd

    run, folder = tabular_run
    test = pd.read_csv(folder / "test.csv")
    test.iloc[:1].to_csv(tmp_path / "one.csv", index=False)
    assert main([str(run), str(tmp_path / "one.csv")]) == 2
    assert "has 1 rows and dataset.standardize=client" in capsys.readouterr().err
    reference = folder / "train.csv"
    alone, _ = score(run, tmp_path / "one.csv", tmp_path / "a.csv", stats_from=reference)
    within, _ = score(run, folder / "test.csv", tmp_path / "w.csv", stats_from=reference)
    assert next(csv.DictReader(alone.open()))["p_died"] == next(csv.DictReader(within.open()))["p_died"]


def test_rows_with_an_empty_label_are_scored_and_left_out_of_the_metrics(tabular_run, tmp_path):
    import pandas as pd

    run, folder = tabular_run
    test = pd.read_csv(folder / "test.csv")
    test.loc[::3, "outcome"] = None  # 30 of 90 labels empty
    test.to_csv(tmp_path / "partial.csv", index=False)
    out, metrics = score(run, tmp_path / "partial.csv", tmp_path / "p.csv")
    assert len(list(csv.DictReader(out.open()))) == 90
    assert metrics["num_examples"] == 60 and metrics["unlabelled_rows"] == 30
