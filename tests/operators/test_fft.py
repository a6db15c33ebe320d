"""Centred FFTs: the chequerboard identity against numpy's fftshift reference, blocks, autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import operators.fft as fft_module
from operators.errors import ParameterError, ShapeError
from operators.fft import fftc, ifftc, is_even, modulated_fft, modulations
from operators.mri import FFTc
from tests.operators.contract import check_linear_operator

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/operators/conftest.py


def _numpy_fftc(x: np.ndarray, ndim: int, inverse: bool = False) -> np.ndarray:
    axes = tuple(range(-ndim, 0))
    fn = np.fft.ifftn if inverse else np.fft.fftn
    return np.fft.fftshift(fn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


def _random(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.complex128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


sizes = st.integers(min_value=1, max_value=12)
even_sizes = st.integers(min_value=1, max_value=8).map(lambda n: 2 * n)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(sizes, min_size=2, max_size=4), ndim=st.sampled_from([2, 3]), seed=st.integers(0, 2**16)
)
def test_fftc_matches_numpy_fftshift_reference(shape: list[int], ndim: int, seed: int) -> None:
    ndim = min(ndim, len(shape))
    x = _random(tuple(shape), seed)
    expected = _numpy_fftc(x.numpy(), ndim)
    np.testing.assert_allclose(fftc(x, ndim).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(ifftc(x, ndim).numpy(), _numpy_fftc(x.numpy(), ndim, inverse=True), atol=1e-12)


@pytest.mark.parametrize(
    "shape", [(4, 4), (6, 6), (2, 10), (6, 8), (8, 12), (2, 2, 2), (6, 10, 14), (4, 6, 8)]
)
def test_chequerboard_identity_and_global_sign(shape: tuple[int, ...]) -> None:
    """Fc = s·D F D with D = (-1)^(Σn) and s = Π (-1)^(N/2): s = -1 iff an odd number of sizes are 2 mod 4."""
    ndim = len(shape)
    d, sd = modulations(shape, torch.float64)
    n = np.indices(shape).sum(axis=0)
    np.testing.assert_array_equal(d.numpy(), (-1.0) ** n)
    sign = (-1) ** sum(s // 2 for s in shape)
    assert sign == (-1 if sum(s % 4 == 2 for s in shape) % 2 else 1)
    np.testing.assert_array_equal(sd.numpy(), sign * d.numpy())
    x = _random(shape, 0)
    by_identity = sign * d.numpy() * np.fft.fftn(d.numpy() * x.numpy(), norm="ortho")
    np.testing.assert_allclose(by_identity, _numpy_fftc(x.numpy(), ndim), atol=1e-12)


def test_modulations_are_cached_per_shape_dtype_device() -> None:
    a = modulations((8, 8), torch.complex64)
    assert modulations((8, 8), torch.complex64)[0] is a[0]
    assert modulations((8, 8), torch.complex128)[0].dtype == torch.complex128
    assert modulations((8, 10), torch.complex64)[0].shape == (8, 10)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("shape,ndim", [((3, 8, 10), 2), ((5, 7), 2), ((2, 4, 6, 8), 3), ((3, 5, 6), 3)])
def test_ifftc_inverts_fftc_and_is_unitary(shape: tuple[int, ...], ndim: int, dtype: torch.dtype) -> None:
    x = _random(shape, 1, dtype)
    k = fftc(x, ndim)
    assert k.dtype == dtype and k.shape == x.shape
    tol = 1e-5 if dtype == torch.complex64 else 1e-12
    torch.testing.assert_close(ifftc(k, ndim), x, atol=tol, rtol=tol)
    norms = torch.linalg.vector_norm(k), torch.linalg.vector_norm(x)
    torch.testing.assert_close(*norms, atol=tol * 10, rtol=tol)


def test_real_input_is_promoted() -> None:
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(fftc(x), fftc(x.to(torch.complex64)))


def test_blocked_path_equals_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks (no autograd) and the plain differentiable path compute the same numbers."""
    x = _random((3, 4, 8, 10), 2)
    pre = _random((8, 10), 3).real
    post_batched = _random((4, 8, 10), 4)  # complex, with a batch dimension
    x.requires_grad_(True)  # autograd takes the plain path
    plain = [modulated_fft(x, pre, post_batched, 2, inverse=inv).detach() for inv in (False, True)]
    x = x.detach()
    for block in (1, 80, 160, 10**9):
        monkeypatch.setattr(fft_module, "BLOCK_ELEMENTS", block)
        for inv, ref in zip((False, True), plain, strict=True):
            got = modulated_fft(x, pre, post_batched, 2, inverse=inv)
            torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(fftc(x), torch.from_numpy(_numpy_fftc(x.numpy(), 2)), atol=1e-12, rtol=0)


def test_batch_blocks_tile_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fft_module, "BLOCK_ELEMENTS", 3 * 10)
    seen = np.zeros((2, 7), dtype=int)
    for idx in fft_module.batch_blocks((2, 7), 10):
        seen[idx] += 1
    assert (seen == 1).all()
    assert list(fft_module.batch_blocks((), 10)) == [()]


@pytest.mark.parametrize("shape", [(4, 6), (5, 6), (2, 4, 6)])
def test_fftc_is_differentiable(shape: tuple[int, ...]) -> None:
    x = _random(shape, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fftc(t, 2), (x,))
    assert torch.autograd.gradcheck(lambda t: ifftc(t, 2), (x,))


def test_errors_name_the_problem() -> None:
    with pytest.raises(ParameterError, match=r"ndim must be a positive int.*found 0"):
        fftc(torch.zeros(4, 4, dtype=torch.complex64), 0)
    with pytest.raises(ShapeError, match=r"at least ndim=3 dimensions to transform; found shape \(4, 4\)"):
        fftc(torch.zeros(4, 4, dtype=torch.complex64), 3)
    with pytest.raises(ShapeError, match=r"must be even.*found \(4, 5\)"):
        modulations((4, 5))


def test_is_even() -> None:
    assert is_even((2, 4)) and not is_even((2, 3))


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(sizes, min_size=2, max_size=3), ndim=st.sampled_from([2, 3]))
def test_fftc_operator_contract(shape: list[int], ndim: int) -> None:
    ndim = min(ndim, len(shape))
    check_linear_operator(FFTc(tuple(shape), ndim).to(dtype=torch.float64), tol=1e-5)


@pytest.mark.parametrize("block", [1, 80, 10**9])
def test_fft_filter_blocked_matches_reference(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fft_module, "BLOCK_ELEMENTS", block)
    x = _random((3, 4, 8, 10), 6)
    for weight in (_random((8, 10), 7).real, _random((4, 8, 10), 8)):
        expected = np.fft.ifft2(weight.numpy() * np.fft.fft2(x.numpy(), norm="ortho"), norm="ortho")
        np.testing.assert_allclose(fft_module.fft_filter(x, weight, 2).numpy(), expected, atol=1e-12)
