"""dataset=tabular: your own CSV or Parquet file, declared by the schema in config
(core/config.py `TabularDatasetConfig`).

What happens where, and why:
- Reading (pandas, pyarrow for Parquet) checks the file against the schema before anything
  trains: a missing column, a non-numeric feature, a label outside the declared classes, a
  category outside the declared vocabulary or a missing value under `missing=error` is a
  ValueError naming the file, the column and the fix; so is an infinite number (an empty cell
  is a missing value, handled by `missing`). The messages name columns and counts, never a
  cell's value (nor the file's header, which a file without one has read from its first
  row): in deployment a client's error reaches the server.
- Categories are declared in config
  (`dataset.categorical=[{column:ward,categories:[icu,surgery]}]`), never
  learned from the rows: the one-hot layout is part of the shared model, and a vocabulary
  learned from one site's data would publish its raw values. A missing categorical value
  under `missing=mean` is the all-zero one-hot (no category).
- `missing=drop` drops a row with any missing value in a declared column before
  partitioning (row by row, so each site drops exactly what it would drop on its own);
  `missing=mean` imputes numeric features with the client's own training-split mean; rows
  without a label are dropped under both (a label cannot be imputed).
- `standardize=client`: each client centres and scales its numeric features with the mean and
  standard deviation of its own training split (its validation split uses the same numbers),
  the server its test file's own. Nothing is sent anywhere; the cost against one global
  standardization is measured in tests/test_tabular.py and reported in README "Your own data".
- Partitioning: core/data.py hands the rows to the configured Flower Datasets partitioner, or,
  with `site_column`, to NaturalIdPartitioner over that column (partition i is the i-th site in
  sorted order, the partitioner's own order).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from core.config import TabularDatasetConfig
from core.data_types import ArraySplit, DataSpec

SITE = "site"  # the pool's column NaturalIdPartitioner splits by (the file's site_column)


def tabular_spec(cfg: TabularDatasetConfig) -> DataSpec:
    """The model's input and output sizes, from the config alone: the server, and a site
    reading its own `data-path`, build the same model without seeing any file."""
    num_features = len(cfg.features) + sum(len(c) for c in cfg.vocabulary().values())
    if cfg.task == "regression":
        return DataSpec("regression", num_features, 1)
    return DataSpec("classification", num_features, len(cfg.classes) or 2)


def read_table(path: str | Path, cfg: TabularDatasetConfig, key: str, site: bool = False, label: bool = True):
    """The file as a pandas DataFrame with the schema's columns (and `site_column` when
    `site`; without the label column when not `label`), checked for presence. `key` names
    where the path came from, for the message."""
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{key}={path} is not a file: give the absolute path of a .csv or .parquet")
    if path.suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"{key}={path}: dataset=tabular reads .csv or .parquet files")
    try:
        table = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        # The parser's own message names lines and field counts, not cells (tests/test_tabular.py).
        reason = " ".join(str(err).split())
        raise ValueError(f"{key}={path} is not a readable .csv: {reason}") from None
    except Exception as err:  # pyarrow, decoding: their messages may quote the file's bytes
        kind = "text (UTF-8) .csv" if path.suffix == ".csv" else ".parquet file"
        raise ValueError(f"{key}={path} is not a readable {kind} ({type(err).__name__})") from None
    wanted = [*cfg.features, *cfg.vocabulary(), *([cfg.label] if label else [])]
    if site:
        wanted.append(cfg.site_column)
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        where = "dataset.site_column" if missing == [cfg.site_column] and site else "the schema"
        # Not the file's own column names: a file without a header row has its first row
        # read as the header, and those are a patient's values.
        raise ValueError(
            f"{key}={path} lacks the columns {missing} that {where} declares (dataset.features, "
            f"dataset.categorical, dataset.label{', dataset.site_column' if site else ''}) among "
            f"its {len(table.columns)} columns (its header row, the first line): rename the "
            "file's columns or fix the schema"
        )
    return table


def encode(table, cfg: TabularDatasetConfig, key: str, labelled: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, kept rows) of a checked table: x float32 (rows, num_features), numeric
    features raw with NaN where missing (imputation and standardization are the client's,
    :func:`preprocess`), then the one-hot columns; y int64 class ids or float32 (n, 1);
    `kept`: the table's row positions x and y hold (rows dropped by `missing`). Not
    `labelled` (a file to predict, without the label column): y is zeros, no row is dropped
    for its label."""
    import pandas as pd

    numeric = np.empty((len(table), len(cfg.features)))
    for j, column in enumerate(cfg.features):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = int((values.isna() & table[column].notna()).sum())
        if bad:
            raise ValueError(
                f"{key}: column {column!r} (dataset.features) has {bad} non-numeric values: "
                "numeric features only; declare it under dataset.categorical with its "
                "categories, or clean the file"
            )
        numeric[:, j] = values.to_numpy(dtype=float)
        infinite = int(np.isinf(numeric[:, j]).sum())  # "inf", "1e999": numbers, not missing
        if infinite:
            raise ValueError(
                f"{key}: column {column!r} (dataset.features) has {infinite} infinite values: "
                "features must be finite numbers (an empty cell is a missing value)"
            )
    onehots, cat_missing = [], np.zeros(len(table), dtype=bool)
    for column, categories in cfg.vocabulary().items():
        values = _as_text(table[column])
        absent = values.isna().to_numpy()
        unknown = int((~values.isin(categories).to_numpy(dtype=bool) & ~absent).sum())
        if unknown:
            raise ValueError(
                f"{key}: column {column!r} has {unknown} values outside its declared "
                f"categories {categories} (dataset.categorical): add them to the list "
                "(categories are declared in config, not learned from the data)"
            )
        onehots.append(np.stack([(values == c).fillna(False).to_numpy(dtype=bool) for c in categories], axis=1))
        cat_missing |= absent
    if labelled:
        y, label_missing = _labels(table[cfg.label], cfg, key)
    else:
        shape = (len(table), 1) if cfg.task == "regression" else (len(table),)
        y = np.zeros(shape, np.float32 if cfg.task == "regression" else np.int64)
        label_missing = np.zeros(len(table), dtype=bool)
    feature_missing = np.isnan(numeric).any(axis=1) | cat_missing
    if cfg.missing == "error" and (feature_missing.any() or label_missing.any()):
        columns = [c for c in (*cfg.features, *cfg.vocabulary(), *([cfg.label] if labelled else []))
                   if table[c].isna().any()]  # fmt: skip
        rows = int((feature_missing | label_missing).sum())
        raise ValueError(
            f"{key}: columns {columns} have missing values and dataset.missing=error "
            f"({rows} row{'s' if rows != 1 else ''} of {len(table)}): set "
            "dataset.missing=drop (drop those rows) or dataset.missing=mean (each client "
            "imputes its own training mean)"
        )
    drop = label_missing | (feature_missing if cfg.missing == "drop" else False)
    kept = np.flatnonzero(~drop)
    x = np.concatenate([numeric, *onehots], axis=1).astype(np.float32)[kept]
    return x, y[kept], kept


def _as_text(column):
    """Category and label values compared as text: 1, 1.0 and "1" are the same value."""
    import pandas as pd

    if pd.api.types.is_float_dtype(column):
        # Value by value: one fractional value (a typo) leaves the whole ones 1, not 1.0.
        whole = column.notna() & (column == np.round(column)) & (column.abs() < 2**53)
        text = column.astype("string")
        text[whole] = column[whole].astype("Int64").astype("string")
        return text
    return column.astype("string")


def _labels(column, cfg: TabularDatasetConfig, key: str) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    if cfg.task == "regression":
        values = pd.to_numeric(column, errors="coerce")
        bad = int((values.isna() & column.notna()).sum())
        if bad:
            raise ValueError(
                f"{key}: label column {cfg.label!r} has {bad} non-numeric values: "
                "dataset.task=regression needs numbers"
            )
        y = values.to_numpy(dtype=float)
        infinite = int(np.isinf(y).sum())
        if infinite:
            raise ValueError(
                f"{key}: label column {cfg.label!r} has {infinite} infinite values: "
                "dataset.task=regression needs finite numbers"
            )
        return y.astype(np.float32).reshape(-1, 1), np.isnan(y)
    classes = cfg.classes or ["0", "1"]
    values = _as_text(column)
    absent = values.isna().to_numpy()
    ids = np.full(len(column), -1, dtype=np.int64)
    for i, c in enumerate(classes):
        ids[(values == c).fillna(False).to_numpy(dtype=bool)] = i
    bad = int(((ids < 0) & ~absent).sum())
    if bad:
        raise ValueError(
            f"{key}: label column {cfg.label!r} has {bad} values that are not one of "
            f"dataset.classes={classes} (dataset.task={cfg.task}): declare the label values "
            "in class order with dataset.classes=[negative,positive]"
        )
    return ids, absent


def load_pool(cfg: TabularDatasetConfig):
    """(x, y, kept rows, site of each kept row or None) of the simulation file `path`."""
    if not cfg.path:
        raise ValueError(
            "dataset.path is empty: simulated clients share one file, set "
            "dataset.path=/abs/path/data.csv (a deployed SuperNode reads its own data-path)"
        )
    table = read_table(cfg.path, cfg, "dataset.path", site=bool(cfg.site_column))
    x, y, kept = encode(table, cfg, f"dataset.path={cfg.path}")
    sites = None
    if cfg.site_column:
        column = _as_text(table[cfg.site_column])
        if column.isna().any():
            raise ValueError(
                f"dataset.path={cfg.path}: site column {cfg.site_column!r} has "
                f"{int(column.isna().sum())} empty values: every row needs its site"
            )
        sites = column.to_numpy(dtype=str)[kept]
    return x, y, kept, sites


def preprocess(train: ArraySplit, val: ArraySplit, cfg: TabularDatasetConfig):
    """A client's (train, val) after its own imputation and standardization: the statistics
    come from `train` alone and are applied to both (see the module docstring)."""
    k = len(cfg.features)
    if k == 0 or (cfg.standardize == "none" and cfg.missing != "mean"):
        return train, val
    numeric = train.x[:, :k].astype(np.float64)
    # Impute, then scale (scikit-learn's SimpleImputer then StandardScaler, fitted on `train`).
    with np.errstate(all="ignore"):  # an all-missing column: its mean is nan, handled below
        mean = np.nanmean(numeric, axis=0) if len(numeric) else np.zeros(k)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isnan(numeric), mean, numeric).std(axis=0) if len(numeric) else np.ones(k)
    std = np.where(std > 0, std, 1.0)  # a constant column is only centred

    def apply(split: ArraySplit) -> ArraySplit:
        x = split.x.copy()
        block = x[:, :k].astype(np.float64)
        block = np.where(np.isnan(block), mean, block)  # only nan under missing=mean
        if cfg.standardize == "client":
            block = (block - mean) / std
        x[:, :k] = block.astype(np.float32)
        return ArraySplit(x, split.y)

    return apply(train), apply(val)


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions of a site's own file: a seeded random subset."""
    n_val = 0 if val_fraction == 0 or n < 2 else min(math.ceil(val_fraction * n), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return order[n_val:], order[:n_val]


def load_site_file(path: str, cfg: TabularDatasetConfig, seed: int) -> tuple[ArraySplit, ArraySplit]:
    """A deployed site's own file (node config `data-path`): the schema's columns, checked
    and encoded as in simulation, split into train/validation, then preprocessed by the site."""
    x, y, _ = encode(read_table(path, cfg, "data-path"), cfg, f"data-path={path}")
    if len(y) == 0:
        raise ValueError(f"data-path={path} has no usable row (after dataset.missing={cfg.missing})")
    train, val = split_rows(len(y), cfg.val_fraction, seed)
    return preprocess(ArraySplit(x[train], y[train]), ArraySplit(x[val], y[val]), cfg)


def server_test_split(cfg: TabularDatasetConfig) -> ArraySplit | None:
    """The server's held-out file `test_path`, preprocessed with its own statistics as a
    site's (None without `test_path`: then there is no centralized evaluation)."""
    if not cfg.test_path:
        return None
    table = read_table(cfg.test_path, cfg, "dataset.test_path")
    x, y, _ = encode(table, cfg, f"dataset.test_path={cfg.test_path}")
    test, _ = preprocess(ArraySplit(x, y), ArraySplit(x[:0], y[:0]), cfg)
    return test


MIN_PREDICTION_ROWS = 30  # below this, a file's own statistics are too noisy to scale by


def prediction_file(
    path: str | Path, cfg: TabularDatasetConfig, reference: str | Path | None = None
) -> tuple[ArraySplit, np.ndarray | None, np.ndarray]:
    """A file to score with a trained model (app/predict.py): the schema's feature columns,
    checked and encoded as a site's file. Returns (the rows, which rows carry a label (None
    without a label column), their positions in the file: `missing=drop` drops rows with a
    missing feature, never a row for its missing label).

    Imputation and `standardize=client` use statistics as a site's training does: those of
    `reference` (the site's own training file, the same columns) when given, else the file's
    own, which is refused below MIN_PREDICTION_ROWS rows: a patient's score must not depend on
    a handful of others scored with it (a single row would be centred to all zeros)."""
    table = read_table(path, cfg, "file", label=False)
    x, y, kept = encode(table, cfg, f"file={path}", labelled=False)
    if len(kept) == 0:
        raise ValueError(f"file={path} has no usable row (after dataset.missing={cfg.missing})")
    labelled = None
    if cfg.label in table.columns:
        y_all, absent = _labels(table[cfg.label], cfg, f"file={path}")
        y, labelled = y_all[kept], ~absent[kept]
        if cfg.task != "regression":
            y = np.where(labelled, y, 0)  # unlabelled rows get a placeholder, never scored
        else:
            y = np.where(labelled[:, None], y, 0.0).astype(np.float32)
    rows = ArraySplit(x, y)
    scaled = cfg.standardize == "client" or cfg.missing == "mean"
    if reference is not None:
        ref_table = read_table(reference, cfg, "--stats-from", label=False)
        ref_x, ref_y, _ = encode(ref_table, cfg, f"--stats-from={reference}", labelled=False)
        _, rows = preprocess(ArraySplit(ref_x, ref_y), rows, cfg)
        return rows, labelled, kept
    if scaled and len(kept) < MIN_PREDICTION_ROWS:
        raise ValueError(
            f"file={path} has {len(kept)} rows and dataset.standardize={cfg.standardize} "
            f"missing={cfg.missing} scale by the data's own statistics: give the site's training "
            f"file with --stats-from (its statistics scale these rows), or at least "
            f"{MIN_PREDICTION_ROWS} rows"
        )
    rows, _ = preprocess(rows, ArraySplit(x[:0], y[:0]), cfg)
    return rows, labelled, kept
