"""A deployed site's own data file (node config `data-path`, core/data.py load_file_data):
checked once when the ClientApp first loads it (finite features and labels, shapes, label
range, each error naming the file, the rows and the columns but never a cell's value) and
cached per process (app/client_app.py cached_file_data) until the file or the config changes.

The sentinel values below stand for a patient's data: an error's whole text, chained
exceptions included (a simulation's traceback reaches results.json), must not contain them."""

from __future__ import annotations

import os
import traceback
from collections import OrderedDict

import numpy as np
import pytest
from flwr.common import Code, Context, FitIns, RecordDict, ndarrays_to_parameters

import app.client_app as client_app
from app.client_app import SITE_FILES_CACHED, build_client, cached_file_data
from app.config import load_config
from core.data import data_spec, load_file_data
from core.finetune import build_finetune_model
from core.models import get_weights

SECRET_NUMBER = 987654.321
SECRET_TEXT = "PATIENT_SECRET"


def digits_file(path, n=40, seed=0):
    """A site .npz for dataset=digits (64 features in 0..16, labels 0..9); x[:, 0] is the row."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 17, (n, 64)).astype(np.float32)
    x[:, 0] = np.arange(n)
    np.savez(path, x=x, y=rng.integers(0, 10, n))
    return path


def digits_csv(path, rows, header=True):
    """A site .csv for dataset=digits: `rows` are lists of 65 cells (text as written)."""
    lines = [",".join(f"f{i}" for i in range(64)) + ",label"] if header else []
    lines += [",".join(str(c) for c in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def good_row(i):
    return [i % 17] * 64 + [i % 10]


def error_of(call) -> str:
    """The ValueError's message; asserts no sentinel is in its whole formatted chain."""
    with pytest.raises(ValueError) as info:
        call()
    text = "".join(traceback.format_exception(info.value))
    assert SECRET_TEXT not in text and "987654" not in text, text
    return str(info.value)


@pytest.fixture
def cache(monkeypatch):
    """An empty per-process cache, and the number of times load_file_data reads a file."""
    monkeypatch.setattr(client_app, "_site_files", OrderedDict())
    reads = []

    def counting(path, cfg, seed):
        reads.append(str(path))
        return load_file_data(path, cfg, seed)

    monkeypatch.setattr(client_app, "load_file_data", counting)
    return reads


# --------------------------------------------------------------------------- cached per process
def test_a_site_file_is_read_once_and_again_when_it_changes_or_the_config_does(tmp_path, cache):
    cfg = load_config("").dataset
    path = digits_file(tmp_path / "site.npz")
    first = cached_file_data(str(path), cfg, 3)
    second = cached_file_data(str(path), cfg, 3)
    assert len(cache) == 1  # the second call did not read the file
    assert len(first[0]) + len(first[1]) == 40 and len(first[1]) == 4  # ceil(0.1 * 40)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        assert a.x is not b.x  # copies of the cached arrays

    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched
    cached_file_data(str(path), cfg, 3)
    assert len(cache) == 2
    cached_file_data(str(path), cfg, 3)
    assert len(cache) == 2

    digits_file(path, n=40, seed=1)  # rewritten: same size, other rows
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000))  # coarse clocks
    rewritten = cached_file_data(str(path), cfg, 3)
    assert len(cache) == 3
    with np.load(path) as stored:  # the new rows, not the cached old ones
        expected_y = np.sort(stored["y"])
    np.testing.assert_array_equal(np.sort(np.concatenate([rewritten[0].y, rewritten[1].y])), expected_y)
    assert not np.array_equal(expected_y, np.sort(np.concatenate([first[0].y, first[1].y])))

    cached_file_data(str(path), cfg, 4)  # another seed (another site's split)
    assert len(cache) == 4
    cached_file_data(str(path), load_config("dataset.val_fraction=0.5").dataset, 3)
    assert len(cache) == 5
    cached_file_data(str(path), cfg, 3)  # the first key is still cached
    assert len(cache) == 5
    assert len(client_app._site_files) == 3  # one entry per (file, config, seed)


def test_the_cache_keeps_a_bounded_number_of_files(tmp_path, cache):
    cfg = load_config("").dataset
    paths = [digits_file(tmp_path / f"site{i}.npz") for i in range(SITE_FILES_CACHED + 1)]
    for path in paths:
        cached_file_data(str(path), cfg, 0)
    assert len(client_app._site_files) == SITE_FILES_CACHED
    cached_file_data(str(paths[-1]), cfg, 0)  # the newest: cached
    assert len(cache) == SITE_FILES_CACHED + 1
    cached_file_data(str(paths[0]), cfg, 0)  # the oldest went first: read again
    assert len(cache) == SITE_FILES_CACHED + 2


def test_a_file_that_fails_its_checks_is_not_cached_and_loads_once_fixed(tmp_path, cache):
    cfg = load_config("").dataset
    path = tmp_path / "site.npz"
    x = np.zeros((10, 64), dtype=np.float32)
    x[3, 7] = np.nan
    np.savez(path, x=x, y=np.zeros(10, dtype=np.int64))
    for _ in range(2):
        with pytest.raises(ValueError, match="1 row has NaN or infinite features"):
            cached_file_data(str(path), cfg, 0)
    assert len(cache) == 2 and not client_app._site_files
    x[3, 7] = 1.0
    np.savez(path, x=x, y=np.zeros(10, dtype=np.int64))
    train, val = cached_file_data(str(path), cfg, 0)
    assert len(train) + len(val) == 10 and len(cache) == 3


def test_training_on_a_cached_site_file_leaves_the_cache_as_read(tmp_path, cache):
    """The ClientApp's build_client with a data-path: two messages, one read; the cached
    arrays are read-only and what training got are writable copies."""
    cfg = load_config("model=linear")
    path = digits_file(tmp_path / "site.npz")
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"data-path": str(path), "partition-id": 0})  # fmt: skip
    model, wire = build_finetune_model(cfg.model, data_spec(cfg.dataset), seed=cfg.seed)
    parameters = ndarrays_to_parameters(get_weights(model, wire))
    for _ in range(2):
        client = build_client(cfg, context)
        res = client.fit(FitIns(parameters, {"server_round": 1}))
        assert res.status.code == Code.OK and res.num_examples == 36  # 40 - ceil(0.1 * 40)
    assert len(cache) == 1
    ((_, (train, val)),) = client_app._site_files.values()
    assert not train.x.flags.writeable and not train.y.flags.writeable and not val.x.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        train.x[0, 0] = -1.0
    given, _ = cached_file_data(str(path), cfg.dataset, cfg.seed + 0)
    assert given.x.flags.writeable
    given.x[:] = -1.0  # whatever a message does to its arrays ...
    again, _ = cached_file_data(str(path), cfg.dataset, cfg.seed + 0)
    np.testing.assert_array_equal(again.x, train.x)  # ... the next one gets the file's rows
    assert again.x.min() >= 0


# --------------------------------------------------------------------------- checked (.npz)
def test_npz_nan_or_inf_features_name_the_file_the_rows_and_the_columns(tmp_path):
    cfg = load_config("").dataset
    x = np.ones((10, 64), dtype=np.float32)
    x[2, 5] = np.nan  # row 3
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(10, dtype=np.int64))
    msg = error_of(lambda: load_file_data(tmp_path / "nan.npz", cfg, 0))
    assert msg.startswith(f"{tmp_path / 'nan.npz'}: 1 row has NaN or infinite features, ")
    assert "the first at index 2, in x columns 5 (0-based)" in msg
    x[7, 9] = np.inf
    x[8, 5] = -np.inf
    np.savez(tmp_path / "inf.npz", x=x, y=np.zeros(10, dtype=np.int64))
    msg = error_of(lambda: load_file_data(tmp_path / "inf.npz", cfg, 0))
    assert "3 rows have NaN or infinite features, the first at index 2, in x columns 5, 9" in msg


def test_npz_labels_that_are_not_class_ids_are_counted_never_shown(tmp_path):
    cfg = load_config("").dataset
    x = np.ones((10, 64), dtype=np.float32)
    y = np.zeros(10)
    y[4], y[6], y[8] = SECRET_NUMBER, np.nan, 2.5
    np.savez(tmp_path / "labels.npz", x=x, y=y)
    msg = error_of(lambda: load_file_data(tmp_path / "labels.npz", cfg, 0))
    assert msg == (
        f"{tmp_path / 'labels.npz'}: labels must be integers in 0..9 for dataset=digits; 3 "
        "labels are not (NaN, infinite, fractional or out of range), the first at index 4"
    )


def test_npz_regression_labels_must_be_finite(tmp_path):
    cfg = load_config("dataset=linear").dataset
    x_width = data_spec(cfg).num_features
    y = np.zeros(6)
    y[0] = np.inf
    np.savez(tmp_path / "reg.npz", x=np.ones((6, x_width)), y=y)
    msg = error_of(lambda: load_file_data(tmp_path / "reg.npz", cfg, 0))
    assert msg.endswith(
        "1 row has a NaN or infinite label, the first at index 0: dataset=linear needs a "
        "finite number per sample"
    )


def test_npz_arrays_that_are_not_numbers_or_not_an_archive_are_named(tmp_path):
    cfg = load_config("").dataset
    text = np.full((3, 64), "1", dtype=object)
    text[1, 2] = SECRET_TEXT
    np.savez(tmp_path / "strings.npz", x=text.astype(str), y=np.zeros(3, dtype=np.int64))
    msg = error_of(lambda: load_file_data(tmp_path / "strings.npz", cfg, 0))
    assert msg == (
        f"{tmp_path / 'strings.npz'}: array x has dtype <U14, not numbers: store x as a numeric "
        "(float or integer) array"
    )
    np.savez(tmp_path / "objects.npz", x=text, y=np.zeros(3, dtype=np.int64))  # pickled
    msg = error_of(lambda: load_file_data(tmp_path / "objects.npz", cfg, 0))
    assert "array x has dtype object, not numbers" in msg
    (tmp_path / "fake.npz").write_text(f"{SECRET_TEXT},1,2\n")
    msg = error_of(lambda: load_file_data(tmp_path / "fake.npz", cfg, 0))
    assert msg.startswith(f"{tmp_path / 'fake.npz'} is not a readable .npz archive (")
    np.savez(tmp_path / "wide.npz", x=np.ones((5, 64)), y=np.zeros((5, 2)))
    msg = error_of(lambda: load_file_data(tmp_path / "wide.npz", cfg, 0))
    assert "holds x of shape (5, 64) and y of shape (5, 2)" in msg


# --------------------------------------------------------------------------- checked (.csv)
def test_csv_nan_in_row_3_names_the_file_its_line_and_column(tmp_path):
    cfg = load_config("").dataset
    rows = [good_row(i) for i in range(10)]
    rows[2][5] = "nan"  # data row 3: line 4 under the header
    path = digits_csv(tmp_path / "nan.csv", rows)
    msg = error_of(lambda: load_file_data(path, cfg, 0))
    assert msg.startswith(f"{path}: 1 row has NaN or infinite features, the first on line 4, ")
    assert "in columns 6 (1-based, as in the file)" in msg
    headerless = digits_csv(tmp_path / "headerless.csv", rows, header=False)
    msg = error_of(lambda: load_file_data(headerless, cfg, 0))
    assert "1 row has NaN or infinite features, the first on line 3, in columns 6" in msg


def test_csv_cells_that_are_not_numbers_are_located_never_quoted(tmp_path):
    cfg = load_config("").dataset
    rows = [good_row(i) for i in range(10)]
    rows[1][1] = SECRET_TEXT  # numpy.loadtxt's own error quotes this cell
    rows[4][3] = ""  # an empty cell
    rows[6][64] = SECRET_TEXT  # the label
    path = digits_csv(tmp_path / "text.csv", rows)
    msg = error_of(lambda: load_file_data(path, cfg, 0))
    assert msg == (
        f"{path}: 3 rows have cells that are not numbers (empty or text), the first on line 3, "
        "in columns 2, 4, 65 (1-based, as in the file): every cell must be a number (only the "
        "first line may be a header)"
    )
    rows = [good_row(i) for i in range(10)]
    rows[5] = rows[5][:-1]  # one cell short
    path = digits_csv(tmp_path / "ragged.csv", rows)
    msg = error_of(lambda: load_file_data(path, cfg, 0))
    assert "1 row has another number of cells than the first row's 65, the first on line 7" in msg


def test_csv_labels_out_of_range_are_counted_never_shown(tmp_path):
    cfg = load_config("").dataset
    rows = [good_row(i) for i in range(10)]
    rows[3][64] = SECRET_NUMBER
    path = digits_csv(tmp_path / "labels.csv", rows)
    msg = error_of(lambda: load_file_data(path, cfg, 0))
    assert msg.endswith("1 label is not (NaN, infinite, fractional or out of range), the first on line 5")
