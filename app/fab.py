"""The directory a `flwr run` of this project packs: its FAB's files, staged without walking
what the FAB never holds.

`flwr run DIR` builds its FAB (Flower App Bundle) by walking every file under DIR
(`flwr.cli.utils.collect_files`) and only then dropping what `.gitignore` and Flower's publish
rules exclude. In a checkout with its virtualenv inside, that walk is about 60,000 files, 4.7 to
8.6 s of every run on two busy cores (a sweep pays it once per job, a notebook once per
experiment). `stage_app` walks the project without entering a directory those rules exclude
as a whole (`.venv/`, `__pycache__/`, `outputs/`, ...), applies Flower's own publish filter to
what it found, and copies the files into a fresh directory; `flwr run` on that directory packs
the FAB it would have packed from the project, byte for byte (tests/test_fab.py). A fresh copy
per run: an edit to the project between two runs is in the second, as with `flwr run .`.

Flower has no option to skip directories while it walks, hence this walk. It reuses Flower's
pattern loading and publish filter (flwr.cli.utils, pinned with flwr==1.41.0), so only the
pruning is ours: a directory is skipped only when its path matches an exclude pattern, and
not at all when `.gitignore` has a negation (`!pattern`), which could bring back a file below.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns
from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

from core.config import CONF_DIR

PROJECT_DIR = CONF_DIR.parent


def fab_files(project: Path = PROJECT_DIR) -> dict[str, Path]:
    """Relative POSIX path -> file, of every file Flower's publish filter keeps in `project`
    (what `flwr run` then packs, after the FAB's own include/exclude rules)."""
    root = Path(project).resolve()
    gitignore = root / ".gitignore"
    patterns = load_gitignore_patterns(gitignore.read_bytes()) if gitignore.is_file() else []
    prune = [build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS)]
    if not any(p.lstrip().startswith("!") for p in patterns):
        prune.append(build_pathspec(patterns))
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel = here.relative_to(root)
        dirnames[:] = [
            d for d in dirnames
            if not any(spec.match_file(f"{(rel / d).as_posix()}/") for spec in prune)
        ]  # fmt: skip
        for name in filenames:
            path = here / name
            if not path.is_symlink():  # Flower skips symlinks too
                files[(rel / name).as_posix()] = path
    return filter_paths_for_publish(files)


def copy_fab_files(dest: Path, project: Path = PROJECT_DIR) -> Path:
    """Copy the files `flwr run project` would pack into `dest`; return `dest`."""
    for rel, src in fab_files(project).items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    return dest


@contextmanager
def stage_app(project: Path = PROJECT_DIR) -> Iterator[Path]:
    """A temporary directory holding the files `flwr run project` would pack; removed after."""
    with tempfile.TemporaryDirectory(prefix="flwr-app-") as tmp:
        yield copy_fab_files(Path(tmp), project)
