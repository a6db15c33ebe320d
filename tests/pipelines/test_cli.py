"""The command line: exit codes and one-line errors without tracebacks."""

import yaml

from tests.pipelines.helpers import ROOT, medrecon


def test_help_explains_the_commands():
    out = medrecon("--help")
    assert out.returncode == 0
    for word in ("run", "validate", "show"):
        assert word in out.stdout
    run_help = medrecon("run", "--help").stdout
    assert "--set" in run_help and "train.epochs=3" in run_help and "--debug" in run_help


def test_bad_spec_exits_2_with_one_clear_message_and_no_traceback(tmp_path):
    raw = yaml.safe_load((ROOT / "pipelines/specs/quickstart.yaml").read_text())
    raw["stages"][2]["epochz"] = 1
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(raw))
    out = medrecon("run", str(spec))
    assert out.returncode == 2
    assert (
        "bad.yaml" in out.stderr and "stages[2] (train 'model').epochz: unknown field 'epochz'" in out.stderr
    )
    assert "Traceback" not in out.stderr + out.stdout


def test_debug_shows_the_traceback(tmp_path):
    out = medrecon("run", str(tmp_path / "missing.yaml"), "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr and "pipeline file not found" in out.stderr


def test_validate_prints_defaults_and_applies_overrides():
    out = medrecon("validate", "pipelines/specs/quickstart.yaml", "--set", "train.epochs=9")
    assert out.returncode == 0, out.stderr
    assert "epochs: 9" in out.stdout and "valid" in out.stdout


def test_show_on_missing_archive_is_a_clear_error(tmp_path):
    out = medrecon("show", str(tmp_path / "nope"))
    assert out.returncode == 1 and "not found" in out.stderr and "Traceback" not in out.stderr


def test_show_marks_done_stale_quarantined_and_missing(tmp_path):
    from tests.pipelines.helpers import phantom_archive

    archive = phantom_archive(tmp_path / "a", n=4)
    archive.commit("recon/cs_tv", "s0", "old")  # left by an earlier run
    archive.commit("recon/cs_tv", "s1", "new")
    archive.quarantine(
        "recon/cs_tv", "s2", "IntegrityError: scans/s2/kspace: chunk c/0/0/0/0 is missing", "recon"
    )
    archive.commit_stage("recon", "fp", kind="recon", units={"recon/cs_tv": "new"})
    out = medrecon("show", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("│ s")}
    marks = {scan: row.rstrip().rstrip("│").split("│")[-1].strip() for scan, row in rows.items()}
    assert marks == {"s0": "~", "s1": "✓", "s2": "✗", "s3": "·"}
    assert "recon/cs_tv: s2: IntegrityError: scans/s2/kspace: chunk c/0/0/0/0 is missing" in out.stdout


def test_help_lists_reprocess_and_exit_codes():
    out = medrecon("--help")
    assert "reprocess" in out.stdout and "3 some scans quarantined" in out.stdout
    reprocess_help = medrecon("reprocess", "--help").stdout
    for option in ("--method", "--split", "--scans", "--actors", "--evaluate", "--wait-for-lock"):
        assert option in reprocess_help
