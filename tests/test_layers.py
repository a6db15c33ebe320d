"""Layering: operators/ and models/ never import ray, mlflow or zarr (README: Architecture)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"ray", "mlflow", "zarr", "pipelines"}


@pytest.mark.parametrize("package", ["operators", "models"])
def test_core_packages_do_not_import_orchestration(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_operators_do_not_import_models():
    for path in sorted((ROOT / "operators").rglob("*.py")):
        assert "from models" not in path.read_text() and "import models" not in path.read_text(), path
