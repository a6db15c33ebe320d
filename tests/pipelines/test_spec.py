"""Pipeline-spec validation and its error messages."""

from pathlib import Path

import pytest
import yaml

from pipelines.errors import SpecError
from pipelines.spec import PipelineSpec, apply_overrides, load_spec

QUICKSTART = Path(__file__).resolve().parents[2] / "pipelines" / "specs" / "quickstart.yaml"


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def raw():
    return yaml.safe_load(QUICKSTART.read_text())


def test_quickstart_spec_is_valid():
    spec = load_spec(QUICKSTART)
    assert [s.kind for s in spec.stages] == ["phantoms", "simulate", "train", "recon", "evaluate"]
    assert spec.stage("train").workers == 2


@pytest.mark.parametrize("path", sorted(QUICKSTART.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.stages and spec.archive.path


def test_unknown_field_names_file_field_and_fix(tmp_path, raw):
    raw["stages"][2]["epochz"] = 3
    path = _write(tmp_path, raw)
    with pytest.raises(
        SpecError, match=r"(?s)spec\.yaml.*stages\[2\] \(train\)\.epochz: unknown field 'epochz'"
    ):
        load_spec(path)


def test_wrong_type_names_expected_and_found(tmp_path, raw):
    raw["stages"][2]["epochs"] = "many"
    with pytest.raises(SpecError, match=r"stages\[2\] \(train\)\.epochs: .*valid integer.*found 'many'"):
        load_spec(_write(tmp_path, raw))


def test_missing_archive_path(tmp_path, raw):
    raw["archive"] = {}
    with pytest.raises(SpecError, match=r"archive\.path: is required but missing"):
        load_spec(_write(tmp_path, raw))
    del raw["archive"]
    with pytest.raises(SpecError, match=r"archive: is required but missing"):
        load_spec(_write(tmp_path, raw))


def test_cross_field_checks_say_how_to_fix(tmp_path, raw):
    raw["stages"][0]["split"] = {"train": 10, "val": 2, "test": 5}
    with pytest.raises(SpecError, match=r"split train\+val\+test = 17 must equal n_scans = 16"):
        load_spec(_write(tmp_path, raw))


def test_learned_recon_without_model_is_refused(tmp_path, raw):
    raw["stages"] = [s for s in raw["stages"] if s["kind"] != "train"]
    with pytest.raises(SpecError, match="add a train stage or set recon.model_uri"):
        load_spec(_write(tmp_path, raw))


def test_unknown_model_and_method_list_the_choices(tmp_path, raw):
    raw["stages"][2]["model"]["name"] = "resnet9000"
    raw["stages"][3]["methods"] = ["zero_filled", "magic"]
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, raw))
    assert "unknown model 'resnet9000'; expected one of ['unrolled_gd']" in str(info.value)
    assert "unknown method(s) ['magic']" in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="pipeline file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_overrides_by_stage_kind_index_and_top_level(raw):
    out = apply_overrides(
        raw, ["train.epochs=3", "stages.0.n_scans=4", "seed=7", "simulate.mask.acceleration=8"]
    )
    spec_raw = out
    assert spec_raw["stages"][2]["epochs"] == 3 and spec_raw["stages"][0]["n_scans"] == 4
    assert spec_raw["seed"] == 7 and spec_raw["stages"][1]["mask"]["acceleration"] == 8
    assert raw["seed"] == 0, "overrides must not mutate the input"
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        apply_overrides(raw, ["train.epochs"])


def test_specs_are_frozen(raw):
    spec = PipelineSpec.model_validate(raw)
    with pytest.raises(Exception, match="frozen"):
        spec.seed = 3
