"""app/fab.py: a `flwr run` of a staged project packs the FAB Flower packs from the project
itself, byte for byte, without walking what the FAB never holds."""

import shutil
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from app.fab import PROJECT_DIR, fab_files, stage_app
from app.sweep import flwr_run_command
from app.config import load_config

MINIMAL_PYPROJECT = PROJECT_DIR / "benchmarks" / "minimal_app" / "pyproject.toml"


def test_the_staged_project_packs_the_projects_fab_byte_for_byte():
    with stage_app() as staged:
        assert build_fab_from_disk(staged) == build_fab_from_disk(PROJECT_DIR)
        assert not (staged / ".venv").exists() and (staged / "app" / "server_app.py").is_file()


def write(root: Path, rel: str, text: str = "x = 1\n") -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


@pytest.mark.parametrize(
    "gitignore",
    [
        "build/\n*.log\ndata/**\nouter/inner/\n",
        # a negation may bring a file back from below an excluded directory: no pruning then
        "keep_out/\n!keep_out/back.py\n",
        "",
    ],
    ids=["directory patterns", "negation", "no gitignore patterns"],
)
def test_a_project_with_ignored_trees_packs_what_flower_packs(tmp_path, gitignore):
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(MINIMAL_PYPROJECT, root / "pyproject.toml")
    write(root, ".gitignore", gitignore)
    for rel in [
        "minimal_server.py", "minimal_client.py", "pkg/mod.py", "pkg/notes.md", "pkg/conf.yaml",
        ".venv/lib/site.py", "pkg/__pycache__/mod.py", "build/gen.py", "run.log", "data/a.json",
        "outer/inner/deep.py", "outer/kept.py", "keep_out/gone.py", "keep_out/back.py",
        "a/b/c/d/e/f/g/h/i.py", ".flwr/x.toml",
    ]:  # fmt: skip
        write(root, rel)
    (root / "pkg" / "link.py").symlink_to(root / "pkg" / "mod.py")
    with stage_app(root) as staged:
        assert build_fab_from_disk(staged) == build_fab_from_disk(root)
    assert "pkg/link.py" not in fab_files(root) and ".venv/lib/site.py" not in fab_files(root)


def test_each_staging_is_a_fresh_copy_of_the_project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(MINIMAL_PYPROJECT, root / "pyproject.toml")
    write(root, "minimal_server.py", "VERSION = 1\n")
    with stage_app(root) as first:
        assert (first / "minimal_server.py").read_text() == "VERSION = 1\n"
    assert not first.exists()  # removed after the run
    write(root, "minimal_server.py", "VERSION = 2\n")
    write(root, "added.py")
    with stage_app(root) as second:
        assert (second / "minimal_server.py").read_text() == "VERSION = 2\n"
        assert (second / "added.py").is_file()


def test_a_job_runs_flwr_on_the_staged_directory():
    with stage_app() as staged:
        command = flwr_run_command(load_config(), [], app_dir=staged)
    assert command[:3] == ["flwr", "run", str(staged)]
