"""Code versions follow imports: a stage's fingerprint changes with the code it runs, and only that."""

import pytest

import pipelines.fingerprint as fingerprint
from pipelines.fingerprint import module_closure


def test_each_stage_depends_on_what_it_imports_and_not_on_the_cli():
    train = module_closure("pipelines.train")
    assert {
        "pipelines.train",
        "models.unrolled",
        "operators.mri",
        "operators.ct",
        "pipelines.physics",
    } <= set(train)
    assert not {"pipelines.cli", "pipelines.runner", "pipelines.evaluate", "pipelines.recon"} & set(train)
    recon = module_closure("pipelines.recon")
    assert "operators.solvers" in recon and "models.registry" in recon and "pipelines.train" not in recon


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A little project tree: pipelines/a.py imports pipelines.b inside a function; cli.py stands apart."""
    pkg = tmp_path / "pipelines"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def run():\n    from pipelines.b import f\n    return f()\n")
    (pkg / "b.py").write_text("import operators.c\n\ndef f():\n    return 1\n")
    (pkg / "cli.py").write_text("import pipelines.a\n")
    (tmp_path / "operators").mkdir()
    (tmp_path / "operators" / "__init__.py").write_text("")
    (tmp_path / "operators" / "c.py").write_text("X = 1\n")
    monkeypatch.setattr(fingerprint, "ROOT", tmp_path)
    fingerprint.module_closure.cache_clear()
    fingerprint.code_version.cache_clear()
    yield tmp_path
    fingerprint.module_closure.cache_clear()
    fingerprint.code_version.cache_clear()


def _version(root):
    fingerprint.module_closure.cache_clear()
    fingerprint.code_version.cache_clear()
    return fingerprint.code_version("pipelines.a")


def test_a_change_anywhere_in_the_closure_changes_the_version_and_elsewhere_does_not(tree):
    assert module_closure("pipelines.a") == (
        "operators", "operators.c", "pipelines", "pipelines.a", "pipelines.b",
    )  # fmt: skip
    base = _version(tree)
    (tree / "pipelines" / "cli.py").write_text("import pipelines.a\nTABLE = 'wider'\n")
    assert _version(tree) == base, "editing the CLI must not redo a stage"
    (tree / "operators" / "c.py").write_text("X = 2\n")
    assert _version(tree) != base, "editing an operator the stage uses must redo it"


def test_what_the_spec_imports_to_validate_does_not_become_every_stages_code():
    phantoms, simulate = module_closure("pipelines.phantoms"), module_closure("pipelines.simulate")
    assert "pipelines.spec" in phantoms, "the spec's own source counts"
    assert not [m for m in phantoms + simulate if m.startswith("models")], "models do not make phantoms"
    assert "operators.recon" not in phantoms and "operators.recon" in module_closure("pipelines.recon")


def test_a_train_stage_counts_its_own_model_and_recon_counts_none():
    """Editing the Neumann network retrains it, not MoDL, and re-runs no classical reconstruction."""
    from models import MODELS
    from models.registry import model_module

    assert {model_module(name) for name in MODELS} == {
        "models.unrolled", "models.neumann", "models.modl", "models.post", "models.varnet", "models.analysis",
        "models.gan", "models.srcnn",
    }  # fmt: skip
    neumann = set(module_closure("pipelines.train", "models.neumann", leaves=fingerprint.MODEL_LEAVES))
    modl = set(module_closure("pipelines.train", "models.modl", leaves=fingerprint.MODEL_LEAVES))
    assert "models.neumann" in neumann and "models.blocks" in neumann and "models.modl" not in neumann
    assert "models.analysis" not in neumann
    assert "models.modl" in modl and "models.neumann" not in modl and "models.post" not in modl
    assert "models.registry" in neumann, "the registry's own source still counts"
    recon = set(module_closure("pipelines.recon", leaves=fingerprint.MODEL_LEAVES))
    assert "operators.solvers" in recon and not {"models.neumann", "models.modl", "models.post"} & recon


def test_pipeline_plan_gives_two_train_stages_code_versions_of_their_own_models():
    from pipelines.runner import stage_code_version
    from pipelines.spec import PipelineSpec

    spec = PipelineSpec.model_validate(
        {
            "name": "p",
            "archive": {"path": "a"},
            "stages": [
                {
                    "kind": "phantoms",
                    "n_scans": 3,
                    "shape": [8, 16, 16],
                    "split": {"train": 1, "val": 1, "test": 1},
                },
                {"kind": "simulate", "modality": "mri", "mask": {"kind": "random_1d", "acceleration": 4}},
                {"kind": "train", "name": "a", "model": {"name": "neumann"}},
                {"kind": "train", "name": "b", "model": {"name": "modl"}},
                {"kind": "train", "name": "c", "model": {"name": "neumann", "kwargs": {"n_blocks": 2}}},
            ],
        }
    )
    a, b, c = (stage_code_version(s) for s in spec.stages[2:])
    assert a == c and a != b
