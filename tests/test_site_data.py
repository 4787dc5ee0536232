"""A deployed site's own data file (node config `data-path`, core/data.py load_file_data):
checked before anything trains (finite features and labels, shapes, label range, each error
naming the file, the rows and the columns but never a cell's value).

The sentinel values below stand for a patient's data: an error's whole text, chained
exceptions included (a simulation's traceback reaches results.json), must not contain them."""

from __future__ import annotations

import traceback

import numpy as np
import pytest

from app.config import load_config
from core.data import data_spec, load_file_data

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
