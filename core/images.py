"""dataset=imagefolder: your own images, one folder per class (core/config.py
`ImageFolderDatasetConfig`).

    <path>/<class>/<image>              one folder of class folders (simulation: the
                                        partitioner splits the images)
    <path>/<site>/<class>/<image>       with dataset.by_site=true: one folder per site, each
                                        site one partition (Flower Datasets' NaturalIdPartitioner)

What happens where, and why:
- The image files under the folder (hidden ones skipped) go through Hugging Face `datasets`'
  imagefolder loader as `data_files` (not `data_dir`: see read_folder); the label of an image
  is the name of the folder it is in. The images are decoded here with Pillow (EXIF
  orientation applied), converted to `dataset.channels` (1: grayscale, 3: RGB), resized to
  `dataset.image_size` and scaled to [0, 1] (8-bit by 255, 16-bit grayscale by 65535), so
  every party builds the same model input (C x H x W, flattened) whatever the files' own
  sizes and depths.
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
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I"}  # Pillow's modes of 16-bit grayscale files


def _pixels(image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """(channels, height, width) in [0, 1]. 8-bit images by 255; 16-bit grayscale (common in
    medical imaging; Pillow's convert("L") would clip it at 255) by 65535."""
    if image.mode in SIXTEEN_BIT:
        gray = np.asarray(image.convert("I").resize(size, resample=2), dtype=np.float32) / 65535.0
        return np.repeat(gray[None], channels, axis=0)
    if image.mode == "F":
        raise ValueError("32-bit float images have no fixed range: convert them to 8 or 16 bits")
    converted = image.convert("L" if channels == 1 else "RGB").resize(size, resample=2)  # bilinear
    array = np.asarray(converted, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def image_spec(cfg: ImageFolderDatasetConfig) -> DataSpec:
    """The model's input and output sizes, from the config alone (no folder is read)."""
    height, width = cfg.image_size
    shape = (cfg.channels, height, width)
    return DataSpec("classification", int(np.prod(shape)), len(cfg.classes), shape)


def read_folder(path: str | Path, cfg: ImageFolderDatasetConfig, key: str, by_site: bool = False):
    """(x float32 (n, C*H*W) in [0, 1], y int64 class ids, each image's site or None) of a
    folder laid out as the module docstring says. `key` names where the path came from."""
    import datasets
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{key}={path} is not a folder: give the absolute path of a folder of class folders")
    # The files are listed here and handed to the imagefolder loader as data_files: given a
    # data_dir, it would read folder names such as test/val/dev as splits (dropping a class
    # or a site called so) and a metadata.csv as the list of images to load.
    found = sorted(
        f for f in path.rglob("*")
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )  # fmt: skip
    if not found:
        raise ValueError(f"{key}={path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                         "put each class's images in a folder named after the class")  # fmt: skip
    datasets.disable_progress_bars()
    listing = datasets.load_dataset(
        "imagefolder", data_files={"train": [str(f) for f in found]}, split="train", drop_labels=True
    ).cast_column("image", datasets.Image(decode=False))
    files = [Path(item["path"]) for item in listing["image"]]
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
    x = np.empty((len(files), cfg.channels, height, width), dtype=np.float32)
    for i, file in enumerate(files):
        where = file.parent.relative_to(path).as_posix()
        try:
            with Image.open(file) as image:
                array = _pixels(ImageOps.exif_transpose(image), cfg.channels, (width, height))
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"{key}={path}: a file in {where!r} is not a readable image") from None
        except ValueError as err:
            raise ValueError(f"{key}={path}: a file in {where!r}: {err}") from None
        x[i] = array
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
