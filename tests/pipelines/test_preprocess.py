"""The preprocess stage (:mod:`pipelines.preprocess`): its pure functions against NumPy/SciPy, and the
stage on real Ray with a real Zarr archive against an in-memory reference of the whole volume.

The reference (:func:`reference`) is written independently of the stage's code: ``scipy.ndimage.zoom``
(order 1, voxel centres aligned: ``grid_mode=True, mode="nearest"``), ``np.percentile``, ``np.mean``,
``np.std`` and ``np.pad`` / slicing, on the whole volume in memory.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from rich.console import Console

from operators.transforms import (
    HISTOGRAM_BINS,
    Moments,
    crop_or_pad,
    histogram,
    histogram_percentiles,
    input_slices,
    resample_slab,
    resampled_size,
)
from pipelines.context import StageContext
from pipelines.errors import IntegrityError
from pipelines.fingerprint import scan_fingerprint
from pipelines.integrity import slab_crc, slab_record
from pipelines.preprocess import make_plan, run, source_spacing
from pipelines.spec import PipelineSpec, PreprocessStage
from pipelines.store import SOURCE, Archive, CatalogRow
from pipelines.tracking import MlflowTracker, start_pipeline_run

RNG = np.random.default_rng(7)


def volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A smooth blob plus noise plus a few bright outliers (something for the clip to cut), float32."""
    rng = np.random.default_rng(seed)
    d, h, w = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    x = 100 * np.exp(-(d**2 + h**2 + w**2) * 2) + rng.normal(0, 5, shape)
    x.flat[rng.choice(x.size, 20, replace=False)] = 1000.0
    return x.astype(np.float32)


def reference(image: np.ndarray, spacing, stage: PreprocessStage, clip_values=None) -> np.ndarray:
    """The stage's steps on the whole volume in memory, with NumPy/SciPy (float64, cast at the end)."""
    x = image.astype(np.float64)
    if stage.spacing is not None:
        size = [math.floor(n * o / t + 0.5) for n, o, t in zip(x.shape, spacing, stage.spacing, strict=True)]
        x = ndi.zoom(
            x, [s / n for s, n in zip(size, x.shape, strict=True)], order=1, grid_mode=True, mode="nearest"
        )
        assert list(x.shape) == size
    if stage.clip_percentiles is not None:
        x = np.clip(x, *clip_values)
    if stage.normalize == "zscore":
        x = (x - x.mean()) / x.std()
    elif stage.normalize == "minmax":
        x = (x - x.min()) / (x.max() - x.min())
    if stage.shape is not None:
        for axis, n_out in enumerate(stage.shape):
            n_in = x.shape[axis]
            if n_in > n_out:  # crop: floor half at the start
                x = np.take(x, np.arange((n_in - n_out) // 2, (n_in - n_out) // 2 + n_out), axis=axis)
            elif n_in < n_out:  # pad: floor half of the zeros at the start
                pad = [(0, 0)] * 3
                pad[axis] = ((n_out - n_in) // 2, n_out - n_in - (n_out - n_in) // 2)
                x = np.pad(x, pad)
    return x.astype(np.float32)


# -- pure functions (no Ray) -----------------------------------------------------------------------
@pytest.mark.parametrize("out", [(7, 15, 5), (13, 11, 9), (27, 4, 20), (1, 1, 1)])
def test_resampling_equals_scipy_zoom_with_aligned_voxel_centres_whatever_the_slab(out):
    vol = RNG.random((13, 11, 9)).astype(np.float32)
    ref = ndi.zoom(vol.astype(np.float64), [o / i for o, i in zip(out, vol.shape, strict=True)],
                   order=1, grid_mode=True, mode="nearest")  # fmt: skip
    by_slab = {}
    for slab in (1, 3, out[0]):
        parts = [resample_slab(lambda a, b: vol[a:b], vol.shape, out, z0, min(z0 + slab, out[0]))
                 for z0 in range(0, out[0], slab)]  # fmt: skip
        by_slab[slab] = np.concatenate(parts)
        assert by_slab[slab].dtype == np.float32 and by_slab[slab].shape == out
        np.testing.assert_allclose(by_slab[slab], ref, rtol=0, atol=2e-6)
    assert all(np.array_equal(v, by_slab[1]) for v in by_slab.values())  # no seams: bitwise equal


def test_resampled_size_rounds_halves_up_and_keeps_at_least_one_voxel():
    assert resampled_size(20, 2.0, 1.5) == 27  # 26.67
    assert resampled_size(5, 1.0, 2.0) == 3  # 2.5 rounds up (Python's round would give 2)
    assert resampled_size(3, 1.0, 100.0) == 1


@pytest.mark.parametrize(("n_in", "n_out", "slab"), [(40, 13, 4), (13, 40, 5), (64, 64, 16), (100, 50, 7)])
def test_a_slab_reads_only_its_own_input_slices_and_one_neighbour_each_side(n_in, n_out, slab):
    vol = RNG.random((n_in, 3, 3)).astype(np.float32)
    reads = []

    def read(a, b):
        reads.append((a, b))
        return vol[a:b]

    scale = n_in / n_out
    for z0 in range(0, n_out, slab):
        z1 = min(z0 + slab, n_out)
        resample_slab(read, vol.shape, (n_out, 3, 3), z0, z1)
        a, b = reads[-1]
        first, last = (z0 + 0.5) * scale - 0.5, (z1 - 0.5) * scale - 0.5  # sample positions
        assert a >= max(0, math.floor(first)) and b <= min(n_in, math.ceil(last) + 1), (z0, a, b)
        assert (a, b) == input_slices(n_in, n_out, z0, z1)
        assert b - a <= math.ceil((z1 - z0) * scale) + 2
    assert len(reads) == -(-n_out // slab)


def test_histogram_percentiles_are_within_one_bin_of_numpy_on_skewed_data():
    x = np.concatenate([np.zeros(40_000), RNG.lognormal(3, 1, 60_000)]).astype(np.float32)  # background
    lo, hi = float(x.min()), float(x.max())
    counts = histogram(x, lo, hi, HISTOGRAM_BINS)
    reference_counts = np.histogram(x, bins=HISTOGRAM_BINS, range=(lo, hi))[0]
    # a value within float64 rounding of an edge may fall in the neighbouring bin: still within one bin
    assert counts.sum() == x.size and np.abs(counts - reference_counts).sum() <= 1e-3 * x.size
    qs = [0, 0.5, 30, 50, 95, 99.5, 100]
    found = np.array(histogram_percentiles(counts, lo, hi, qs))
    expected = np.percentile(x.astype(np.float64), qs)
    assert np.all(np.abs(found - expected) <= (hi - lo) / HISTOGRAM_BINS)
    assert found[0] == lo and found[-1] == hi


def test_moments_merged_from_slabs_equal_the_whole_volume_mean_and_std():
    x = (RNG.normal(1e3, 2.0, (50, 20, 20))).astype(np.float32)  # a large mean: cancellation would show
    rows = np.stack([Moments.row(x[i : i + 7]) for i in range(0, 50, 7)])
    m = Moments.merge(rows)
    assert m.n == x.size and m.min == x.min() and m.max == x.max()
    assert m.mean == pytest.approx(x.astype(np.float64).mean(), rel=1e-12)
    assert math.sqrt(m.var) == pytest.approx(x.astype(np.float64).std(), rel=1e-9)


def test_crop_or_pad_is_centred_with_the_odd_voxel_at_the_end():
    x = np.arange(5 * 4 * 6, dtype=np.float32).reshape(5, 4, 6) + 1
    out = crop_or_pad(x, (2, 7, None))
    assert out.shape == (2, 7, 6)
    np.testing.assert_array_equal(out[:, 1:5], x[1:3])  # crop 5 -> 2 drops 1 at the start; pad 4 -> 7 adds 1
    assert not out[:, 0].any() and not out[:, 5:].any()


def test_plan_cuts_chunks_so_each_output_slab_is_one_chunk_of_at_most_a_slab():
    for resampled_depth, out_depth, slab in [(20, 10, 4), (20, 27, 4), (5, 40, 16), (100, 9, 16), (9, 9, 9)]:
        plan = make_plan((resampled_depth, 4, 4), (1.0, 1.0, 1.0), None, (out_depth, 4, 4), slab)
        chunks = plan.chunks()
        assert sum(chunks) == resampled_depth and max(chunks) <= plan.slab
        starts = np.cumsum((0, *chunks[:-1]))
        slabs = [plan.output_slab(int(c)) for c in starts]
        real = [k for k in slabs if k is not None]
        assert len(real) == len(set(real)) and set(real) <= set(range(plan.n_slabs))


def test_records_from_task_crcs_equal_the_slab_writers_record(tmp_path):
    archive = Archive(str(tmp_path / "a"), create=True)
    data = RNG.random((10, 6, 5)).astype(np.float32)
    writer = archive.create_array("s", "derived/x", data.shape, np.float32, slab=4)
    for z0 in range(0, 10, 4):
        writer.write(z0, data[z0 : z0 + 4])
    crcs = {k: slab_crc(data[k * 4 : k * 4 + 4]) for k in range(3)}
    assert slab_record(data.shape, np.float32, 4, crcs, writer.where) == writer.record()
    with pytest.raises(Exception, match=r"slabs \[1\] .* were never written"):
        slab_record(data.shape, np.float32, 4, {0: 1, 2: 2}, writer.where)


def test_a_malformed_spacing_attribute_names_the_image_and_what_was_found():
    assert source_spacing({}, "scans/s/image") == (1.0, 1.0, 1.0)
    with pytest.raises(
        Exception, match=r"scans/s/image: attribute 'spacing' must be 3 positive .* found \[1, 0\]"
    ):
        source_spacing({"spacing": [1, 0]}, "scans/s/image")


# -- the stage on Ray ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    return uri, MlflowTracker(uri, start_pipeline_run(uri, "exp", "name", "fp", {}))


def make_archive(root, images: dict[str, tuple[np.ndarray, list[float] | None]]) -> Archive:
    archive = Archive(str(root), create=True)
    rows = []
    for scan_id, (image, spacing) in images.items():
        record = archive.write_array(scan_id, "image", image, {"spacing": spacing} if spacing else {})
        archive.commit(SOURCE, scan_id, "fp", arrays={"image": record})
        rows.append(
            CatalogRow(scan_id, "mri", image.shape, tuple(spacing or (1.0, 1.0, 1.0)), "test", "", "test")
        )
    archive.write_catalog(rows)
    return archive


def run_stage(archive: Archive, tracking, fingerprint: str = "fp-pre", **fields):
    stage = PreprocessStage(kind="preprocess", **fields)
    spec = PipelineSpec.model_validate(
        {"name": "t", "archive": {"path": archive.uri}, "stages": [stage.model_dump(mode="json")]}
    )
    uri, tracker = tracking
    ctx = StageContext(spec, archive, tracker, uri, Console(file=io.StringIO(), width=120))
    return run(ctx, stage, fingerprint)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_output_equals_the_in_memory_reference_and_is_chunk_aligned_and_verified(
    ray_session, tmp_path, tracking
):
    image = volume((20, 24, 18))
    archive = make_archive(
        tmp_path / "a", {"s0": (image, [2.0, 0.8, 1.0]), "s1": (volume((9, 10, 8), 1), None)}
    )
    fields = {"spacing": (1.5, 1.0, 1.2), "clip_percentiles": (1.0, 99.0), "normalize": "zscore",
              "shape": (20, 16, 18), "slab": 4}  # fmt: skip
    result = run_stage(archive, tracking, **fields)
    assert (result.done, result.skipped, result.failed) == (2, 0, {})
    # Per scan: the stage's identity chained with that scan's source commit.
    sources = archive.committed("source")
    assert result.units == {
        "derived/preprocessed": {s: scan_fingerprint("fp-pre", sources[s]) for s in ("s0", "s1")}
    }

    stage = PreprocessStage(kind="preprocess", **fields)
    out = archive.read_array("s0", "derived/preprocessed")  # checksum-verified read
    attrs = archive.open_array("s0", "derived/preprocessed").attrs.asdict()
    # resampled 27 x 19 x 15, then crop D 27 -> 20, crop H 19 -> 16, pad W 15 -> 18
    assert attrs["resampled_shape"] == [27, 19, 15] and out.shape == (20, 16, 18) and out.dtype == np.float32
    np.testing.assert_allclose(attrs["spacing"], [2.0 * 20 / 27, 0.8 * 24 / 19, 1.2])
    assert attrs["producer"] == "preprocess" and attrs["steps"] == [
        "resample",
        "clip",
        "normalize:zscore",
        "crop_pad",
    ]

    resampled = reference(
        image, [2.0, 0.8, 1.0], PreprocessStage(kind="preprocess", spacing=fields["spacing"])
    )
    low, high = attrs["clip"]["values"]
    exact = np.percentile(resampled.astype(np.float64), [1.0, 99.0])
    assert np.all(np.abs(np.array([low, high]) - exact) <= attrs["clip"]["tolerance"] * 1.0001)
    expected = reference(image, [2.0, 0.8, 1.0], stage, (low, high))
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)
    clipped = np.clip(resampled.astype(np.float64), low, high)
    assert attrs["normalize"]["mean"] == pytest.approx(clipped.mean(), rel=1e-6)
    assert attrs["normalize"]["std"] == pytest.approx(clipped.std(), rel=1e-6)

    arr = archive.open_array("s0", "derived/preprocessed")
    assert arr.shards == (4, 16, 18)  # one shard per slab: each write task owns one
    assert archive.commit_record("derived/preprocessed", "s0")["arrays"]["derived/preprocessed"]["slab"] == 4
    metrics = tracking[1].client.get_run(tracking[1].run_id).data.metrics
    assert metrics["preprocess/scans_done"] == 2 and metrics["preprocess/input_mb_per_s"] > 0
    small = archive.read_array("s1", "derived/preprocessed")  # no spacing attribute: 1 mm assumed
    assert small.shape == (20, 16, 18) and not small[:2].any() and not small[-2:].any()  # D padded with zeros


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_the_slab_size_leaves_no_seams(ray_session, tmp_path, tracking):
    image = volume((23, 16, 14), 2)
    archive = make_archive(tmp_path / "a", {"s0": (image, [1.3, 1.0, 1.0])})
    common = {
        "spacing": (1.0, 1.1, 0.9),
        "clip_percentiles": (0.5, 99.5),
        "normalize": "minmax",
        "shape": (28, 12, 16),
    }
    outs = {}
    for slab in (3, 7, 64):
        result = run_stage(archive, tracking, output=f"derived/slab{slab}", slab=slab, **common)
        assert result.done == 1, result.failed
        outs[slab] = archive.read_array("s0", f"derived/slab{slab}")
        assert archive.open_array("s0", f"derived/slab{slab}").shards[0] == min(slab, 28)
    low, high = archive.open_array("s0", "derived/slab3").attrs["clip"]["values"]
    expected = reference(image, [1.3, 1.0, 1.0], PreprocessStage(kind="preprocess", **common), (low, high))
    for slab, out in outs.items():
        np.testing.assert_allclose(out, outs[3], rtol=0, atol=1e-6, err_msg=f"slab {slab}")
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5, err_msg=f"slab {slab}")


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_rerun_skips_committed_scans_and_bad_scans_are_quarantined(ray_session, tmp_path, tracking):
    images = {
        name: (volume((12, 10, 10), i), [1.0, 1.0, 1.0])
        for i, name in enumerate(["a", "missing", "corrupt", "b"])
    }
    archive = make_archive(tmp_path / "a", images)
    archive.delete_array("missing", "image")  # committed, then lost
    zarr.open_array(str(tmp_path / "a" / "scans" / "corrupt" / "image"), mode="r+")[3:5] = 0.0  # altered
    fields = {"clip_percentiles": (1.0, 99.0), "normalize": "zscore", "slab": 4}

    first = run_stage(archive, tracking, **fields)
    assert (first.done, first.skipped) == (2, 0)
    assert set(first.failed) == {"missing", "corrupt"}
    assert "array 'image' not found" in first.failed["missing"]
    assert (
        first.failed["corrupt"].startswith("IntegrityError: scans/corrupt/image")
        and "RayTaskError" not in first.failed["corrupt"]
    )
    quarantined = archive.quarantined("derived/preprocessed")
    assert set(quarantined) == {"missing", "corrupt"}
    assert not archive.has_array("corrupt", "derived/preprocessed")  # the half-written output is removed
    assert set(archive.committed("derived/preprocessed")) == {"a", "b"}
    before = archive.read_array("a", "derived/preprocessed")
    np.testing.assert_allclose(before.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(before.std(), 1.0, atol=1e-5)

    second = run_stage(archive, tracking, **fields)
    assert (second.done, second.skipped, set(second.failed)) == (0, 2, {"missing", "corrupt"})
    np.testing.assert_array_equal(archive.read_array("a", "derived/preprocessed"), before)
    with pytest.raises(IntegrityError):
        archive.read_array("corrupt", "image")
