"""Cartesian MRI operators: the contract at random sizes, references, batches, errors, coil maps."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import operators.fft as fft_module
from operators.errors import DTypeError, ShapeError
from operators.linear import LinearOperator
from operators.masks import make_mask
from operators.mri import SENSE, CartesianMRI, CoilExpand, FFTc, Mask, birdcage_maps, sense
from tests.operators.contract import adjoint_error, check_linear_operator

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/operators/conftest.py


def _mask(shape: tuple[int, ...], seed: int, p: float = 0.5) -> torch.Tensor:
    """A random mask with its centre sampled (an all-zero mask makes a zero operator, whose norm is 0)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < p
    mask[(..., *(n // 2 for n in shape))] = True
    return mask


def _image(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.complex128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def _numpy_fftc(x: np.ndarray, ndim: int) -> np.ndarray:
    axes = tuple(range(-ndim, 0))
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


size = st.integers(min_value=1, max_value=9)
spatial_2d = st.tuples(size, size)
spatial_3d = st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6))


# -- the contract at random sizes ---------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    shape=st.one_of(spatial_2d.map(lambda s: (s, 2)), spatial_3d.map(lambda s: (s, 3))),
    seed=st.integers(0, 999),
)
def test_cartesian_contract(shape: tuple[tuple[int, ...], int], seed: int) -> None:
    spatial, ndim = shape
    op = CartesianMRI(_mask(spatial, seed), ndim).to(dtype=torch.float64)
    check_linear_operator(op, seed=seed, tol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.one_of(spatial_2d.map(lambda s: (s, 2)), spatial_3d.map(lambda s: (s, 3))),
    coils=st.integers(1, 4),
    seed=st.integers(0, 999),
)
def test_sense_and_its_parts_contract(shape: tuple[tuple[int, ...], int], coils: int, seed: int) -> None:
    spatial, ndim = shape
    mask, maps = _mask(spatial, seed), birdcage_maps(spatial, coils)
    op = sense(mask, maps, ndim).to(dtype=torch.float64)
    check_linear_operator(op, seed=seed, tol=1e-5)
    for part in op.parts:
        check_linear_operator(part, seed=seed, tol=1e-5)
    composed = op.parts[0] @ op.parts[1] @ op.parts[2]
    check_linear_operator(composed, seed=seed, tol=1e-5)


@pytest.mark.parametrize("spatial", [(8, 10), (7, 9), (6, 5)])
def test_composed_and_scaled_mri_operators(spatial: tuple[int, int]) -> None:
    A = CartesianMRI(_mask(spatial, 0)).to(dtype=torch.float64)
    check_linear_operator(2.5 * A.H @ A, tol=1e-5)
    check_linear_operator(A.H, tol=1e-5)
    check_linear_operator(FFTc(spatial).H @ Mask(_mask(spatial, 1)) @ FFTc(spatial), tol=1e-5)


def test_volume_mri_3d_and_per_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    vol = (4, 6, 8)
    mask = _mask(vol, 3)
    x = _image(vol, 4)
    y3 = CartesianMRI(mask, ndim=3).to(dtype=torch.float64).forward(x)
    np.testing.assert_allclose(y3.numpy(), mask.numpy() * _numpy_fftc(x.numpy(), 3), atol=1e-12)
    y2 = CartesianMRI(mask[0], ndim=2).to(dtype=torch.float64).forward(x)  # D slices, one mask
    np.testing.assert_allclose(y2.numpy(), mask[0].numpy() * _numpy_fftc(x.numpy(), 2), atol=1e-12)


# -- references and fast paths ------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(16, 16), (10, 14), (9, 12)])
@pytest.mark.parametrize("block", [1 << 30, 64])  # one block, and the blocked loop over coils
@pytest.mark.parametrize("conj_cache", [64 << 20, 0])  # conj(S) materialised, and the lazy view
def test_fused_sense_matches_the_composition_and_numpy(
    spatial: tuple[int, int], block: int, conj_cache: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from operators import fft as fft_module
    from operators import mri as mri_module

    monkeypatch.setattr(fft_module, "BLOCK_ELEMENTS", block)
    monkeypatch.setattr(mri_module, "SENSE_CONJ_CACHE_BYTES", conj_cache)
    masks = torch.stack([make_mask("random_1d", spatial, 3, 0.1, seed=s) for s in range(2)])  # (2, H, W)
    maps = birdcage_maps(spatial, 3, dtype=torch.complex128)  # (C, H, W)
    E = sense(masks, maps).to(dtype=torch.float64)
    x = _image((2, *spatial), 5)  # (2, H, W), one mask per sample
    y = E.forward(x)  # (2, C, H, W)
    expected = masks.numpy()[:, None] * _numpy_fftc(maps.numpy()[None] * x.numpy()[:, None], 2)
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-12)
    composed = E.op  # Mask @ FFTc @ CoilExpand, the unfused reference
    np.testing.assert_allclose(E.adjoint(y).numpy(), composed.adjoint(y).numpy(), atol=1e-12)
    np.testing.assert_allclose(E.forward(x).numpy(), composed.forward(x).numpy(), atol=1e-12)
    np.testing.assert_allclose(E.normal(x).numpy(), composed.adjoint(composed.forward(x)).numpy(), atol=1e-12)
    assert (E._maps_conj is None) == (conj_cache == 0)


@pytest.mark.parametrize("spatial", [(16, 16), (10, 14), (9, 12), (7, 7)])
def test_cartesian_forward_matches_numpy_reference(spatial: tuple[int, int]) -> None:
    mask = make_mask("random_1d", spatial, 3, 0.1, seed=0)
    x = _image((3, *spatial), 1)
    A = CartesianMRI(mask).to(dtype=torch.float64)
    expected = mask.numpy() * _numpy_fftc(x.numpy(), 2)
    np.testing.assert_allclose(A.forward(x).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(A.pseudo_inverse(A.forward(x)).numpy(), A.adjoint(A.forward(x)).numpy())


@pytest.mark.parametrize("block", [1, 100, 10**9])
def test_blocked_and_autograd_paths_agree(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fft_module, "BLOCK_ELEMENTS", block)
    mask, maps = _mask((3, 8, 10), 0), birdcage_maps((8, 10), 3)
    x = _image((3, 8, 10), 1)
    for op in (CartesianMRI(mask), CartesianMRI(mask[0]), sense(mask, maps)):
        op = op.to(dtype=torch.float64)
        y = op.forward(x)
        with torch.no_grad():
            torch.testing.assert_close(op.forward(x), y)
        grad_path = op.forward(x.clone().requires_grad_(True)).detach()
        torch.testing.assert_close(grad_path, y, atol=1e-12, rtol=0)
        torch.testing.assert_close(op.normal(x), op.adjoint(y), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64(dtype: torch.dtype) -> None:
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    mask, maps = _mask((12, 16), 0), birdcage_maps((12, 16), 4)
    x = _image((2, 12, 16), 1, cdtype)
    for op in (CartesianMRI(mask).to(dtype=dtype), sense(mask, maps).to(dtype=dtype)):
        y = op.forward(x)
        assert y.dtype == cdtype and op.adjoint(y).dtype == cdtype and op.normal(x).dtype == cdtype
        assert adjoint_error(op, dtype=dtype) < (1e-5 if dtype == torch.float32 else 1e-12)
    real = torch.randn(12, 16, dtype=dtype)
    assert CartesianMRI(mask).to(dtype=dtype).forward(real).dtype == cdtype  # real images are promoted


def test_gradients_reach_the_input() -> None:
    x = _image((2, 8, 8), 0, torch.complex64).requires_grad_(True)
    op = sense(_mask((8, 8), 1), birdcage_maps((8, 8), 2))
    (op.forward(x).abs() ** 2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# -- batches ------------------------------------------------------------------------------------------
def test_batched_masks_act_per_sample() -> None:
    masks = _mask((3, 8, 12), 5)
    x = _image((3, 8, 12), 6)
    A = CartesianMRI(masks).to(dtype=torch.float64)
    y = A.forward(x)
    for b in range(3):
        single = CartesianMRI(masks[b]).to(dtype=torch.float64)
        torch.testing.assert_close(y[b], single.forward(x[b]))
        torch.testing.assert_close(A.adjoint(y)[b], single.adjoint(y[b]))
    assert adjoint_error(A, batch=(3,)) < 1e-12
    E = sense(masks, birdcage_maps((8, 12), 2)).to(dtype=torch.float64)
    assert E.forward(x).shape == (3, 2, 8, 12)
    assert adjoint_error(E, batch=(3,)) < 1e-12
    torch.testing.assert_close(E.normal(x), E.adjoint(E.forward(x)))


def test_sense_volume_layouts() -> None:
    maps3 = birdcage_maps((4, 8, 8), 3)
    mask = _mask((4, 8, 8), 0)
    x = _image((4, 8, 8), 1, torch.complex64)
    assert sense(mask, maps3, ndim=3).forward(x).shape == (3, 4, 8, 8)  # (C, D, H, W)
    per_slice = sense(mask[0], birdcage_maps((8, 8), 3), ndim=2).forward(x)
    assert per_slice.shape == (4, 3, 8, 8)  # (D, C, H, W): D slices, each (C, H, W)


def test_fully_sampled_sense_with_normalised_maps_is_an_isometry() -> None:
    x = _image((10, 12), 2)
    E = sense(torch.ones(10, 12), birdcage_maps((10, 12), 5)).to(dtype=torch.float64)
    torch.testing.assert_close(E.pseudo_inverse(E.forward(x)), x)


# -- immutability, with_mask, pickle ------------------------------------------------------------------
def test_with_mask_builds_a_new_operator() -> None:
    a, b = _mask((8, 8), 0), _mask((8, 8), 1)
    A = CartesianMRI(a)
    B = A.with_mask(b)
    assert isinstance(B, CartesianMRI) and B is not A and torch.equal(A.mask, a.float())
    assert torch.equal(B.mask, b.float())
    with pytest.raises(AttributeError, match="immutable"):
        A.mask = b  # type: ignore[misc]
    maps = birdcage_maps((8, 8), 2)
    E = sense(a, maps)
    F = E.with_mask(b)
    assert isinstance(F, SENSE) and torch.equal(F.mask, b.float()) and torch.equal(F.coil_maps, maps)
    assert torch.equal(E.mask, a.float())


def test_operators_pickle() -> None:
    for op in (CartesianMRI(_mask((6, 8), 0)), sense(_mask((6, 8), 0), birdcage_maps((6, 8), 2))):
        x = _image((6, 8), 0, torch.complex64)
        clone = pickle.loads(pickle.dumps(op))
        torch.testing.assert_close(clone.forward(x), op.forward(x))


# -- errors -------------------------------------------------------------------------------------------
def test_shape_errors_name_the_shapes() -> None:
    A = CartesianMRI(_mask((8, 10), 0))
    with pytest.raises(ShapeError, match=r"trailing shape \(8, 10\).*found shape \(8, 12\)"):
        A.forward(torch.zeros(8, 12, dtype=torch.complex64))
    with pytest.raises(ShapeError, match=r"with_mask: mask of shape \(8, 12\) must end with .*\(8, 10\)"):
        A.with_mask(_mask((8, 12), 0))
    batched = CartesianMRI(_mask((3, 8, 10), 0))
    with pytest.raises(
        ShapeError, match=r"mask of shape \(3, 8, 10\) does not broadcast .* shape \(2, 8, 10\)"
    ):
        batched.forward(torch.zeros(2, 8, 10, dtype=torch.complex64))
    with pytest.raises(ShapeError, match=r"SENSE: mask of shape \(8, 12\) must end with .*\(8, 10\)"):
        sense(_mask((8, 12), 0), birdcage_maps((8, 10), 2))
    with pytest.raises(
        ShapeError, match=r"coil_maps must have shape \(C, \*spatial\).*found shape \(8, 10\)"
    ):
        CoilExpand(torch.ones(8, 10, dtype=torch.complex64))
    with pytest.raises(
        ShapeError, match=r"Mask: mask of shape \(3, 8\) does not broadcast to the data shape \(2, 8\)"
    ):
        Mask(torch.ones(3, 8), shape=(2, 8))


def test_dtype_errors() -> None:
    with pytest.raises(DTypeError, match=r"mask must be real .*found torch.complex64"):
        CartesianMRI(torch.ones(4, 4, dtype=torch.complex64))
    with pytest.raises(DTypeError, match=r"must be float32/64 or complex64/128; found torch.int64"):
        CartesianMRI(torch.ones(4, 4)).forward(torch.ones(4, 4, dtype=torch.int64))


# -- coil maps ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,coils", [((32, 40), 8), ((17, 16), 3), ((6, 12, 12), 4), ((8, 8), 1)])
def test_birdcage_maps_are_normalised_smooth_and_deterministic(shape: tuple[int, ...], coils: int) -> None:
    maps = birdcage_maps(shape, coils)
    assert maps.shape == (coils, *shape) and maps.dtype == torch.complex64
    sos = (maps.abs() ** 2).sum(0)
    torch.testing.assert_close(sos, torch.ones(shape), atol=1e-5, rtol=0)
    assert torch.equal(maps, birdcage_maps(shape, coils))
    # A smooth function sampled on the grid: at twice the resolution the even voxels keep their
    # values (for even sizes, the grids nest) and neighbouring differences about halve.
    fine = birdcage_maps(tuple(2 * n for n in shape), coils, dtype=torch.complex128)
    coarse = birdcage_maps(shape, coils, dtype=torch.complex128)
    if all(n % 2 == 0 for n in shape):
        torch.testing.assert_close(fine[(..., *([slice(None, None, 2)] * len(shape)))], coarse)
    for axis in range(1, coarse.ndim):
        if coarse.shape[axis] > 2:
            step_fine = torch.diff(fine, dim=axis).abs().max()
            assert step_fine < 0.75 * torch.diff(coarse, dim=axis).abs().max()


def test_birdcage_magnitude_falls_with_distance_from_its_coil() -> None:
    maps = birdcage_maps((64, 64), 4).abs()
    # Coil 0 sits at angle 0, i.e. beyond the right edge (large W index).
    assert maps[0, 32, -1] > 2 * maps[0, 32, 0]
    assert maps[1, -1, 32] > 2 * maps[1, 0, 32]  # coil 1 at 90°: beyond the bottom edge (large H)


def test_sense_operator_is_a_linear_operator() -> None:
    op = sense(_mask((4, 4), 0), birdcage_maps((4, 4), 2))
    assert isinstance(op, LinearOperator) and op.in_shape == (4, 4) and op.out_shape == (2, 4, 4)
