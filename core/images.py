"""dataset=imagefolder: your own images, one folder per class (core/config.py
`ImageFolderDatasetConfig`).

    <path>/<class>/<image>              one folder of class folders (simulation: the
                                        partitioner splits the images)
    <path>/<site>/<class>/<image>       with dataset.by_site=true: one folder per site, each
                                        site one partition (Flower Datasets' NaturalIdPartitioner)

What happens where, and why:
- Hugging Face `datasets` lists the images and their labels (`load_dataset("imagefolder",
  data_dir=...)`: the label of an image is the name of the folder it is in); the images are
  decoded here with Pillow, converted to `dataset.channels` (1: grayscale, 3: RGB), resized
  to `dataset.image_size` and scaled to [0, 1], so every party builds the same model input
  (C x H x W, flattened) whatever the files' own sizes.
- Classes are declared in config (`dataset.classes=[benign,malignant]`, the class-id order),
  never learned from the folders: the model's output layer is shared by every party, and a
  class folder one site lacks must not shift the others' ids. A folder whose name is not a
  declared class is an error naming it (folder names are the layout the user chose, not
  data); a file that does not decode as an image is one naming the folder it is in.
- The server's centralized evaluation is `dataset.test_path` (a folder of class folders), or
  none: then the run reports federated evaluation only. A deployed site names its own folder
  in its node config (`data-path=/abs/path/site-folder`, class folders inside).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.config import ImageFolderDatasetConfig
from core.data_types import ArraySplit, DataSpec

SITE = "site"  # the pool's column NaturalIdPartitioner splits by (dataset.by_site)


def image_spec(cfg: ImageFolderDatasetConfig) -> DataSpec:
    """The model's input and output sizes, from the config alone (no folder is read)."""
    height, width = cfg.image_size
    shape = (cfg.channels, height, width)
    return DataSpec("classification", int(np.prod(shape)), len(cfg.classes), shape)


def read_folder(path: str | Path, cfg: ImageFolderDatasetConfig, key: str, by_site: bool = False):
    """(x float32 (n, C*H*W) in [0, 1], y int64 class ids, each image's site or None) of a
    folder laid out as the module docstring says. `key` names where the path came from."""
    import datasets
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{key}={path} is not a folder: give the absolute path of a folder of class folders")
    datasets.disable_progress_bars()
    try:
        listing = datasets.load_dataset("imagefolder", data_dir=str(path), split="train", drop_labels=True)
    except (FileNotFoundError, ValueError) as err:  # no image at all, or nothing it can read
        raise ValueError(f"{key}={path} holds no image files ({type(err).__name__}): "
                         "put each class's images in a folder named after the class") from None  # fmt: skip
    files = [Path(item["path"]) for item in listing.cast_column("image", datasets.Image(decode=False))["image"]]
    classes = {name: i for i, name in enumerate(cfg.classes)}
    depth = 3 if by_site else 2  # site/class/image or class/image under `path`
    wrong = sorted({f.parent.relative_to(path).as_posix() for f in files if len(f.relative_to(path).parts) != depth})
    if wrong:
        layout = "<site>/<class>/<image>" if by_site else "<class>/<image>"
        raise ValueError(
            f"{key}={path}: images must be laid out as {layout} (dataset.by_site={str(by_site).lower()}); "
            f"{len(wrong)} folders are not, e.g. {wrong[0]!r}"
        )
    unknown = sorted({f.parent.name for f in files} - set(classes))
    if unknown:
        raise ValueError(
            f"{key}={path}: class folders {unknown} are not among dataset.classes={list(cfg.classes)}: "
            "declare every class (in class-id order) or remove the folder"
        )
    height, width = cfg.image_size
    mode = "L" if cfg.channels == 1 else "RGB"
    x = np.empty((len(files), cfg.channels, height, width), dtype=np.float32)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                pixels = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"{key}={path}: a file in {file.parent.relative_to(path).as_posix()!r} "
                             "is not a readable image") from None  # fmt: skip
        array = np.asarray(pixels, dtype=np.float32) / 255.0
        x[i] = array[None] if cfg.channels == 1 else array.transpose(2, 0, 1)
    y = np.array([classes[f.parent.name] for f in files], dtype=np.int64)
    sites = np.array([f.parent.parent.name for f in files], dtype=str) if by_site else None
    return x.reshape(len(files), -1), y, sites


def load_pool(cfg: ImageFolderDatasetConfig):
    """(x, y, kept rows, site of each row or None) of the simulation folder `path`."""
    if not cfg.path:
        raise ValueError(
            "dataset.path is empty: simulated clients share one folder, set "
            "dataset.path=/abs/path/images (a deployed SuperNode reads its own data-path)"
        )
    x, y, sites = read_folder(cfg.path, cfg, "dataset.path", by_site=cfg.by_site)
    return x, y, np.arange(len(y)), sites


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions of a site's own folder: a seeded random subset."""
    n_val = 0 if val_fraction == 0 or n < 2 else min(int(np.ceil(val_fraction * n)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return order[n_val:], order[:n_val]


def load_site_folder(path: str, cfg: ImageFolderDatasetConfig, seed: int) -> tuple[ArraySplit, ArraySplit]:
    """A deployed site's own folder (node config `data-path`), split into train/validation."""
    x, y, _ = read_folder(path, cfg, "data-path")
    train, val = split_rows(len(y), cfg.val_fraction, seed)
    return ArraySplit(x[train], y[train]), ArraySplit(x[val], y[val])


def server_test_split(cfg: ImageFolderDatasetConfig) -> ArraySplit | None:
    """The server's held-out folder `test_path` (None without one: no centralized evaluation)."""
    if not cfg.test_path:
        return None
    x, y, _ = read_folder(cfg.test_path, cfg, "dataset.test_path")
    return ArraySplit(x, y)
