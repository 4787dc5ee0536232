"""Image folders written from scikit-learn's digits 0-2 (tests/test_images.py, and README "Your
own data": `python -m tests.support.images <folder>` writes <folder>/sites/<a|b|c>/<class>/*.png
and <folder>/test/<class>/*.png)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CLASSES = ["zero", "one", "two"]


def write_digits(folder: Path, sites=None, per_class: int = 30, seed: int = 0, size=(8, 8)) -> None:
    """Digits 0-2 as PNG files: <folder>[/<site>]/<class>/<i>.png, `per_class` per class and site."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for s, site in enumerate(sites or [None]):
        for k, name in enumerate(CLASSES):
            target = Path(folder) / site / name if site else Path(folder) / name
            target.mkdir(parents=True, exist_ok=True)
            chosen = rng.choice(np.flatnonzero(digits.target == k), per_class, replace=False)
            for i in chosen:
                pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").resize(size).save(target / f"{s}-{i}.png")


def main(out: str) -> None:
    folder = Path(out)
    write_digits(folder / "sites", sites=["a", "b", "c"], per_class=20)
    write_digits(folder / "test", per_class=30, seed=1)
    print(f"wrote {folder / 'sites'} (3 sites x 3 classes x 20 images) and {folder / 'test'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/images")
