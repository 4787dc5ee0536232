"""dataset=text: your own text classification file (core/config.py `TextDatasetConfig`).

What happens where, and why:
- Reading: Hugging Face `datasets` loads the file (`load_dataset("csv"|"json",
  data_files=path)`: .csv, or .json/.jsonl as JSON Lines). Before anything trains, the file is
  checked against the schema: a missing `text_column` or `label_column`, a missing text, or a
  label that is not one of the declared `classes` is a ValueError naming the file, the column
  (and its config key), counts and the first row, never a cell's value nor the file's other
  column names (a headerless CSV has its first row read as the header): in deployment a
  client's error reaches the server and its results.json. A file `datasets` cannot parse is
  named with the parser's error type only, for the same reason.
- Labels are matched as text against `classes` (class id = position in the list): declared,
  never learned from the rows, so every party builds the same head without seeing any file.
- Tokenizing: the tokenizer of `dataset.tokenizer` (by default `model.name_or_path`, filled in
  by app/config.py) pads or truncates every text to `max_length` tokens; an example is its
  token ids followed by its attention mask, int64, which `core.hf_model.HFClassifier` splits
  again. Texts never leave the site: only the model's adapters and head travel.
- Partitioning: core/data.py hands the rows (their labels and row ids) to the configured Flower
  Datasets partitioner, as for the other local data sets; the server's test set is
  `test_path`, or a stratified `test_fraction` of `path` when that is empty.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.config import TextDatasetConfig
from core.data_types import ArraySplit, DataSpec

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json"}  # file suffix -> datasets loader


def text_spec(cfg: TextDatasetConfig) -> DataSpec:
    """From the config alone: ids and mask of max_length tokens in, one logit per class out."""
    return DataSpec("classification", 2 * cfg.max_length, len(cfg.classes))


@lru_cache(maxsize=4)
def tokenizer_for(name_or_path: str):
    """The tokenizer (transformers AutoTokenizer), loaded once per process."""
    from transformers import AutoTokenizer

    from core.hf_model import from_pretrained

    tokenizer = from_pretrained(AutoTokenizer, name_or_path, "dataset.tokenizer")
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with the end-of-text token
        if tokenizer.eos_token is None:
            raise ValueError(
                f"dataset.tokenizer={name_or_path!r} has neither a pad nor an end-of-text token "
                "to pad examples to dataset.max_length with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_text_file(path: str | Path, cfg: TextDatasetConfig, key: str) -> tuple[list[str], np.ndarray]:
    """(texts, class ids) of a text file, checked against the schema (module docstring).
    `key` names where the path came from (dataset.path, dataset.test_path, data-path)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{key}={path} is not a file: give the absolute path of a .csv or .jsonl file")
    loader = FORMATS.get(path.suffix)
    if loader is None:
        raise ValueError(f"{key}={path}: dataset=text reads .csv, .json or .jsonl (JSON Lines) files")
    try:
        table = datasets.load_dataset(loader, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as err:  # noqa: BLE001 - the parser's message may quote the file's cells
        problem = type(err).__name__
    else:
        problem = ""
    if problem:  # raised outside the handler, so no parser message travels in a traceback
        raise ValueError(
            f"{key}={path} could not be read as {loader.upper()} ({problem}): write one record "
            f"per row with the columns {cfg.text_column!r} and {cfg.label_column!r}"
        )
    for column, config_key in ((cfg.text_column, "text_column"), (cfg.label_column, "label_column")):
        if column not in table.column_names:
            raise ValueError(
                f"{key}={path} has no column {column!r} (dataset.{config_key}): name the "
                f"file's {config_key.split('_')[0]} column with dataset.{config_key}"
            )
    if len(table) == 0:
        raise ValueError(f"{key}={path} holds no rows")
    texts = table[cfg.text_column]
    missing = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if missing:
        raise ValueError(
            f"{key}={path}: {_rows(len(missing))} no text in column {cfg.text_column!r} "
            f"(dataset.text_column), the first on data row {missing[0] + 1}: give every row a text"
        )
    class_ids = {c: i for i, c in enumerate(cfg.classes)}
    labels = [class_ids.get(_as_text(v), -1) for v in table[cfg.label_column]]
    bad = [i for i, label in enumerate(labels) if label < 0]
    if bad:
        raise ValueError(
            f"{key}={path}: {_rows(len(bad))} a label in column {cfg.label_column!r} "
            f"(dataset.label_column) that is missing or not one of the {len(cfg.classes)} "
            f"declared dataset.classes, the first on data row {bad[0] + 1}: declare every "
            "label value, as written in the file, in dataset.classes"
        )
    return list(texts), np.asarray(labels, dtype=np.int64)


def tokenize(texts: list[str], cfg: TextDatasetConfig) -> np.ndarray:
    """(n, 2 * max_length) int64: each text's token ids, then its attention mask."""
    encoded = tokenizer_for(cfg.tokenizer)(
        texts, padding="max_length", truncation=True, max_length=cfg.max_length, return_tensors="np"
    )
    return np.concatenate([encoded["input_ids"], encoded["attention_mask"]], axis=1).astype(np.int64)


def load_text_arrays(path: str | Path, cfg: TextDatasetConfig, key: str) -> ArraySplit:
    texts, labels = read_text_file(path, cfg, key)
    return ArraySplit(tokenize(texts, cfg), labels)


def load_site_file(path: str | Path, cfg: TextDatasetConfig, seed: int) -> tuple[ArraySplit, ArraySplit]:
    """A site's own `data-path` text file (the schema's columns) as (train, validation): the
    validation split is a seeded `val_fraction` of its rows, as for the other site files."""
    data = load_text_arrays(path, cfg, "data-path")
    n = len(data)
    n_val = 0 if cfg.val_fraction == 0 else min(math.ceil(cfg.val_fraction * n), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    val, train = order[:n_val], order[n_val:]
    return ArraySplit(data.x[train], data.y[train]), ArraySplit(data.x[val], data.y[val])


def _as_text(value) -> str | None:
    """A label cell as the text it was written as: CSV integers are read as int64 by
    `datasets` (`1`, not `1.0`); a missing cell is None."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a column with a missing cell is read as float
    return str(value)


def _rows(n: int) -> str:
    return "1 row has" if n == 1 else f"{n} rows have"
