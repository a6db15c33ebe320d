"""Classical reconstruction at any image size: odd sizes, and cs_wavelet's internal padding (Crop)."""

from __future__ import annotations

import pytest
import torch

from operators.ct import ParallelBeam, sparse_view_angles
from operators.errors import ParameterError
from operators.linear import Identity
from operators.masks import random_1d
from operators.metrics import psnr
from operators.mri import CartesianMRI, birdcage_maps, sense
from operators.phantoms import random_ellipsoids
from operators.recon import Crop, reconstruct
from tests.operators.contract import check_linear_operator

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/operators/conftest.py

MRI_METHODS = ("zero_filled", "cg_sense", "cs_tv", "cs_wavelet")
CT_METHODS = ("fbp", "zero_filled", "cg_sense", "cs_tv", "cs_wavelet")


def _slice(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A random-ellipsoid slice ``(H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(random_ellipsoids((1, *shape), seed=seed).image[0])


def _single_coil(shape: tuple[int, int]) -> CartesianMRI:
    return CartesianMRI(random_1d(shape, acceleration=4, center_fraction=0.08, seed=0))


def _padded_shape(method_kwargs: dict, y: torch.Tensor, op) -> tuple[int, ...]:
    """The shape of the iterate cs_wavelet's solver works on (seen by the progress callback)."""
    seen: list[tuple[int, ...]] = []
    reconstruct(
        "cs_wavelet", y, op, max_iter=1, progress=lambda k, s: seen.append(tuple(s.x.shape)), **method_kwargs
    )
    return seen[0]


# -- every method, odd sizes -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(21, 27), (197, 233)])
@pytest.mark.parametrize("method", MRI_METHODS)
def test_every_mri_method_reconstructs_an_odd_sized_single_coil_image(method, shape):
    op = _single_coil(shape)
    y = op.forward(torch.stack([_slice(shape, 0), _slice(shape, 1)]).to(torch.complex64))  # (2, H, W)
    result = reconstruct(method, y, op, max_iter=20)
    assert result.image.shape == (2, *shape) and result.image.dtype == torch.complex64
    assert result.image.is_contiguous() and bool(torch.isfinite(result.image).all())


@pytest.mark.parametrize("shape", [(21, 27), (45, 61)])
@pytest.mark.parametrize("method", CT_METHODS)
def test_every_ct_method_reconstructs_an_odd_sized_slice(method, shape):
    op = ParallelBeam(shape, sparse_view_angles(20))
    y = op.forward(torch.stack([_slice(shape, 0), _slice(shape, 1)]))  # (2, 20, max(H, W))
    result = reconstruct(method, y, op, max_iter=20)
    assert result.image.shape == (2, *shape) and result.image.dtype == torch.float32
    assert bool(torch.isfinite(result.image).all())


def test_cs_wavelet_beats_zero_filled_at_4x_on_an_odd_sized_slice():
    shape = (197, 233)
    truth = _slice(shape, 3)
    op = _single_coil(shape)
    y = op.forward(truth.to(torch.complex64))
    zero_filled = reconstruct("zero_filled", y, op).image
    result = reconstruct("cs_wavelet", y, op)
    gain = psnr(result.image.abs(), truth) - psnr(zero_filled.abs(), truth)
    assert gain >= 5.0, gain


def test_cs_wavelet_on_odd_sized_multi_coil_and_volume_data():
    shape = (21, 27)
    maps = birdcage_maps(shape, 4)
    op = sense(random_1d(shape, acceleration=2, center_fraction=0.1, seed=1), maps)
    y = op.forward(_slice(shape, 4).to(torch.complex64))  # (4, H, W): one unbatched slice
    assert reconstruct("cs_wavelet", y, op, max_iter=10).image.shape == shape
    # A (D, H, W) operator: cs_wavelet transforms each of the D slices.
    volume = CartesianMRI(random_1d((3, *shape), acceleration=2, center_fraction=0.1, seed=2), ndim=3)
    y = volume.forward(torch.ones(2, 3, *shape, dtype=torch.complex64))
    assert reconstruct("cs_wavelet", y, volume, max_iter=5).image.shape == (2, 3, *shape)


def test_an_unbatched_slice_is_reconstructed_like_an_item_of_a_batch():
    shape = (21, 27)
    op = _single_coil(shape)
    y = op.forward(torch.stack([_slice(shape, 0), _slice(shape, 1)]).to(torch.complex64))  # (2, H, W)
    both = reconstruct("cs_wavelet", y, op, max_iter=10, tol=0.0).image
    one = reconstruct("cs_wavelet", y[1], op, max_iter=10, tol=0.0).image
    assert torch.allclose(one, both[1], atol=1e-5 * float(one.abs().max()))


# -- the padding -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "levels", "padded"),
    [
        ((6, 8), None, (6, 8)),  # even: no padding, 1 level, as before
        ((64, 48), None, (64, 48)),
        ((21, 27), None, (32, 32)),  # odd: to multiples of 2^4
        ((5, 6), None, (8, 8)),  # min(H, W) = 5 allows 2 levels: multiples of 4, then 3 levels
        ((21, 27), 2, (24, 28)),
        ((12, 20), 3, (16, 24)),  # even, but not divisible by 2^3
        ((16, 24), 3, (16, 24)),
    ],
)
def test_cs_wavelet_pads_only_when_the_transform_needs_it(shape, levels, padded):
    y = torch.ones(1, *shape)
    assert _padded_shape({"wavelet_levels": levels}, y, Identity(shape)) == (1, *padded)


def test_padding_keeps_the_data_term_exact():
    # Without a penalty the minimiser of ½‖C x - y‖² cropped back is y itself.
    y = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = reconstruct("cs_wavelet", y, Identity((5, 7)), lam=0.0, max_iter=100, tol=0.0)
    assert result.image.shape == (5, 7)
    assert torch.allclose(result.image, y, atol=1e-10)


@pytest.mark.parametrize(
    ("padded_shape", "shape", "complex_data"),
    [((8, 9), (5, 7), False), ((8, 9), (5, 7), True), ((2, 6, 5), (2, 3, 5), True), ((4, 4), (4, 4), False)],
)
def test_crop_passes_the_operator_contract(padded_shape, shape, complex_data):
    check_linear_operator(Crop(padded_shape, shape, complex_data=complex_data))


def test_crop_is_a_coordinate_projection():
    crop = Crop((4, 5), (3, 2))
    x = torch.arange(20.0).reshape(4, 5)
    assert torch.equal(crop.forward(x), x[:3, :2])
    padded = crop.adjoint(torch.ones(2, 3, 2))  # (2, 4, 5): batched
    assert (
        padded.shape == (2, 4, 5) and float(padded.sum()) == 12.0 and float(padded[:, 3:, :].abs().sum()) == 0
    )
    assert crop.norm() == 1.0


# -- errors ----------------------------------------------------------------------------------------
def test_impossible_sizes_and_levels_are_refused_with_the_fix():
    with pytest.raises(ParameterError, match=r"at least 2 x 2 pixels.*found image shape \(1, 9\).*'cs_tv'"):
        reconstruct("cs_wavelet", torch.ones(1, 9), Identity((1, 9)))
    with pytest.raises(
        ParameterError, match=r"wavelet_levels must be an int from 1 to 4.*\(21, 27\).*found 5"
    ):
        reconstruct("cs_wavelet", torch.ones(21, 27), Identity((21, 27)), wavelet_levels=5)
    with pytest.raises(ParameterError, match=r"wavelet_levels must be an int from 1 to 2.*found 0"):
        reconstruct("cs_wavelet", torch.ones(5, 6), Identity((5, 6)), wavelet_levels=0)
    with pytest.raises(ParameterError, match=r"Crop: shape must have as many axes.*\(5, 9\).*\(4, 9\)"):
        Crop((4, 9), (5, 9))
