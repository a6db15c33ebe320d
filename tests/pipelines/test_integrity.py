"""Every read is checked against its commit: deleted, truncated and altered chunks, NaN outputs."""

import os

import numpy as np
import pytest

from pipelines.errors import IntegrityError
from pipelines.spec import SimulateStage
from tests.pipelines.helpers import phantom_archive, simulate


@pytest.fixture
def archive(tmp_path):
    a = phantom_archive(tmp_path / "a", n=1, shape=(8, 32, 32))
    outcome = simulate(a, "s0", SimulateStage(kind="simulate", slab=2, coils=2))
    assert outcome.status == "done", outcome.error
    return a


def _chunk(archive, name, key):
    return os.path.join(archive.uri, "scans", "s0", name, *key.split("/"))


def test_a_deleted_chunk_is_named_not_read_as_zeros(archive):
    clean = archive.read_array("s0", "kspace", 0, 2)
    os.remove(_chunk(archive, "kspace", "c/1/0/0/0"))  # slices 2-3
    np.testing.assert_array_equal(archive.read_array("s0", "kspace", 0, 2), clean)  # other slabs still read
    with pytest.raises(
        IntegrityError,
        match=r"scans/s0/kspace: chunk c/1/0/0/0 \(slices 2-3\) does not match its commit .*"
        r"chunk c/1/0/0/0 is missing from the store",
    ):
        archive.read_array("s0", "kspace")


def test_a_truncated_chunk_is_named(archive):
    path = _chunk(archive, "kspace", "c/2/0/0/0")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    with pytest.raises(
        IntegrityError, match=r"scans/s0/kspace: chunk c/2/0/0/0 \(slices 4-5\) could not be decoded"
    ):
        archive.read_array("s0", "kspace", 4, 6)


def test_an_altered_chunk_is_named(archive):
    path = _chunk(archive, "kspace", "c/3/0/0/0")
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(
        IntegrityError, match=r"chunk c/3/0/0/0 \(slices 6-7\) .*bytes changed after it was committed"
    ):
        archive.read_array("s0", "kspace", 7, 8)


def test_a_replaced_array_is_refused(archive):
    archive.write_array("s0", "mask", np.ones((16, 16), bool))  # another shape, no new commit
    with pytest.raises(
        IntegrityError, match=r"scans/s0/mask: stored as \[16, 16\] bool but committed as \[32, 32\]"
    ):
        archive.read_array("s0", "mask")


def test_the_writer_refuses_nan_and_inf_naming_the_slices(archive):
    out = archive.create_array("s0", "recon/x", (4, 8, 8), np.float32, slab=2)
    out.write(0, np.zeros((2, 8, 8), np.float32))
    bad = np.zeros((2, 8, 8), np.float32)
    bad[1, 0, :3] = np.nan
    with pytest.raises(IntegrityError, match=r"scans/s0/recon/x: 3 NaN/Inf values in slices \[3\]"):
        out.write(2, bad)
    with pytest.raises(Exception, match=r"slabs \[1\] .* were never written"):
        out.record()


def test_checked_reads_cost_little(archive):
    """Not a timing bar (benchmarks/ measure speed): the check reads each slab once, no more."""
    reader = archive.reader("s0", "kspace")
    assert [len(reader.record["crc32"]), reader.record["slab"]] == [4, 2]
    np.testing.assert_array_equal(reader[2:5], archive.read_array("s0", "kspace")[2:5])
