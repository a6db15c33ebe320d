"""Downsample and bicubic up-sampling: the operator contract, exact values, the pseudo-inverse, errors."""

import pytest
import torch
from torch.nn import functional as F

from operators.errors import DTypeError, ParameterError, ShapeError
from operators.resolution import Downsample, bicubic_upsample
from tests.operators.contract import check_linear_operator

F64 = torch.float64


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _dense(op: Downsample) -> torch.Tensor:
    """The matrix of ``op`` ``(h w, H W)``, column by column."""
    n = op.in_shape[0] * op.in_shape[1]
    basis = torch.eye(n, dtype=F64).reshape(n, *op.in_shape)  # (H W, H, W)
    return op(basis).reshape(n, -1).T  # (h w, H W)


# -- the operator contract -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, factor", [((6, 8), 2), ((9, 12), 3), ((16, 8), 4), ((5, 7), 1), ((10, 15), 5)]
)
def test_contract(shape, factor, one_thread):
    check_linear_operator(Downsample(shape, factor))


def test_shapes_and_batch():
    op = Downsample((12, 18), 3)
    assert (op.in_shape, op.out_shape, op.factor) == ((12, 18), (4, 6), 3)
    x = _randn(2, 5, 12, 18)
    y = op(x)
    assert y.shape == (2, 5, 4, 6) and y.dtype == F64
    assert op.adjoint(y).shape == x.shape and op.pseudo_inverse(y).shape == x.shape
    assert torch.equal(op(x)[1, 3], op(x[1, 3]))  # leading dimensions are batch
    assert op(x.float()).dtype == torch.float32


# -- exact values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_forward_is_block_mean(factor):
    x = _randn(3, 8 * factor, 4 * factor, seed=factor)
    expected = F.avg_pool2d(x[:, None], factor)[:, 0]  # the reference: torch's average pooling
    assert torch.allclose(Downsample(x.shape[-2:], factor)(x), expected, atol=1e-14)


def test_adjoint_replicates_over_f_squared():
    op = Downsample((4, 6), 2)
    y = torch.arange(6, dtype=F64).reshape(2, 3)
    expected = torch.tensor(
        [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]], dtype=F64
    )
    assert torch.equal(op.adjoint(y), expected / 4)
    assert torch.equal(op.pseudo_inverse(y), expected)


def test_pseudo_inverse_is_the_minimum_norm_least_squares_solution():
    op = Downsample((6, 9), 3)
    y = _randn(2, 3, seed=1)
    a = _dense(op)  # (6, 54)
    expected = (torch.linalg.pinv(a) @ y.reshape(-1)).reshape(6, 9)
    assert torch.allclose(op.pseudo_inverse(y), expected, atol=1e-12)
    assert torch.allclose(op(op.pseudo_inverse(y)), y, atol=1e-14)  # A A⁺ = I
    assert torch.allclose(a @ a.T, torch.eye(6, dtype=F64) / 9)  # A Aᴴ = I / f²


@pytest.mark.parametrize("factor", [2, 4])
def test_norm_is_one_over_factor(factor):
    assert Downsample((8, 8), factor).norm(n_iter=10) == pytest.approx(1 / factor, rel=1e-6)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 8), (8, 9), (33, 31)])
def test_indivisible_shape_names_shape_and_factor(shape):
    with pytest.raises(ShapeError, match=rf"{shape[0]}, {shape[1]}.*factor 2"):
        Downsample(shape, 2)


@pytest.mark.parametrize("factor", [0, -2, 2.0, True, "2"])
def test_bad_factor(factor):
    with pytest.raises(ParameterError, match="factor"):
        Downsample((8, 8), factor)


def test_bad_image_shape_and_inputs():
    with pytest.raises(ShapeError, match="two positive sizes"):
        Downsample((8, 8, 8), 2)
    op = Downsample((8, 8), 2)
    with pytest.raises(ShapeError, match=r"\(8, 8\).*\(3, 8, 6\)"):
        op(torch.zeros(3, 8, 6))
    with pytest.raises(ShapeError, match=r"\(4, 4\)"):
        op.pseudo_inverse(torch.zeros(8, 8))
    with pytest.raises(DTypeError, match="real"):
        op(torch.zeros(8, 8, dtype=torch.complex64))
    with pytest.raises(AttributeError, match="immutable"):
        op.factor = 4


# -- bicubic ---------------------------------------------------------------------------------------
def test_bicubic_shapes_and_dtype():
    y = _randn(2, 3, 7, 5)
    assert bicubic_upsample(y, 2).shape == (2, 3, 14, 10)
    assert bicubic_upsample(y[0, 0], 4).shape == (28, 20)
    assert bicubic_upsample(y, 2).dtype == F64 and bicubic_upsample(y.float(), 3).dtype == torch.float32


def test_bicubic_keeps_constants_and_is_centred():
    assert torch.allclose(
        bicubic_upsample(torch.full((5, 6), 0.7, dtype=F64), 3), torch.tensor(0.7, dtype=F64)
    )
    y = _randn(6, 7, seed=2)
    up = bicubic_upsample(y, 3)
    # Low-res pixel (i, j) sits at the centre (3i + 1, 3j + 1) of its block, and the kernel interpolates.
    assert torch.allclose(up[1::3, 1::3], y, atol=1e-12)
    # Centred: mirroring commutes with up-sampling, at even factors too.
    assert torch.allclose(bicubic_upsample(y.flip(-1), 2), bicubic_upsample(y, 2).flip(-1), atol=1e-12)


def test_bicubic_beats_nearest_on_a_smooth_image():
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, 64, dtype=F64), torch.linspace(-1, 1, 64, dtype=F64), indexing="ij"
    )
    x = torch.exp(-4 * (xx**2 + yy**2))
    op = Downsample((64, 64), 4)
    err = {name: float((up - x).square().mean()) for name, up in
           (("bicubic", bicubic_upsample(op(x), 4)), ("nearest", op.pseudo_inverse(op(x))))}  # fmt: skip
    assert err["bicubic"] < 0.5 * err["nearest"]


def test_bicubic_errors():
    with pytest.raises(DTypeError, match="real"):
        bicubic_upsample(torch.zeros(4, 4, dtype=torch.complex64), 2)
    with pytest.raises(DTypeError, match="real"):
        bicubic_upsample(torch.zeros(4, 4, dtype=torch.int64), 2)
    with pytest.raises(ShapeError, match=r"\(4,\)"):
        bicubic_upsample(torch.zeros(4), 2)
    with pytest.raises(ParameterError, match="factor"):
        bicubic_upsample(torch.zeros(4, 4), 0)
