"""Redaction of secrets wherever a spec is shown; fingerprints still see them."""

import pytest
import yaml

from pipelines.errors import SpecError
from pipelines.fingerprint import stage_fingerprint
from pipelines.secrets import MASK, redact, redact_uri
from pipelines.specfile import load_spec


def test_storage_options_and_secret_names_are_masked_and_nothing_else():
    spec = {
        "archive": {
            "path": "s3://b/x",
            "storage_options": {"key": "AKIA", "secret": "S3CR3T", "endpoint_url": "h"},
        },
        "stages": [{"kind": "ingest", "api_token": "tok", "password": "", "tokens": ["a", "b"], "keep": 2}],
    }
    out = redact(spec)
    assert out["archive"] == {
        "path": "s3://b/x",
        "storage_options": {"key": MASK, "secret": MASK, "endpoint_url": MASK},
    }
    assert out["stages"][0] == {
        "kind": "ingest",
        "api_token": MASK,
        "password": "",
        "tokens": [MASK, MASK],
        "keep": 2,
    }
    assert spec["archive"]["storage_options"]["key"] == "AKIA", "redact returns a copy"


def test_credentials_in_uris_are_masked():
    assert redact_uri("s3://AKIA:S3CR3T@bucket/x") == "s3://***@bucket/x"
    assert redact_uri("http://user:pw@mlflow:5000") == "http://***@mlflow:5000"
    assert redact_uri("sqlite:////work/mlflow.db") == "sqlite:////work/mlflow.db"


def test_validation_errors_do_not_echo_secret_values(tmp_path):
    raw = {"name": "x", "archive": {"path": "a", "storage_options": "SUPERSECRET123"},
           "stages": [{"kind": "evaluate"}]}  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "archive.storage_options" in str(info.value) and "SUPERSECRET123" not in str(info.value)


def test_a_changed_secret_changes_the_fingerprint():
    from pipelines.spec import StageSpec

    class WithToken(StageSpec):
        kind: str = "x"
        token: str

    a, b = WithToken(token="one"), WithToken(token="two")
    assert stage_fingerprint(a, [], 0, "c") != stage_fingerprint(b, [], 0, "c")
