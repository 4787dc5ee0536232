"""Imports go one way down the layers (ARCHITECTURE.md): import-linter checks the contracts in
pyproject.toml's [tool.importlinter], in this process, on this checkout's packages."""

import importlib.util
import re
import tomllib

import pytest
from importlinter import configuration
from importlinter.application.use_cases import lint_imports

from tests.support.flower import PROJECT_DIR

pytestmark = pytest.mark.unit

PYPROJECT = PROJECT_DIR / "pyproject.toml"
LINTER = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]


def test_the_linted_packages_are_this_checkouts():
    for package in LINTER["root_packages"]:
        origin = importlib.util.find_spec(package).origin
        assert origin.startswith(str(PROJECT_DIR) + "/"), (package, origin)


def test_every_import_contract_is_kept(capsys):
    configuration.configure()  # what the lint-imports command does first
    passed = lint_imports(str(PYPROJECT), cache_dir=None, no_logo=True)
    out = capsys.readouterr().out
    counts = re.search(r"Contracts: (\d+) kept, (\d+) broken\.", out)
    assert counts, out
    broken = out[out.find("Broken contracts"):]
    assert (int(counts[1]), int(counts[2])) == (len(LINTER["contracts"]), 0), broken
    assert passed
