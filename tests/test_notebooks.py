"""Every notebook runs top to bottom (an error in any cell fails), in an isolated Flower home, with
NOTEBOOK_QUICK=1: notebooks 02-04 then run every cell with fewer runs and rounds (each notebook's
introduction says which; a user's defaults are unchanged). Notebooks are committed without outputs."""

import json
import time
from pathlib import Path

import pytest

from tests.support.flower import PROJECT_DIR

NOTEBOOKS = sorted((PROJECT_DIR / "notebooks").glob("*.ipynb"))
# Figures each notebook draws (01: accuracy and loss; 02: accuracy vs epsilon, epsilon per round;
# 03: HE vs plaintext, SecAgg+ benchmark; 04: label skew per client, accuracy per round).
FIGURES = {"01": 1, "02": 2, "03": 2, "04": 2}


def test_there_are_the_four_notebooks():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_quickstart", "02_privacy_utility", "03_secure_aggregation_cost", "04_heterogeneity",
    ]  # fmt: skip


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.mark.e2e
@pytest.mark.parametrize(
    "path",
    # each notebook its own xdist group: the two workers share them
    [pytest.param(p, marks=pytest.mark.xdist_group(p.stem)) for p in NOTEBOOKS],
    ids=lambda p: p.stem,
)
def test_notebook_runs_top_to_bottom(flower, path: Path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: the test's own Flower home and ports.
    for key, value in flower.env.items():
        if key.startswith("FLWR_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("NOTEBOOK_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("NOTEBOOK_QUICK", "1")
    notebook = nbformat.read(path, as_version=4)
    started = time.monotonic()
    NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()  # fmt: skip
    print(f"{path.name}: {time.monotonic() - started:.0f} s")
    images = sum(
        1
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    )
    assert images == FIGURES[path.stem[:2]], f"{path.name} drew {images} figures"
