"""Data sets and their federated partitioning (task code shared by ServerApp and ClientApp).

Local data sets (no network): scikit-learn's `digits` and `breast_cancer`, which ship inside
the package, and a generated `linear` regression. They become a `datasets.Dataset` that
Flower Datasets' partitioners split across clients, exactly as `FederatedDataset` does for hub
data sets (`mnist`, `cifar10`, behind `dataset=` and needing the network).
`dataset=tabular` is your own CSV or Parquet file, read and checked by core/tabular.py: its
rows are the clients' pool (split by the partitioner, or by site through NaturalIdPartitioner),
each client preprocesses its own rows, and the server's test set is the separate
`dataset.test_path` (or none: :func:`centralized_evaluation_data`). `dataset=text` is your own
CSV or JSON Lines file of texts and labels, read, checked and tokenized by core/text.py into
token-id arrays, then split like the local data sets (test: `dataset.test_path`, or a
stratified `test_fraction` of the file).

Splits, all derived from `seed` so that every process computes the same ones:
- the server holds a stratified `test_fraction` of the data set for centralized evaluation
  (hub data sets: their own `test` split);
- with `public_fraction` > 0, a stratified share of the rest is a public split that no client
  holds: `python -m app.pretrain` trains the pretrained checkpoint on it;
- the rest is the clients' pool, partitioned by the configured partitioner into
  `num_partitions` parts; each client splits its part into train and `val_fraction` validation.

Feature scaling is treated as public knowledge fixed before federation (digits: pixel range
0..16; breast_cancer: per-feature mean/std of the whole public data set), so every client and
the server scale identically without exchanging statistics.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from core.config import (
    DatasetConfig,
    ImageFolderDatasetConfig,
    PartitionerConfig,
    TabularDatasetConfig,
    TextDatasetConfig,
)
# DataSpec and ArraySplit live in core/data_types.py (core/tabular.py needs them without this
# module, which imports it); imported here so `from core.data import ArraySplit` keeps working.
from core.data_types import ArraySplit, DataSpec  # noqa: F401

FEATURES = "x"
LABEL = "label"
SAMPLE_ID = "sample_id"  # row index in the full local data set: lets tests check disjointness
# Node config key (deployment): a site's own data file instead of a partition of the data set.
NODE_DATA_PATH = "data-path"


class DatasetUnavailableError(RuntimeError):
    """A hub data set could not be loaded (typically: no network and nothing cached)."""


# --------------------------------------------------------------------------- public API
def data_spec(cfg: DatasetConfig) -> DataSpec:
    """What a model needs to know about `cfg`'s data. A local data set's spec is known
    without loading it (`_LOCAL_SHAPES`): a deployment site that trains on its own
    `data-path` file and config validation then import neither scikit-learn nor `datasets`
    (a ClientApp process per message pays every import)."""
    if cfg.source == "hub":
        return _hub(cfg, 1, PartitionerConfig(), 0)[0]
    if isinstance(cfg, TabularDatasetConfig):  # from the schema alone: no file is read
        from core.tabular import tabular_spec

        return tabular_spec(cfg)
    if isinstance(cfg, TextDatasetConfig):  # from the schema alone, as tabular
        from core.text import text_spec

        return text_spec(cfg)
    if isinstance(cfg, ImageFolderDatasetConfig):  # from the declaration alone: no image is read
        from core.images import image_spec

        return image_spec(cfg)
    return _local_shape(cfg)[0]


def centralized_test_split(cfg: DatasetConfig, seed: int) -> ArraySplit:
    """The server's held-out test split."""
    if isinstance(cfg, (TabularDatasetConfig, ImageFolderDatasetConfig)):
        test = centralized_evaluation_data(cfg, seed)
        if test is None:
            raise ValueError(f"dataset={cfg.name} holds no test split: set dataset.test_path")
        return test
    if cfg.source == "hub":
        _, fds = _hub(cfg, 1, PartitionerConfig(), seed)
        return _hub_to_arrays(cfg, fds.load_split("test"))
    data = _local_cached(_key(cfg), seed)
    return data.take(data.test_ids)


def centralized_evaluation_data(cfg: DatasetConfig, seed: int) -> ArraySplit | None:
    """What the server evaluates the global model on, or None when it holds no data: then
    the run has no centralized evaluation (dataset=tabular without dataset.test_path; the
    clients' federated evaluation still runs)."""
    if isinstance(cfg, TabularDatasetConfig):
        from core.tabular import server_test_split

        return server_test_split(cfg)
    if isinstance(cfg, ImageFolderDatasetConfig):
        from core.images import server_test_split as image_test_split

        return image_test_split(cfg)
    return centralized_test_split(cfg, seed)


def public_split(cfg: DatasetConfig, seed: int) -> ArraySplit:
    """The public split (`dataset.public_fraction` of the non-test data) that no client holds."""
    if cfg.source == "hub" or getattr(cfg, "public_fraction", 0) <= 0:
        raise ValueError(
            "a public split needs a local data set and dataset.public_fraction > 0 "
            "(e.g. dataset.public_fraction=0.2)"
        )
    data = _local_cached(_key(cfg), seed)
    return data.take(data.public_ids)


def load_client_data(
    cfg: DatasetConfig,
    part_cfg: PartitionerConfig,
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> tuple[ArraySplit, ArraySplit]:
    """One client's (train, validation) splits of its partition."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1} "
            f"(num-partitions={num_partitions}): check the SuperNode's --node-config"
        )
    check_partition_count(cfg, num_partitions, seed)
    if cfg.source == "hub":
        return _hub_client_data(_key(cfg), _key(part_cfg), partition_id, num_partitions, seed)
    return _local_client_data(_key(cfg), _key(part_cfg), partition_id, num_partitions, seed)


def client_pool_size(cfg: DatasetConfig, seed: int) -> int | None:
    """Examples in the clients' pool of a local data set (None for hub data sets)."""
    if cfg.source == "hub":
        return None
    if isinstance(cfg, (TabularDatasetConfig, TextDatasetConfig, ImageFolderDatasetConfig)):  # known once read
        return len(_local_cached(_key(cfg), seed).pool_ids)
    return _pool_size(_local_shape(cfg)[1], cfg.test_fraction, cfg.public_fraction)


def check_partition_count(cfg: DatasetConfig, num_partitions: int, seed: int) -> None:
    """Every partition needs at least one example: more SuperNodes than the pool has
    examples is a clear error, not the partitioner's IndexError."""
    if _by_site(cfg):
        sites = _local_cached(_key(cfg), seed).site_names
        if num_partitions != len(sites):
            how = f"dataset.site_column={cfg.site_column}" if isinstance(cfg, TabularDatasetConfig) else "dataset.by_site=true"
            raise ValueError(
                f"{how} gives {len(sites)} sites {list(sites)}, "
                f"one SuperNode each, but the federation has num_supernodes={num_partitions}: "
                f"use {len(sites)} SuperNodes (simulation.num_supernodes / --federation-config "
                f"'num-supernodes={len(sites)}')"
            )
        return
    pool = client_pool_size(cfg, seed)
    if pool is not None and num_partitions > pool:
        raise ValueError(
            f"{num_partitions} partitions (one per SuperNode) but dataset={cfg.name} has "
            f"{pool} examples for the clients: every SuperNode needs at least one. Use at "
            f"most {pool} SuperNodes (simulation.num_supernodes / --federation-config "
            "'num-supernodes=...')"
        )


def partition_arrays(
    cfg: DatasetConfig,
    part_cfg: PartitionerConfig,
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> ArraySplit:
    """One client's whole partition (before its validation split), as arrays: what
    `python -m app.deploy export-data` writes to a site's data file."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition {partition_id} is outside 0..{num_partitions - 1}")
    if isinstance(cfg, TextDatasetConfig):
        raise ValueError(
            "dataset=text: each site's data-path is its own .csv/.jsonl with the schema's text "
            "and label columns; split dataset.path by site instead of exporting token ids"
        )
    if isinstance(cfg, TabularDatasetConfig):
        # Its sites already hold their files: a site's data-path is its own CSV/Parquet with
        # the schema's columns (core/tabular.py), not an export of preprocessed arrays.
        raise ValueError(
            "dataset=tabular: each site's data-path is its own .csv/.parquet with the schema's "
            "columns; split dataset.path by site (e.g. with pandas) instead of exporting arrays"
        )
    if isinstance(cfg, ImageFolderDatasetConfig):
        raise ValueError(
            "dataset=imagefolder: each site's data-path is its own folder of class folders; "
            "copy each site's images instead of exporting arrays"
        )
    check_partition_count(cfg, num_partitions, seed)
    if cfg.source == "hub":
        _, fds = _hub(cfg, num_partitions, part_cfg, seed)
        return _hub_to_arrays(cfg, fds.load_partition(partition_id, "train"))
    data = _local_cached(_key(cfg), seed)
    return data.take(_layout(_key(cfg), _key(part_cfg), num_partitions, seed).ids(partition_id))


def load_file_data(path: str | Path, cfg: DatasetConfig, seed: int) -> tuple[ArraySplit, ArraySplit]:
    """A site's own data file as (train, validation) splits: what a SuperNode with
    `--node-config "data-path=..."` trains on instead of a partition.

    Formats: `.npz` with arrays `x` (n, features) and `y` (n,); `.csv` with one sample per
    row, the features first and the label last (a non-numeric first line is a header). The
    features must be scaled as the configured data set's (see the module docstring): the
    server evaluates the model on its own split of that data set. The validation split
    (`val_fraction`) is a seeded random subset of the file's rows.

    Checked before anything trains, each a ValueError naming the file: the arrays or cells are
    numbers, the shapes fit the data set, every feature is finite, and every label is finite
    (regression) or an integer class id in range (classification). The messages give counts,
    the first bad row (`.npz`: its index; `.csv`: its line) and the columns, never a cell's
    value: in deployment a client's error reaches the server and its results.json."""
    if isinstance(cfg, TabularDatasetConfig):  # the schema's columns, by name (core/tabular.py)
        from core.tabular import load_site_file

        return load_site_file(path, cfg, seed)
    if isinstance(cfg, TextDatasetConfig):  # texts and labels by column name (core/text.py)
        from core.text import load_site_file as load_text_site_file

        return load_text_site_file(path, cfg, seed)
    if isinstance(cfg, ImageFolderDatasetConfig):  # a folder of class folders (core/images.py)
        from core.images import load_site_folder

        return load_site_folder(path, cfg, seed)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data-path {path} is not a file: check the SuperNode's --node-config")
    spec = data_spec(cfg)
    if path.suffix == ".npz":
        x, y = _read_npz(path)
        where = partial(_npz_place, path)
    elif path.suffix == ".csv":
        x, y, header = _read_csv(path)
        where = partial(_csv_place, path, header)
    else:
        raise ValueError(f"data-path {path}: use a .npz (arrays x, y) or a .csv file")
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{path}: x and y must be arrays with a row per sample, not scalars")
    x = x.reshape(len(x), -1)
    y_column = y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)
    if x.shape[1] != spec.num_features or len(y) != len(x) or len(x) == 0 or not y_column:
        raise ValueError(
            f"{path} holds x of shape {x.shape} and y of shape {y.shape}; dataset={cfg.name} "
            f"needs (n, {spec.num_features}) features and n labels, n >= 1"
        )
    y = y.reshape(-1)
    finite = np.isfinite(x)
    bad_rows = np.flatnonzero(~finite.all(axis=1))
    if len(bad_rows):
        bad_columns = np.flatnonzero(~finite.all(axis=0)).tolist()
        raise ValueError(
            f"{path}: {_rows(len(bad_rows))} NaN or infinite features, the first "
            f"{where(row=bad_rows[0])}, in {where(columns=bad_columns)}: every feature must "
            "be a finite number (drop or impute those rows at the site)"
        )
    if spec.task == "classification":
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(y) & (np.mod(y, 1) == 0) & (y >= 0) & (y < spec.num_outputs)
        bad_rows = np.flatnonzero(~valid)
        if len(bad_rows):
            raise ValueError(
                f"{path}: labels must be integers in 0..{spec.num_outputs - 1} for "
                f"dataset={cfg.name}; {_count(len(bad_rows), 'label is', 'labels are')} not (NaN, "
                f"infinite, fractional or out of range), the first {where(row=bad_rows[0])}"
            )
        y = y.astype(np.int64)
    else:
        bad_rows = np.flatnonzero(~np.isfinite(y))
        if len(bad_rows):
            raise ValueError(
                f"{path}: {_rows(len(bad_rows))} a NaN or infinite label, the first "
                f"{where(row=bad_rows[0])}: dataset={cfg.name} needs a finite number per sample"
            )
        y = y.astype(np.float32).reshape(-1, 1)
    x = x.astype(np.float32)
    n_val = 0 if cfg.val_fraction == 0 else min(math.ceil(cfg.val_fraction * len(y)), len(y) - 1)
    order = np.random.default_rng(seed).permutation(len(y))
    val, train = order[:n_val], order[n_val:]
    return ArraySplit(x[train], y[train]), ArraySplit(x[val], y[val])


def _count(n: int, one: str, many: str) -> str:
    return f"1 {one}" if n == 1 else f"{n} {many}"


def _rows(n: int) -> str:
    return _count(n, "row has", "rows have")


def _list(items: list, most: int = 10) -> str:
    shown = ", ".join(map(str, items[:most]))
    return shown if len(items) <= most else f"{shown} and {len(items) - most} more"


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x and y of a site's .npz, as numeric arrays. numpy's own errors here describe the file's
    structure, not its values; they are re-raised naming the file (and not chained, so no
    message of numpy's travels in a traceback)."""
    import zipfile

    try:
        stored = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        problem = type(err).__name__
    else:
        problem = ""
    if problem or not isinstance(stored, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} is not a readable .npz archive ({problem or 'a single .npy array'}): "
            "write it with numpy.savez(path, x=features, y=labels)"
        )
    with stored:
        missing = {"x", "y"} - set(stored.files)
        if missing:
            raise ValueError(f"{path} lacks the arrays {sorted(missing)}: store x and y")
        arrays = {}
        for name in ("x", "y"):
            try:
                arrays[name] = np.asarray(stored[name])
            except ValueError:  # an object (pickled) array: refused without allow_pickle
                arrays[name] = None
            if arrays[name] is None or arrays[name].dtype.kind not in "biuf":
                dtype = "object" if arrays[name] is None else arrays[name].dtype
                raise ValueError(
                    f"{path}: array {name} has dtype {dtype}, not numbers: store {name} as a "
                    "numeric (float or integer) array"
                )
    return arrays["x"], arrays["y"]


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(features, labels, header lines) of a site's .csv. numpy.loadtxt's own error names the
    offending cell's text, so it is never passed on: :func:`_csv_problem` finds the rows and
    columns instead."""
    try:
        with path.open() as f:
            first = f.readline().split(",")
        try:
            [float(v) for v in first]
            header = 0
        except ValueError:
            header = 1
        table = np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (UTF-8) .csv file") from None
    except ValueError:
        raise ValueError(_csv_problem(path, header)) from None
    return table[:, :-1], table[:, -1], header


def _csv_problem(path: Path, header: int) -> str:
    """What numpy.loadtxt refused in `path`, as counts, lines and column numbers only."""
    width, ragged, bad_lines, bad_columns = None, [], [], set()
    with path.open() as f:
        for line_number, line in enumerate(f, start=1):
            if line_number <= header:
                continue
            content = line.split("#", 1)[0].strip()  # loadtxt's comments and blank lines
            if not content:
                continue
            cells = content.split(",")
            width = len(cells) if width is None else width
            if len(cells) != width:
                ragged.append(line_number)
                continue
            columns = []
            for j, cell in enumerate(cells, start=1):
                try:
                    float(cell)
                except ValueError:
                    columns.append(j)
            if columns:
                bad_lines.append(line_number)
                bad_columns.update(columns)
    if bad_lines:
        return (
            f"{path}: {_rows(len(bad_lines))} cells that are not numbers (empty or text), the "
            f"first on line {bad_lines[0]}, in columns {_list(sorted(bad_columns))} (1-based, as "
            "in the file): every cell must be a number (only the first line may be a header)"
        )
    if ragged:
        return (
            f"{path}: {_rows(len(ragged))} another number of cells than the first row's "
            f"{width}, the first on line {ragged[0]}: every row holds the features, then the label"
        )
    return f"{path} could not be read as comma-separated numbers (numpy.loadtxt refused it)"


def _npz_place(path: Path, row: int | None = None, columns: list[int] = ()) -> str:
    """Where a row (its index) or feature columns (of x, 0-based) of a .npz are."""
    if row is not None:
        return f"at index {int(row)}"
    return f"x columns {_list(list(columns))} (0-based)"


def _csv_place(path: Path, header: int, row: int | None = None, columns: list[int] = ()) -> str:
    """Where a row (its line in the file: header, comments and blank lines counted, as
    numpy.loadtxt skips them) or feature columns (1-based, as a spreadsheet shows them) of a
    .csv are. The file is read again only for an error's message."""
    if row is None:
        return f"columns {_list([c + 1 for c in columns])} (1-based, as in the file)"
    seen = -1
    with path.open() as f:
        for line_number, line in enumerate(f, start=1):
            if line_number <= header or not line.split("#", 1)[0].strip():
                continue
            seen += 1
            if seen == row:
                return f"on line {line_number}"
    return f"in data row {int(row) + 1}"


def partition_layout(
    cfg: DatasetConfig, part_cfg: PartitionerConfig, num_partitions: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(sample ids per partition, labels per partition, test sample ids) of a local data set:
    what the partitioner produced, for inspection and tests."""
    layout = _layout(_key(cfg), _key(part_cfg), num_partitions, seed)
    data = _local_cached(_key(cfg), seed)
    ids = [layout.ids(i) for i in range(num_partitions)]
    return ids, [data.y[i] for i in ids], data.test_ids


# --------------------------------------------------------------------------- internals
def _key(cfg) -> tuple:
    """Hashable cache key for a config dataclass (its type and field values; lists as
    tuples, a nested dataclass such as dataset=tabular's categorical columns as its key)."""
    return (type(cfg),) + tuple(_freeze(v) for v in vars(cfg).values())


config_key = _key  # public: app/client_app.py keys its cache of site files the same way


class _Frozen(tuple):
    """A nested dataclass's key inside a cache key."""


def _freeze(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _Frozen(_key(v))
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _thaw(v):
    if isinstance(v, _Frozen):
        return _from_key(tuple(v))
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def _from_key(key: tuple):
    cls, *values = key
    return cls(*[_thaw(v) for v in values])


# The local data sets' specs and sizes, known without loading them (data_spec). Checked
# against the loaded arrays on every load (`_load_local_arrays`), so a scikit-learn release
# that changed a data set fails loudly instead of disagreeing with the model.
_LOCAL_SHAPES: dict[str, tuple[DataSpec, int]] = {
    "digits": (DataSpec("classification", 64, 10, (1, 8, 8)), 1797),
    "breast_cancer": (DataSpec("classification", 30, 2), 569),
}


def _local_shape(cfg: DatasetConfig) -> tuple[DataSpec, int]:
    """(spec, number of samples) of a local data set, without loading it."""
    if cfg.name == "linear":
        return DataSpec("regression", 1, 1), cfg.n_samples
    if cfg.name in _LOCAL_SHAPES:
        return _LOCAL_SHAPES[cfg.name]
    _load_local_arrays_unchecked(cfg, 0)  # raises the unknown-data-set error
    raise AssertionError("unreachable: _load_local_arrays knows only the names above")


def _split_sizes(n: int, test_fraction: float) -> tuple[int, int]:
    """(train, test) sizes of `datasets.Dataset.train_test_split(test_size=test_fraction)`
    on n rows, stratified or not: the test split is ceil(fraction * n) rows, train the rest
    (tests/test_data.py checks these against the splits `_local_cached` builds)."""
    n_test = math.ceil(test_fraction * n)
    return n - n_test, n_test


def _pool_size(n: int, test_fraction: float, public_fraction: float) -> int:
    """Rows of the clients' pool: what is left of n after the test and public splits."""
    pool, _ = _split_sizes(n, test_fraction)
    if public_fraction > 0:
        pool, _ = _split_sizes(pool, public_fraction)
    return pool


def _load_local_arrays(cfg: DatasetConfig, seed: int) -> tuple[np.ndarray, np.ndarray, DataSpec]:
    x, y, spec = _load_local_arrays_unchecked(cfg, seed)
    expected_spec, expected_n = _local_shape(cfg)
    if spec != expected_spec or len(y) != expected_n:
        raise RuntimeError(
            f"dataset={cfg.name} loaded as {spec} with {len(y)} samples; core/data.py "
            f"_LOCAL_SHAPES says {expected_spec} with {expected_n}: update _LOCAL_SHAPES"
        )
    return x, y, spec


def _load_local_arrays_unchecked(
    cfg: DatasetConfig, seed: int
) -> tuple[np.ndarray, np.ndarray, DataSpec]:
    if cfg.name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.data / 16.0).astype(np.float32)
        y = bunch.target.astype(np.int64)
        return x, y, DataSpec("classification", 64, 10, (1, 8, 8))
    if cfg.name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        x = bunch.data
        x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
        y = bunch.target.astype(np.int64)
        return x, y, DataSpec("classification", x.shape[1], 2)
    if cfg.name == "linear":
        rng = np.random.default_rng(seed)
        x = rng.uniform(-1.0, 1.0, size=(cfg.n_samples, 1))
        y = cfg.slope * x + cfg.intercept + rng.normal(0.0, cfg.noise_std, size=x.shape)
        return x.astype(np.float32), y.astype(np.float32), DataSpec("regression", 1, 1)
    raise ValueError(
        f"dataset.name={cfg.name!r} is not a local data set: use digits, breast_cancer or "
        "linear, or set dataset.source=hub with dataset.hub_name"
    )


@dataclass(frozen=True)
class _LocalData:
    """A local data set converted once per process, its seeded splits as sample ids.

    Why: clients and the server used to convert `datasets` columns row by row for every
    partition (~50 ms a partition; ~11 CPU-s for a 25,000-row test split), and a 64-entry
    cache of converted partitions missed on almost every call once a simulation ran far more
    SuperNodes than that per actor. Here the features never enter Arrow: `x` and `y` are the
    arrays `_load_local_arrays` made, and a split or partition is a gather `x[ids]`, `y[ids]`
    (microseconds). Memory per process: the data set once (n x features x 4 bytes: digits
    0.46 MB, linear 4 bytes a sample) plus 8 bytes a row for the ids."""

    spec: DataSpec
    x: np.ndarray  # float32 (n, features): row i is sample_id i
    y: np.ndarray  # int64 (n,) for classification, float32 (n, 1) for regression
    pool: object  # datasets.Dataset of LABEL and SAMPLE_ID: what the partitioners split
    pool_ids: np.ndarray  # sample ids of the clients' pool, in the pool's order
    test_ids: np.ndarray
    public_ids: np.ndarray | None
    site_names: tuple[str, ...] = ()  # dataset=tabular with site_column: partition i's site

    def take(self, ids: np.ndarray) -> ArraySplit:
        return ArraySplit(self.x[ids], self.y[ids])


@lru_cache(maxsize=8)
def _local_cached(cfg_key: tuple, seed: int) -> _LocalData:
    """The data set and its splits; the clients' pool excludes the test and public splits."""
    import datasets

    datasets.disable_progress_bars()  # one bar per split and client would drown the round log

    cfg: DatasetConfig = _from_key(cfg_key)
    if isinstance(cfg, TabularDatasetConfig):
        return _tabular_pool(cfg, seed, datasets)
    if isinstance(cfg, TextDatasetConfig):
        return _text_pool(cfg, seed, datasets)
    if isinstance(cfg, ImageFolderDatasetConfig):
        return _image_pool(cfg, seed, datasets)
    x, y, spec = _load_local_arrays(cfg, seed)
    ids = np.arange(len(y))
    # The seeded splits and the partitioners read only the labels and the length, so the
    # Dataset holds no features: the same rows come out as when it held them.
    if spec.task == "classification":
        features = datasets.Features(
            {
                LABEL: datasets.ClassLabel(num_classes=spec.num_outputs),
                SAMPLE_ID: datasets.Value("int64"),
            }
        )
        full = datasets.Dataset.from_dict({LABEL: y, SAMPLE_ID: ids}, features=features)
        split = full.train_test_split(
            test_size=cfg.test_fraction, seed=seed, stratify_by_column=LABEL
        )
    else:
        full = datasets.Dataset.from_dict({LABEL: y, SAMPLE_ID: ids})
        split = full.train_test_split(test_size=cfg.test_fraction, seed=seed)
    pool, public = split["train"], None
    if cfg.public_fraction > 0:
        stratify = {"stratify_by_column": LABEL} if spec.task == "classification" else {}
        parts = pool.train_test_split(test_size=cfg.public_fraction, seed=seed + 1, **stratify)
        pool, public = parts["train"], parts["test"]
    return _LocalData(
        spec,
        x,
        y,
        pool,
        _sample_ids(pool),
        _sample_ids(split["test"]),
        None if public is None else _sample_ids(public),
    )


def _tabular_pool(cfg: TabularDatasetConfig, seed: int, datasets) -> _LocalData:
    """dataset=tabular: every usable row of `path` is the clients' pool (the server's test
    set is its own file, `test_path`). Sample id = the row's position in the file; `x` holds
    the raw features, which each client preprocesses itself (core/tabular.py)."""
    from core.tabular import SITE, load_pool, tabular_spec

    x_kept, y_kept, kept, sites = load_pool(cfg)
    spec = tabular_spec(cfg)
    n = int(kept.max()) + 1 if len(kept) else 0
    x = np.zeros((n, spec.num_features), dtype=np.float32)
    y = np.zeros((n, *y_kept.shape[1:]), dtype=y_kept.dtype)
    x[kept], y[kept] = x_kept, y_kept
    columns = {LABEL: y_kept, SAMPLE_ID: kept.astype(np.int64)}
    features = {SAMPLE_ID: datasets.Value("int64")}
    if spec.task == "classification":  # the label-skew partitioners read class labels
        features[LABEL] = datasets.ClassLabel(num_classes=spec.num_outputs)
    else:
        columns[LABEL] = y_kept.reshape(-1)
        features[LABEL] = datasets.Value("float32")
    if sites is not None:
        columns[SITE] = sites
        features[SITE] = datasets.Value("string")
    pool = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    if sites is None:  # seeded order, as the other local pools (IidPartitioner shards in order)
        pool = pool.shuffle(seed=seed)
    return _LocalData(
        spec, x, y, pool, _sample_ids(pool), np.arange(0), None,
        tuple(sorted({str(s) for s in sites})) if sites is not None else (),
    )  # fmt: skip


def _text_pool(cfg: TextDatasetConfig, seed: int, datasets) -> _LocalData:
    """dataset=text: the rows of `path`, tokenized (core/text.py), are the clients' pool; the
    server's test split is the rows of `test_path` (appended after them, so a sample id is a
    row of `path` or, past its end, of `test_path`) or, without one, a stratified
    `test_fraction` of `path`, split as the other local data sets are."""
    from core.text import load_text_arrays, text_spec

    spec = text_spec(cfg)
    data = load_text_arrays(cfg.path, cfg, "dataset.path")
    features = datasets.Features(
        {LABEL: datasets.ClassLabel(num_classes=spec.num_outputs), SAMPLE_ID: datasets.Value("int64")}
    )
    rows = datasets.Dataset.from_dict(
        {LABEL: data.y, SAMPLE_ID: np.arange(len(data), dtype=np.int64)}, features=features
    )
    if cfg.test_path:
        test = load_text_arrays(cfg.test_path, cfg, "dataset.test_path")
        x, y = np.concatenate([data.x, test.x]), np.concatenate([data.y, test.y])
        pool, test_ids = rows.shuffle(seed=seed), np.arange(len(data), len(y))
    else:
        x, y = data.x, data.y
        split = rows.train_test_split(test_size=cfg.test_fraction, seed=seed, stratify_by_column=LABEL)
        pool, test_ids = split["train"], _sample_ids(split["test"])
    return _LocalData(spec, x, y, pool, _sample_ids(pool), test_ids, None)


def _image_pool(cfg: ImageFolderDatasetConfig, seed: int, datasets) -> _LocalData:
    """dataset=imagefolder: every image of `path` is the clients' pool (the server's test set
    is its own folder, `test_path`); sample id = the image's position in the listing."""
    from core.images import SITE, image_spec, load_pool

    x, y, ids, sites = load_pool(cfg)
    spec = image_spec(cfg)
    columns = {LABEL: y, SAMPLE_ID: ids.astype(np.int64)}
    features = {LABEL: datasets.ClassLabel(num_classes=spec.num_outputs), SAMPLE_ID: datasets.Value("int64")}
    if sites is not None:
        columns[SITE] = sites
        features[SITE] = datasets.Value("string")
    pool = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    if sites is None:
        pool = pool.shuffle(seed=seed)
    return _LocalData(
        spec, x, y, pool, _sample_ids(pool), np.arange(0), None,
        tuple(sorted({str(s) for s in sites})) if sites is not None else (),
    )  # fmt: skip


def _by_site(cfg: DatasetConfig) -> bool:
    """One partition per site (NaturalIdPartitioner) instead of the partitioner."""
    if isinstance(cfg, TabularDatasetConfig):
        return bool(cfg.site_column)
    return isinstance(cfg, ImageFolderDatasetConfig) and cfg.by_site


def _sample_ids(ds) -> np.ndarray:
    """The SAMPLE_ID column of a Dataset or of a selection of one (a split, a partition).

    `Dataset.select` leaves the Arrow table as it is and records the selection as an indices
    mapping (`ds._indices`: positions in `ds.data`). Reading a column through that mapping
    gathers row by row: 0.8 s for a 100,000-row pool, ~1 ms per small partition. Composing
    the mapping with the table's column is one numpy gather. `_indices` is not public API:
    if a `datasets` release drops it, the public (row-gathering) read takes over."""
    table_ids = ds.data.column(SAMPLE_ID).to_numpy()
    if not hasattr(ds, "_indices"):
        return ds.with_format("arrow")[:][SAMPLE_ID].to_numpy().astype(np.int64, copy=False)
    if ds._indices is None:  # no selection: the table is the data set
        return table_ids.astype(np.int64, copy=False)
    return table_ids[ds._indices.column(0).to_numpy()].astype(np.int64, copy=False)


class _Layout:
    """One partitioning of a local pool: the partitioner, and the sample ids of every
    partition asked for so far in this process.

    Flower Datasets' partitioner decides which pool rows each partition holds (and in which
    order); reading that once as ids (~1 ms, most of it the partitioner's `select`) replaces
    converting the partition's rows on every cache miss. Memory: 8 bytes a pool row at most,
    as the partitions are disjoint."""

    def __init__(self, partitioner) -> None:
        self._partitioner = partitioner
        self._ids: dict[int, np.ndarray] = {}

    def ids(self, partition_id: int) -> np.ndarray:
        ids = self._ids.get(partition_id)
        if ids is None:
            ids = _sample_ids(self._partitioner.load_partition(partition_id))
            self._ids[partition_id] = ids
        return ids


@lru_cache(maxsize=8)
def _layout(cfg_key: tuple, part_key: tuple, num_partitions: int, seed: int) -> _Layout:
    cfg = _from_key(cfg_key)
    if _by_site(cfg):  # one partition per site
        from flwr_datasets.partitioner import NaturalIdPartitioner

        from core.tabular import SITE  # core/images.py names the column the same

        partitioner = NaturalIdPartitioner(partition_by=SITE)
    else:
        partitioner = _make_partitioner(_from_key(part_key), num_partitions, seed)
    partitioner.dataset = _local_cached(cfg_key, seed).pool
    return _Layout(partitioner)


def _validation_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions in a partition of n examples.

    The same positions, in the same order, as `datasets.Dataset.train_test_split(
    test_size=val_fraction, seed=seed)` selects (a permutation from
    `np.random.default_rng(seed)`, the first ceil(val_fraction * n) for validation), without
    building two Datasets per client: tests/test_data.py checks the equality. Partitions of
    fewer than 2 examples, or val_fraction 0, keep every example for training, in order."""
    if val_fraction == 0 or n < 2:
        return np.arange(n), np.arange(0)
    n_val = math.ceil(val_fraction * n)
    if n_val >= n:
        raise ValueError(
            f"dataset.val_fraction={val_fraction} leaves no training example in a partition "
            f"of {n}: lower it or use fewer partitions"
        )
    order = np.random.default_rng(seed).permutation(n)
    return order[n_val:], order[:n_val]


def _make_partitioner(part_cfg: PartitionerConfig, num_partitions: int, seed: int):
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if part_cfg.name == "iid":
        # IidPartitioner shards contiguously; the pool is already shuffled by the seeded split.
        return IidPartitioner(num_partitions=num_partitions)
    if part_cfg.name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            alpha=part_cfg.alpha,
            min_partition_size=part_cfg.min_partition_size,
            self_balancing=part_cfg.self_balancing,
            seed=seed,
        )
    if part_cfg.name == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            num_classes_per_partition=part_cfg.classes_per_partition,
            # every class goes to at least one client (random assignment can drop a class)
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    raise ValueError(f"partitioner.name={part_cfg.name!r}: use iid, dirichlet or pathological")


def _local_client_data(
    cfg_key: tuple, part_key: tuple, partition_id: int, num_partitions: int, seed: int
) -> tuple[ArraySplit, ArraySplit]:
    data = _local_cached(cfg_key, seed)
    ids = _layout(cfg_key, part_key, num_partitions, seed).ids(partition_id)
    cfg = _from_key(cfg_key)
    train, val = _validation_split(len(ids), cfg.val_fraction, seed + partition_id)
    if isinstance(cfg, TabularDatasetConfig):  # the client's own imputation and scaling
        from core.tabular import preprocess

        return preprocess(data.take(ids[train]), data.take(ids[val]), cfg)
    return data.take(ids[train]), data.take(ids[val])


# --------------------------------------------------------------------------- hub data sets
@lru_cache(maxsize=4)
def _hub_cached(cfg_key: tuple, num_partitions: int, part_key: tuple, seed: int):
    from flwr_datasets import FederatedDataset

    cfg: DatasetConfig = _from_key(cfg_key)
    partitioner = _make_partitioner(_from_key(part_key), num_partitions, seed)
    fds = FederatedDataset(
        dataset=cfg.hub_name, partitioners={"train": partitioner}, shuffle=True, seed=seed
    )
    try:
        test = fds.load_split("test")
    except Exception as err:  # network, DNS, missing cache: all surface differently
        raise DatasetUnavailableError(
            f"Could not load the hub data set {cfg.hub_name!r} (dataset={cfg.name}): "
            f"{type(err).__name__}: {err}. Hub data sets need the network on first use "
            "(later runs read the Hugging Face cache). Without network, use a data set that "
            "ships with the code: dataset=digits, dataset=breast_cancer or dataset=linear."
        ) from err
    first = np.asarray(test[0][cfg.feature_key], dtype=np.float32)
    shape = first.shape if first.ndim == 3 else (1, *first.shape)
    if first.ndim == 3 and shape[-1] in (1, 3):  # HWC images -> CHW
        shape = (shape[-1], shape[0], shape[1])
    num_classes = test.features[cfg.label_key].num_classes
    spec = DataSpec("classification", int(np.prod(shape)), num_classes, tuple(shape))
    return spec, fds


def _hub(cfg: DatasetConfig, num_partitions: int, part_cfg: PartitionerConfig, seed: int):
    return _hub_cached(_key(cfg), num_partitions, _key(part_cfg), seed)


@lru_cache(maxsize=64)
def _hub_client_data(
    cfg_key: tuple, part_key: tuple, partition_id: int, num_partitions: int, seed: int
) -> tuple[ArraySplit, ArraySplit]:
    """A hub partition's (train, validation) arrays. Unlike local data sets, the decoded
    images are cached per partition, 64 at most: the whole train split as float32 would be
    188 MB per process for MNIST and 614 MB for CIFAR-10."""
    cfg: DatasetConfig = _from_key(cfg_key)
    _, fds = _hub_cached(cfg_key, num_partitions, part_key, seed)
    partition = fds.load_partition(partition_id, "train")
    train, val = _validation_split(len(partition), cfg.val_fraction, seed + partition_id)
    if len(val) == 0:
        whole = _hub_to_arrays(cfg, partition)
        return whole, ArraySplit(whole.x[:0], whole.y[:0])
    return _hub_to_arrays(cfg, partition.select(train)), _hub_to_arrays(cfg, partition.select(val))


def _hub_to_arrays(cfg: DatasetConfig, ds) -> ArraySplit:
    """Images scaled to [0, 1] and flattened (channels first), labels as int64.

    One numpy-formatted slice of the two columns decodes the images into a stacked uint8
    array in one pass, instead of a Python loop over a lazily read column."""
    if cfg.max_samples:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    columns = ds.with_format("numpy", columns=[cfg.feature_key, cfg.label_key])[:]
    images = np.asarray(columns[cfg.feature_key], dtype=np.float32)
    if images.ndim == 4:  # N, H, W, C -> N, C, H, W
        images = images.transpose(0, 3, 1, 2)
    x = (images / 255.0).reshape(len(images), -1).astype(np.float32)
    return ArraySplit(x, np.asarray(columns[cfg.label_key], dtype=np.int64))
