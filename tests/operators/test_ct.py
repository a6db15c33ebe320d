"""CT operators: the operator contract, scikit-image agreement, FBP quality, geometry invariance, errors."""

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

from operators.ct import (
    FanBeam,
    ParallelBeam,
    _MatrixCache,
    clear_matrix_cache,
    fbp,
    fbp_filter,
    sparse_view_angles,
)
from operators.errors import ParameterError, ShapeError
from operators.linear import Diagonal
from operators.metrics import psnr
from tests.operators.contract import check_linear_operator

F64 = torch.float64


def _angles(n: int, seed: int, arc: float = math.pi) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=F64) * arc


def _disc(n: int) -> np.ndarray:
    """Boolean mask of skimage's reconstruction circle: distance to (n//2, n//2) at most n//2."""
    yy, xx = np.mgrid[:n, :n] - n // 2
    return xx**2 + yy**2 <= (n // 2) ** 2


@pytest.fixture(scope="module")
def phantom256() -> np.ndarray:
    """skimage's Shepp-Logan (400²) resized to 256², float64, zero outside the reconstruction circle."""
    img = resize(shepp_logan_phantom(), (256, 256), anti_aliasing=True)
    return img * _disc(256)


@pytest.fixture(scope="module")
def parallel256() -> ParallelBeam:
    return ParallelBeam((256, 256), sparse_view_angles(180))


# -- the operator contract -------------------------------------------------------------------------
@settings(deadline=None, max_examples=12)
@given(
    h=st.integers(8, 24),
    w=st.integers(8, 24),
    n_angles=st.integers(1, 12),
    n_det=st.one_of(st.none(), st.integers(5, 34)),
    spacing=st.sampled_from([0.5, 1.0, 1.7]),
    seed=st.integers(0, 2**16),
)
def test_parallel_beam_passes_contract(h, w, n_angles, n_det, spacing, seed):
    op = ParallelBeam((h, w), _angles(n_angles, seed, 2 * math.pi), n_det, spacing)
    check_linear_operator(op.to(dtype=F64), seed=seed)


@settings(deadline=None, max_examples=12)
@given(
    size=st.integers(8, 24),
    n_angles=st.integers(1, 12),
    n_det=st.integers(5, 40),
    source=st.floats(1.0, 4.0),
    detector=st.floats(0.1, 3.0),
    spacing=st.sampled_from([0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_fan_beam_passes_contract(size, n_angles, n_det, source, detector, spacing, seed):
    h, w = size, size + seed % 3  # odd and non-square sizes too
    op = FanBeam(
        (h, w), _angles(n_angles, seed, 2 * math.pi), n_det, source * max(h, w), detector * max(h, w), spacing
    )
    check_linear_operator(op.to(dtype=F64), seed=seed)


def test_sparse_view_subsets_pass_contract():
    par = ParallelBeam((17, 17), sparse_view_angles(24))
    fan = FanBeam((16, 19), sparse_view_angles(24, arc=2 * math.pi), 31, 40.0, 20.0, 1.0)
    for op in (par, fan):
        sub = op.with_angles(op.angles[::5])
        assert sub.out_shape == (5, op.n_detectors) and type(sub) is type(op)
        check_linear_operator(sub)
        x = torch.rand(op.in_shape, dtype=F64)
        torch.testing.assert_close(sub(x), op(x)[::5])


# -- agreement with scikit-image -------------------------------------------------------------------
def test_parallel_beam_matches_skimage_radon(phantom256, parallel256):
    """The full sinogram (180 x 256) against radon(circle=True).T: relative L2 error < 2%."""
    ours = parallel256(torch.from_numpy(phantom256)).numpy()
    ref = radon(phantom256, theta=np.rad2deg(parallel256.angles.numpy()), circle=True).T
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 0.02


def test_odd_size_matches_skimage_radon():
    """Odd image and detector sizes keep the same centre (n // 2) and detector order."""
    n = 45
    img = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True) * _disc(n)
    op = ParallelBeam((n, n), _angles(13, seed=5))
    ref = radon(img, theta=np.rad2deg(op.angles.numpy()), circle=True).T
    ours = op(torch.from_numpy(img)).numpy()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 0.02


def test_fbp_is_at_least_as_good_as_iradon(phantom256, parallel256):
    """On radon()'s own sinogram of 180 views: PSNR inside the circle, data range of the phantom."""
    sino = radon(phantom256, theta=np.rad2deg(parallel256.angles.numpy()), circle=True)  # (256, 180)
    ours = fbp(torch.from_numpy(sino.T.copy()), parallel256).numpy()
    ref = iradon(sino, theta=np.rad2deg(parallel256.angles.numpy()), filter_name="ramp", circle=True)
    disc, dr = _disc(256), float(phantom256.max() - phantom256.min())
    ours_db = psnr(ours[disc], phantom256[disc], data_range=dr)
    ref_db = psnr(ref[disc], phantom256[disc], data_range=dr)
    assert ours_db >= ref_db > 25.0


def test_fbp_filters_and_pseudo_inverse(phantom256, parallel256):
    sino = parallel256(torch.from_numpy(phantom256))
    torch.testing.assert_close(parallel256.pseudo_inverse(sino), fbp(sino, parallel256, "ramp"))
    disc = _disc(256)
    for name in ("shepp-logan", "cosine", "hann"):
        rec = fbp(sino, parallel256, name, frequency_scaling=0.9).numpy()
        assert psnr(rec[disc], phantom256[disc], data_range=1.0) > 24.0, name


def test_fbp_filter_response():
    """The sampled-in-space ramp: no DC offset to speak of, |f| in cycles per bin elsewhere."""
    ramp = fbp_filter(100)  # n_pad = 256
    f = torch.fft.rfftfreq(256, dtype=F64)
    assert 0 <= ramp[0] < 1e-3
    torch.testing.assert_close(ramp[10:120], f[10:120], atol=2e-3, rtol=0)
    sl = fbp_filter(100, "shepp-logan")
    assert sl[-1] == pytest.approx(ramp[-1] * 2 / math.pi)
    assert fbp_filter(100, "hann")[-1] == pytest.approx(0.0, abs=1e-12)
    half = fbp_filter(100, "cosine", frequency_scaling=0.5)
    assert torch.all(half[f > 0.25] == 0) and torch.all(half[1:64] > 0)


def test_fan_beam_fbp_gives_the_image():
    """Full-turn, 360 views, flat detector: FBP is close to the phantom (not a contract, a sanity bar)."""
    n = 96
    img = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True) * _disc(n)
    op = FanBeam((n, n), sparse_view_angles(360, arc=2 * math.pi), 2 * n, 2.0 * n, 1.0 * n, 1.0)
    rec = fbp(op(torch.from_numpy(img)), op).numpy()
    disc = _disc(n)
    assert psnr(rec[disc], img[disc], data_range=1.0) > 28.0


def test_distant_source_fan_beam_tends_to_parallel_beam():
    angles = _angles(7, seed=2)
    fan = FanBeam((20, 20), angles, 25, 1e7, 1e7, 2.0)  # magnification 2
    par = ParallelBeam((20, 20), angles, 25, 1.0)
    x = torch.rand(20, 20, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fan(x), par(x), atol=1e-4, rtol=1e-4)


# -- geometry ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["parallel", "fan"])
def test_rotating_the_image_shifts_the_angles(kind):
    """rot90 of the image (about the centre pixel; odd size) = the same scan with angles + 90°."""
    n = 21
    angles = _angles(9, seed=7, arc=2 * math.pi)

    def make(a: torch.Tensor):
        if kind == "parallel":
            return ParallelBeam((n, n), a, 27)
        return FanBeam((n, n), a, 35, 30.0, 15.0, 0.8)

    x = torch.rand(n, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    rotated = torch.rot90(x, 1, dims=(0, 1))  # rotated[i, j] = x[j, n - 1 - i]
    torch.testing.assert_close(make(angles + math.pi / 2)(rotated), make(angles)(x), atol=1e-10, rtol=1e-10)


def test_first_angle_integrates_down_the_columns():
    x = torch.zeros(9, 9, dtype=F64)
    x[:, 2] = 1.0  # a bright column, 2 left of centre (column 4)
    p = ParallelBeam((9, 9), torch.tensor([0.0, math.pi / 2]))(x)
    assert p[0].argmax() == 2 and p[0, 2] == pytest.approx(9.0)  # θ = 0: detector k = column
    assert torch.allclose(p[1][1:-1], torch.ones(7, dtype=F64))  # θ = 90°: rays along the rows


# -- batches, dtypes, devices ------------------------------------------------------------------------
def test_batch_equals_per_slice_in_float32_and_float64(device):
    par = ParallelBeam((15, 12), _angles(8, seed=3), 19).to(device)
    fan = FanBeam((15, 12), _angles(8, seed=4, arc=2 * math.pi), 23, 30.0, 10.0)
    for op in (par, fan.to(device)):
        for dtype in (torch.float32, F64):
            x = torch.rand(2, 3, 15, 12, dtype=dtype, device=device)
            y = op(x)
            assert y.shape == (2, 3, *op.out_shape) and y.dtype == dtype and y.device.type == device
            torch.testing.assert_close(y[1, 2], op(x[1, 2]))
            back = op.adjoint(y)
            assert back.shape == x.shape and back.dtype == dtype
            torch.testing.assert_close(back[0, 1], op.adjoint(y[0, 1]))
            rec = fbp(y, op)
            torch.testing.assert_close(rec[1, 0], fbp(y[1, 0], op))
        torch.testing.assert_close(op(x.float()).double(), op(x.double()), rtol=1e-5, atol=1e-4)


def test_operators_are_immutable_and_pickle_small(parallel256):
    with pytest.raises(AttributeError, match="immutable"):
        parallel256.angles = torch.zeros(3)
    parallel256(torch.zeros(256, 256, dtype=F64))  # the matrices exist now, in the cache
    assert len(pickle.dumps(parallel256)) < 10_000  # the geometry, not the 20M-entry matrix
    clear_matrix_cache()
    clone = pickle.loads(pickle.dumps(ParallelBeam((10, 10), sparse_view_angles(4))))
    assert clone(torch.ones(10, 10))[0].sum() == pytest.approx(100.0)  # rebuilt on first use


def test_matrix_cache_evicts_least_recently_used():
    cache = _MatrixCache(max_bytes=2**40, max_entries=2)
    ops = [ParallelBeam((8, 8), sparse_view_angles(k)) for k in (1, 2, 3)]
    first = cache.get(ops[0], F64, torch.device("cpu"))
    cache.get(ops[1], F64, torch.device("cpu"))
    assert cache.get(ops[0], F64, torch.device("cpu"))[0] is first[0]  # hit; ops[1] is now the oldest
    cache.get(ops[2], F64, torch.device("cpu"))
    assert len(cache._items) == 2 and all(k[0] != ops[1]._key for k in cache._items)


def test_sparse_view_angles():
    torch.testing.assert_close(sparse_view_angles(4, arc=2 * math.pi, offset=0.1),
                               0.1 + torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=F64) * math.pi)  # fmt: skip
    with pytest.raises(ParameterError, match="n_views must be a positive.*found 0"):
        sparse_view_angles(0)


# -- errors ------------------------------------------------------------------------------------------
def test_wrong_image_shape_names_expected_and_found():
    op = ParallelBeam((16, 16), sparse_view_angles(3))
    with pytest.raises(ShapeError, match=r"trailing shape \(16, 16\).*found shape \(15, 16\)"):
        op(torch.zeros(15, 16))
    with pytest.raises(
        ShapeError, match=r"sinogram of fbp must have trailing shape \(3, 16\).*found shape \(4, 16\)"
    ):
        fbp(torch.zeros(4, 16), op)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ParallelBeam((8, 8), torch.zeros(0)), "angles must hold at least one.*n_angles == 0"),
        (lambda: ParallelBeam((8, 8), torch.zeros(2, 2)), r"angles must be a 1-D.*found shape \(2, 2\)"),
        (lambda: ParallelBeam((8, 8), torch.zeros(2), 0), "n_detectors must be a positive.*found 0"),
        (
            lambda: ParallelBeam((8, 8), torch.zeros(2), 8, -1.0),
            "detector_spacing must be a positive.*found -1.0",
        ),
        (lambda: ParallelBeam((8,), torch.zeros(2)), r"image_shape must be two positive.*found \(8,\)"),
        (
            lambda: FanBeam((8, 8), torch.zeros(2), 8, 0.0, 5.0),
            "source_distance must be a positive.*found 0.0",
        ),
        (
            lambda: FanBeam((8, 8), torch.zeros(2), 8, 20.0, -5.0),
            "detector_distance must be a positive.*found -5.0",
        ),
        (lambda: FanBeam((8, 8), torch.zeros(2), 8, 5.0, 5.0), r"half-diagonal \(5.7 pixels\).*found 5.0"),
    ],
)
def test_bad_geometry_raises_parameter_error(build, match):
    with pytest.raises(ParameterError, match=match):
        build()


def test_bad_fbp_arguments_raise_parameter_error():
    op = ParallelBeam((8, 8), sparse_view_angles(3))
    y = torch.zeros(3, 8)
    with pytest.raises(ParameterError, match=r"filter must be one of .*found 'hamming'"):
        fbp(y, op, "hamming")  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"frequency_scaling must be in \(0, 1\].*found 1.5"):
        fbp(y, op, frequency_scaling=1.5)
    with pytest.raises(ParameterError, match="op must be a ParallelBeam or FanBeam; found Diagonal"):
        fbp(y, Diagonal(torch.ones(3, 8)))  # type: ignore[arg-type]
