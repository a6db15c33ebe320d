"""Pipeline-spec validation and its error messages."""

import re
from pathlib import Path

import pytest
import yaml

from pipelines.errors import SpecError
from pipelines.spec import STAGE_KINDS, PipelineSpec
from pipelines.specfile import apply_overrides, load_spec

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
    assert [s.name for s in spec.stages] == ["phantoms", "simulate", "model", "recon", "evaluate"]
    assert spec.stage("model").workers == 2 and spec.stage("recon").methods[-1] == "learned:model"


@pytest.mark.parametrize("path", sorted(QUICKSTART.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.stages and spec.archive.path


def test_unknown_field_names_file_field_and_fix(tmp_path, raw):
    raw["stages"][2]["epochz"] = 3
    path = _write(tmp_path, raw)
    with pytest.raises(
        SpecError, match=r"(?s)spec\.yaml.*stages\[2\] \(train 'model'\)\.epochz: unknown field 'epochz'"
    ):
        load_spec(path)


def test_wrong_type_names_expected_and_found(tmp_path, raw):
    raw["stages"][2]["epochs"] = "many"
    with pytest.raises(
        SpecError, match=r"stages\[2\] \(train 'model'\)\.epochs: .*valid integer.*found 'many'"
    ):
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


def test_learned_method_must_name_an_earlier_train_stage(tmp_path, raw):
    raw["stages"] = [s for s in raw["stages"] if s["kind"] != "train"]
    with pytest.raises(SpecError, match=r"method 'learned:model' names no train stage before it; .*none"):
        load_spec(_write(tmp_path, raw))


def test_unknown_model_kwarg_and_method_list_the_choices(tmp_path, raw):
    raw["stages"][2]["model"]["name"] = "resnet9000"
    raw["stages"][3]["methods"] = ["zero_filled", "magic"]
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, raw))
    assert re.search(r"unknown model 'resnet9000'; expected one of \[.*'unrolled_gd'.*\]", str(info.value))
    assert "unknown method 'magic'; expected a classical method (zero_filled, fbp" in str(info.value)
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["stages"][2]["model"]["kwargs"]["bogus"] = 3
    with pytest.raises(
        SpecError, match=r"stages\[2\] \(train 'model'\)\.model: .*bad keyword arguments.*bogus"
    ):
        load_spec(_write(tmp_path, raw))


def test_stage_kinds_come_from_one_registry():
    assert list(STAGE_KINDS) == [
        "phantoms",
        "ingest",
        "preprocess",
        "simulate",
        "train",
        "train_task",
        "gate",
        "recon",
        "evaluate",
        "segment",
        "classify",
    ]
    assert STAGE_KINDS["recon"].runner().__module__ == "pipelines.recon"
    assert STAGE_KINDS["gate"].runner().__module__ == "pipelines.gate"
    assert all(k.spec.model_fields["kind"].annotation.__args__ == (name,) for name, k in STAGE_KINDS.items())


def test_names_default_to_kinds_must_be_unique_and_kinds_may_repeat(raw):
    train = raw["stages"][2]
    raw["stages"].insert(3, {**train, "name": "second"})
    spec = PipelineSpec.model_validate(raw)
    assert [s.name for s in spec.of_kind("train")] == ["model", "second"]
    raw["stages"][3]["name"] = "model"
    with pytest.raises(Exception, match=r"stage names must be unique; \['model'\] appear more than once"):
        PipelineSpec.model_validate(raw)


def test_images_come_from_phantoms_or_ingest_then_preprocess_then_simulate(raw):
    ingest = {"kind": "ingest", "sources": ["data"]}
    with pytest.raises(Exception, match="phantoms or ingest, not both"):
        PipelineSpec.model_validate({**raw, "stages": [ingest, *raw["stages"]]})
    pre = {"kind": "preprocess", "shape": [8, 16, 16]}
    stages = [ingest, pre, {**raw["stages"][1], "image": "derived/preprocessed"}, *raw["stages"][2:]]
    assert [s.kind for s in PipelineSpec.model_validate({**raw, "stages": stages}).stages][:3] == [
        "ingest", "preprocess", "simulate",
    ]  # fmt: skip
    with pytest.raises(Exception, match="put preprocess before simulate"):
        PipelineSpec.model_validate({**raw, "stages": [ingest, stages[2], pre, *stages[3:]]})
    with pytest.raises(Exception, match="derived/"):
        PipelineSpec.model_validate({**raw, "stages": [ingest, {**pre, "output": "other"}, *stages[2:]]})


def test_data_stages_come_first_and_once(raw):
    sim = raw["stages"].pop(1)
    raw["stages"].insert(3, sim)
    with pytest.raises(
        Exception, match=r"data stage 'simulate' \(simulate\) comes after stage 'model' \(train\)"
    ):
        PipelineSpec.model_validate(raw)
    raw["stages"].pop(3)
    raw["stages"][1:1] = [sim, {**sim, "name": "again"}]
    with pytest.raises(Exception, match=r"at most one 'simulate' stage"):
        PipelineSpec.model_validate(raw)


def test_model_uris_are_methods(raw):
    raw["stages"][3]["methods"] = [
        "cs_tv",
        "models:/other/3",
        "models:/other@champion",
        "runs:/0123456789abcdef/m",
    ]
    assert PipelineSpec.model_validate(raw).stage("recon").refs()[1].kind == "model"
    raw["stages"][3]["methods"] = ["models:/other"]
    with pytest.raises(Exception, match="unknown method 'models:/other'"):
        PipelineSpec.model_validate(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="pipeline file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_overrides_by_stage_name_kind_index_and_top_level(raw):
    out = apply_overrides(
        raw,
        ["train.epochs=3", "stages.0.n_scans=4", "seed=7", "simulate.mask.acceleration=8", "model.lr=0.1"],
    )
    assert out["stages"][2]["epochs"] == 3 and out["stages"][0]["n_scans"] == 4
    assert (
        out["seed"] == 7 and out["stages"][1]["mask"]["acceleration"] == 8 and out["stages"][2]["lr"] == 0.1
    )
    assert raw["seed"] == 0, "overrides must not mutate the input"
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        apply_overrides(raw, ["train.epochs"])
    raw["stages"].insert(3, {**raw["stages"][2], "name": "second"})
    with pytest.raises(SpecError, match=r"no single stage named or of kind 'train'.*--set neumann.epochs=3"):
        apply_overrides(raw, ["train.epochs=3"])


def test_specs_are_frozen(raw):
    spec = PipelineSpec.model_validate(raw)
    with pytest.raises(Exception, match="frozen"):
        spec.seed = 3
