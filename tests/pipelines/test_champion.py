"""The champion/challenger registry: compare-and-set promotion, rejection, history, rollback, the CLI."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from models.registry import build_model, save_model
from pipelines import champion
from pipelines.champion import (
    CHALLENGER,
    CHAMPION,
    Event,
    alias_version,
    decided,
    history,
    promote,
    reject,
    rollback,
    set_challenger,
)
from pipelines.errors import SpecError, TrackingError
from pipelines.tracking import MlflowTracker, client, register_model, start_pipeline_run

from .helpers import ROOT, medrecon, wait_for

pytestmark = [pytest.mark.timeout(300)]

MODEL = "nightly"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An MLflow SQLite database with ``nightly`` versions 1, 2, 3 and ``other`` version 1 (built once)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    run_id = start_pipeline_run(uri, "train", "train", "fp", {})
    kwargs = {"n_iter": 2, "features": 4}
    save_model(build_model("unrolled_gd", kwargs), "unrolled_gd", kwargs, root / "m")
    MlflowTracker(uri, run_id).log_model_dir(root / "m", "models/model")
    for v in (1, 2, 3):
        assert register_model(uri, MODEL, run_id, "models/model") == f"models:/{MODEL}/{v}"
    register_model(uri, "other", run_id, "models/model")
    return root / "mlflow.db"


@pytest.fixture
def uri(template, tmp_path) -> str:
    """A fresh copy of the template registry for one test."""
    shutil.copy(template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def _version_tags(uri: str, version: str) -> dict[str, str]:
    return client(uri).get_model_version(MODEL, version).tags


def test_promote_without_champion_sets_the_alias_and_records_the_event(uri):
    assert alias_version(uri, MODEL, CHAMPION) is None
    event = promote(
        uri, MODEL, "1", expected=None, reason="first model", metrics={"challenger/psnr": 29.5},
        run_key="2026-11-29", run_id="abc123",
    )  # fmt: skip
    assert isinstance(event, Event)
    assert (event.action, event.version, event.previous, event.run_key) == (
        "promote",
        "1",
        None,
        "2026-11-29",
    )
    assert alias_version(uri, MODEL, CHAMPION) == "1"
    tags = _version_tags(uri, "1")
    assert tags["medrecon.gate"] == "promoted" and tags["medrecon.gate_reason"] == "first model"
    assert history(uri, MODEL) == [event]


def test_promote_with_a_stale_expected_champion_changes_nothing(uri):
    first = promote(uri, MODEL, "1", expected=None, reason="first")
    assert promote(uri, MODEL, "2", expected=None, reason="raced") is None  # champion is 1, not None
    assert promote(uri, MODEL, "2", expected="3", reason="raced") is None
    assert alias_version(uri, MODEL, CHAMPION) == "1"
    assert "medrecon.gate" not in _version_tags(uri, "2")
    assert history(uri, MODEL) == [first]
    second = promote(uri, MODEL, 2, expected=1, reason="better")  # ints are accepted too
    assert second is not None and second.previous == "1"
    assert alias_version(uri, MODEL, CHAMPION) == "2"


def test_promoting_the_current_champion_again_is_refused(uri):
    promote(uri, MODEL, "2", expected=None, reason="first")
    with pytest.raises(TrackingError, match=r"nightly v2 is already the champion"):
        promote(uri, MODEL, "2", expected="2", reason="again")
    with pytest.raises(TrackingError, match=r"already the champion"):
        promote(uri, MODEL, "2", expected=None, reason="again", action="manual-promote")
    assert [e.action for e in history(uri, MODEL)] == ["promote"]


def test_reject_tags_the_version_and_decided_finds_each_decision(uri):
    promote(uri, MODEL, "1", expected=None, reason="first")
    event = reject(uri, MODEL, "2", reason="psnr -0.8 dB", metrics={"challenger/psnr": 28.1}, run_key="n2")
    assert (event.action, event.version, event.previous) == ("reject", "2", "1")
    tags = _version_tags(uri, "2")
    assert tags["medrecon.gate"] == "rejected" and tags["medrecon.gate_reason"] == "psnr -0.8 dB"
    assert alias_version(uri, MODEL, CHAMPION) == "1"
    assert decided(uri, MODEL, "2") == event
    assert decided(uri, MODEL, "1").action == "promote"
    assert decided(uri, MODEL, "3") is None
    with pytest.raises(TrackingError, match=r"nightly v1 is the champion"):
        reject(uri, MODEL, "1", reason="no")


def test_history_is_oldest_first_and_keeps_every_field(uri):
    promote(uri, MODEL, "1", expected=None, reason="first", run_key="n1")
    reject(uri, MODEL, "2", reason="worse", metrics={"challenger/psnr": 28.0, "champion/psnr": 29.0},
           run_key="n2", run_id="run-2")  # fmt: skip
    promote(uri, MODEL, "3", expected="1", reason="better", run_key="n3")
    promote(uri, "other", "1", expected=None, reason="another model")  # not in nightly's history
    events = history(uri, MODEL)
    assert [(e.action, e.version, e.previous, e.run_key) for e in events] == [
        ("promote", "1", None, "n1"),
        ("reject", "2", "1", "n2"),
        ("promote", "3", "1", "n3"),
    ]
    assert events[1].metrics == {"challenger/psnr": 28.0, "champion/psnr": 29.0}
    assert events[1].run_id == "run-2" and events[0].run_id is None
    assert events[0].time < events[1].time < events[2].time and events[0].time.endswith("+00:00")
    assert history(uri, "never-registered") == []


def test_rollback_undoes_promotions_one_at_a_time(uri):
    for version, expected in (("1", None), ("2", "1"), ("3", "2")):
        promote(uri, MODEL, version, expected=expected, reason=f"night {version}")
    event = rollback(uri, MODEL, reason="v3 fails on real scans")
    assert (event.action, event.version, event.previous) == ("rollback", "2", "3")
    assert alias_version(uri, MODEL, CHAMPION) == "2"
    assert _version_tags(uri, "3")["medrecon.gate"] == "rolled-back"
    assert rollback(uri, MODEL).version == "1"  # back again, not a toggle between 2 and 3
    with pytest.raises(TrackingError, match=r"nightly v1 has no earlier champion in its history"):
        rollback(uri, MODEL)
    assert alias_version(uri, MODEL, CHAMPION) == "1"
    assert [e.action for e in history(uri, MODEL)] == ["promote"] * 3 + ["rollback"] * 2


def test_rollback_returns_to_a_champion_set_before_any_history(uri):
    client(uri).set_registered_model_alias(MODEL, CHAMPION, "1")  # e.g. set by hand in the MLflow UI
    promote(uri, MODEL, "2", expected="1", reason="better")
    assert rollback(uri, MODEL).version == "1"


def test_rollback_without_a_champion_or_an_earlier_one_is_an_error(uri):
    with pytest.raises(TrackingError, match=r"model 'nightly' at sqlite:///.* has no champion to roll back"):
        rollback(uri, MODEL)
    promote(uri, MODEL, "1", expected=None, reason="first")
    with pytest.raises(TrackingError, match=r"no earlier champion"):
        rollback(uri, MODEL)
    client(uri).set_registered_model_alias(MODEL, CHAMPION, "3")
    with pytest.raises(TrackingError, match=r"champion of 'nightly' is v3, but its history ends at v1"):
        rollback(uri, MODEL)


def test_unknown_models_and_versions_are_named_in_the_error(uri, tmp_path):
    with pytest.raises(
        TrackingError, match=r"model 'nightly' has no version 9 at sqlite:///.*\(versions: 1, 2, 3\)"
    ):
        promote(uri, MODEL, "9", expected=None, reason="x")
    with pytest.raises(TrackingError, match=r"no registered model 'nightlly' .*registered: nightly, other"):
        reject(uri, "nightlly", "1", reason="x")
    with pytest.raises(SpecError, match=r"invalid model name 'a/b': expected \[A-Za-z0-9._-\]\+"):
        history(uri, "a/b")
    with pytest.raises(SpecError, match=r"invalid model version 'v1'"):
        promote(uri, MODEL, "v1", expected=None, reason="x")
    missing = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(TrackingError, match=r"no MLflow database at .*elsewhere/mlflow.db"):
        alias_version(f"sqlite:///{missing}", MODEL, CHAMPION)
    assert not missing.exists()  # MLflow would have created an empty database


def test_set_challenger_moves_the_alias_and_tags_the_role(uri):
    set_challenger(uri, MODEL, "2")
    assert alias_version(uri, MODEL, CHALLENGER) == "2"
    assert _version_tags(uri, "2")["medrecon.role"] == "challenger"
    set_challenger(uri, MODEL, "3")
    assert alias_version(uri, MODEL, CHALLENGER) == "3"


def test_errors_from_a_server_do_not_show_its_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(TrackingError, match=r"http://\*\*\*@127.0.0.1:9") as info:
        history("http://alice:s3cret@127.0.0.1:9", MODEL)  # nothing listens on port 9
    assert "s3cret" not in str(info.value)


def test_without_a_lock_a_promotion_overwritten_before_verification_reports_none(uri, monkeypatch):
    """Check-set-verify (MLflow servers): another writer setting the alias in the settle window wins."""

    @contextlib.contextmanager
    def no_lock(_uri):
        yield False

    def interloper(_seconds):  # the settle wait, during which a concurrent night promotes v3
        client(uri).set_registered_model_alias(MODEL, CHAMPION, "3")

    monkeypatch.setattr(champion, "_registry_lock", no_lock)
    monkeypatch.setattr(champion, "time", types.SimpleNamespace(sleep=interloper, time=time.time))
    assert promote(uri, MODEL, "2", expected=None, reason="raced") is None
    assert alias_version(uri, MODEL, CHAMPION) == "3"
    assert history(uri, MODEL) == [] and "medrecon.gate" not in _version_tags(uri, "2")


_RACER = textwrap.dedent(
    """
    import json, os, sys, time
    from pipelines import champion
    uri, version, barrier = sys.argv[1:]
    read = champion._aliases
    def slow_read(*args, **kwargs):  # widen the read-to-set window: without a lock both read "none"
        found = read(*args, **kwargs)
        time.sleep(0.3)
        return found
    champion._aliases = slow_read
    open(f"{barrier}.ready-{version}", "w").close()
    while not os.path.exists(f"{barrier}.go"):
        time.sleep(0.005)
    event = champion.promote(uri, "nightly", version, expected=None, reason=f"night {version}")
    print(json.dumps(None if event is None else event.version))
    """
)


def test_two_concurrent_promotions_exactly_one_wins(uri, tmp_path):
    barrier = str(tmp_path / "barrier")
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, uri, v, barrier], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for v in ("1", "2")
    ]
    wait_for(lambda: all(Path(f"{barrier}.ready-{v}").exists() for v in ("1", "2")), 60, "both racers")
    Path(f"{barrier}.go").touch()
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert alias_version(uri, MODEL, CHAMPION) == winners[0]
    events = history(uri, MODEL)
    assert [(e.action, e.version) for e in events] == [("promote", winners[0])]


def test_models_cli_promotes_rolls_back_lists_and_shows_history(uri, tmp_path, monkeypatch):
    promote(
        uri, MODEL, "1", expected=None, reason="night one", metrics={"challenger/psnr": 29.5}, run_key="n1"
    )
    reject(uri, MODEL, "2", reason="psnr too low", run_key="n2")
    set_challenger(uri, MODEL, "2")

    out = medrecon(
        "models", "promote", MODEL, "3", "--reason", "hand-picked", "--tracking-uri", uri, tmp=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "nightly: v3 is now the champion (was v1); reason: hand-picked" in out.stdout
    assert alias_version(uri, MODEL, CHAMPION) == "3"
    out = medrecon("models", "rollback", MODEL, env={"MEDRECON_TRACKING_URI": uri}, tmp=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "rolled back from v3 to v1" in out.stdout
    assert alias_version(uri, MODEL, CHAMPION) == "1"

    monkeypatch.delenv("MEDRECON_TRACKING_URI", raising=False)
    calls = {
        "models": ("models", "list", "--tracking-uri", uri),
        "versions": ("models", "list", MODEL, "--tracking-uri", uri),
        "history": ("models", "history", MODEL, "--tracking-uri", uri),
        "no-uri": ("models", "list"),
    }
    running = {k: medrecon(*args, tmp=tmp_path, wait=False) for k, args in calls.items()}
    out = {k: p.communicate(timeout=120) + (p.returncode,) for k, p in running.items()}

    stdout, _, rc = out["models"]
    assert rc == 0
    rows = {line.split("│")[1].strip(): line for line in stdout.splitlines() if line.startswith("│")}
    assert [c.strip() for c in rows[MODEL].strip("│").split("│")] == [MODEL, "1", "2", "3"]
    assert [c.strip() for c in rows["other"].strip("│").split("│")] == ["other", "-", "-", "1"]

    stdout, _, rc = out["versions"]
    assert rc == 0
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in stdout.splitlines() if "│" in line]
    by_version = {row[0]: row for row in cells if row[0].isdigit()}
    assert by_version["1"][2:5] == ["champion", "promoted", "night one"]
    assert by_version["2"][2:5] == ["challenger", "rejected", "psnr too low"]
    assert by_version["3"][2:5] == ["-", "rolled-back", "manual rollback"]
    assert len(by_version["1"][5]) == 32  # the MLflow run that logged it

    stdout, _, rc = out["history"]
    assert rc == 0
    actions = [
        [c.strip() for c in line.strip("│").split("│")][1:4] for line in stdout.splitlines() if "│" in line
    ]
    assert actions == [
        ["promote", "1", "-"],
        ["reject", "2", "1"],
        ["manual-promote", "3", "1"],
        ["rollback", "1", "3"],
    ]
    assert "challenger/psnr=29.5" in stdout and "n1" in stdout

    _, stderr, rc = out["no-uri"]
    assert rc == 2 and "no tracking URI: pass --tracking-uri" in stderr


def test_models_cli_errors_are_one_line_with_exit_code_2(uri):
    """In-process (a subprocess costs seconds of imports): unknown model, refused promotion."""
    from typer.testing import CliRunner

    from pipelines.models_cli import app

    promote(uri, MODEL, "1", expected=None, reason="first")
    runner = CliRunner()
    out = runner.invoke(app, ["history", "nope", "--tracking-uri", uri])
    assert out.exit_code == 2 and "error: no registered model 'nope'" in out.stderr
    out = runner.invoke(app, ["promote", MODEL, "1", "--tracking-uri", uri])
    assert out.exit_code == 2 and "nightly v1 is already the champion" in out.stderr
    out = runner.invoke(app, ["promote", MODEL, "v2", "--tracking-uri", uri])
    assert out.exit_code == 2 and "invalid model version 'v2'" in out.stderr
    assert all("Traceback" not in line for line in out.stderr.splitlines())
    out = runner.invoke(app, ["history", MODEL, "--tracking-uri", uri])
    assert out.exit_code == 0 and "promote" in out.stdout
