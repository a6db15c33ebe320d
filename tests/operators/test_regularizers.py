"""Finite differences, orthonormal wavelets, shrinkage and penalties (operators/regularizers.py)."""

import math

import numpy as np
import pytest
import torch

from operators.errors import ParameterError, ShapeError
from operators.linear import LinearOperator
from operators.regularizers import (
    FiniteDifference,
    L1Penalty,
    NoPenalty,
    Wavelet2D,
    WaveletL1,
    group_soft_threshold,
    max_wavelet_levels,
    per_item,
    project_group_ball,
    soft_threshold,
    wavelet_filter,
)
from tests.operators.contract import check_linear_operator

F64, C128 = torch.float64, torch.complex128


def _randn(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- finite differences ----------------------------------------------------------------------------
@pytest.mark.parametrize("complex_data", [False, True])
@pytest.mark.parametrize(("shape", "ndim"), [((9,), None), ((6, 7), None), ((3, 5, 6), 2), ((3, 4, 5), None)])
def test_finite_difference_passes_contract(shape, ndim, complex_data):
    check_linear_operator(FiniteDifference(shape, ndim, complex_data=complex_data))


def test_finite_difference_values_and_negative_divergence():
    D = FiniteDifference((4,))
    assert torch.equal(D.forward(torch.tensor([0.0, 1.0, 3.0, 6.0])), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    # Dᴴ g = -div g with div g[i] = g[i] - g[i-1] (g[-1] = 0) and the last difference dropped.
    g = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    assert torch.equal(D.adjoint(g), torch.tensor([-1.0, -1.0, -1.0, 3.0]))


def test_finite_difference_2d_components_and_layout():
    x = torch.arange(12, dtype=F64).reshape(3, 4)  # x[i, j] = 4 i + j
    g = FiniteDifference((3, 4)).forward(x)
    assert g.shape == (2, 3, 4)
    assert torch.equal(g[0, :2], torch.full((2, 4), 4.0, dtype=F64))  # rows: x[i+1] - x[i] = 4
    assert torch.equal(g[0, 2], torch.zeros(4, dtype=F64))
    assert torch.equal(g[1, :, :3], torch.ones(3, 3, dtype=F64))  # columns: 1
    assert torch.equal(g[1, :, 3], torch.zeros(3, dtype=F64))
    # ndim=2 on a volume differentiates only the last two axes; components come before D.
    vol = _randn(2, 3, 4)
    per_slice = FiniteDifference((3, 4)).forward(vol)  # (D, 2, H, W): D as a batch axis
    assert torch.equal(FiniteDifference((2, 3, 4), ndim=2).forward(vol), per_slice.transpose(0, 1))


def test_finite_difference_norm_is_exact():
    D = FiniteDifference((5, 7))
    power = LinearOperator.norm(D, n_iter=2000)  # the generic power iteration
    assert D.norm() == pytest.approx(power, rel=1e-6)
    assert D.norm() <= math.sqrt(8)


def test_isotropic_tv_of_a_step_and_a_diagonal():
    x = torch.zeros(2, 5, 6, dtype=F64)
    x[0, :, 3:] = 2.0  # a vertical edge of height 2, 5 pixels long
    x[1] = 1.0  # constant: no variation
    assert torch.allclose(FiniteDifference((5, 6)).tv(x), torch.tensor([10.0, 0.0], dtype=F64))
    ramp = torch.arange(4, dtype=F64)[:, None] + torch.arange(4, dtype=F64)[None, :]  # gradient (1, 1)
    # interior pixels have |∇| = sqrt(2); the last row and column have one component only.
    expected = 9 * math.sqrt(2) + 3 + 3
    assert FiniteDifference((4, 4)).tv(ramp).item() == pytest.approx(expected)


def test_complex_tv_is_phase_invariant():
    x = _randn(6, 6)
    D = FiniteDifference((6, 6), complex_data=True)
    assert D.tv(x * complex(math.cos(0.7), math.sin(0.7))).item() == pytest.approx(D.tv(x.to(C128)).item())


def test_finite_difference_rejects_bad_ndim():
    with pytest.raises(ParameterError, match=r"ndim must be between 1 and len\(shape\) = 2.*found ndim=3"):
        FiniteDifference((4, 4), ndim=3)


# -- wavelets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("complex_data", [False, True])
@pytest.mark.parametrize("wavelet", ["haar", "db4"])
@pytest.mark.parametrize(("shape", "levels"), [((16, 16), 3), ((8, 12), 2), ((4, 4), 2), ((32, 8), 3)])
def test_wavelet_passes_contract_and_is_orthonormal(shape, levels, wavelet, complex_data):
    W = Wavelet2D(shape, levels, wavelet, complex_data=complex_data)
    check_linear_operator(W)
    x = _randn(3, *shape, dtype=C128 if complex_data else F64)
    assert torch.allclose((W.H @ W).forward(x), x, atol=1e-12)  # Wᴴ W = I
    assert torch.allclose((W @ W.H).forward(x), x, atol=1e-12)  # W Wᴴ = I (square: W is unitary)
    assert torch.linalg.vector_norm(W.forward(x)).item() == pytest.approx(torch.linalg.vector_norm(x).item())


def test_wavelet_float32_round_trip():
    W = Wavelet2D((16, 16), 2, "db4")
    x = _randn(2, 16, 16).float()
    assert W.forward(x).dtype == torch.float32
    assert torch.allclose(W.adjoint(W.forward(x)), x, atol=1e-5)


@pytest.mark.parametrize("wavelet", ["haar", "db4"])
def test_wavelet_filters_are_orthonormal_daubechies(wavelet):
    filt = wavelet_filter(wavelet).numpy()  # (L, 2): [h, g]
    h, g = filt[:, 0], filt[:, 1]
    taps = len(h)
    assert h.sum() == pytest.approx(math.sqrt(2))
    for k in range(taps // 2):  # orthonormal to even shifts, and h ⊥ g at every even shift
        shifted_h, shifted_g = np.roll(np.pad(h, (0, taps)), 2 * k), np.roll(np.pad(g, (0, taps)), 2 * k)
        assert np.dot(np.pad(h, (0, taps)), shifted_h) == pytest.approx(float(k == 0), abs=1e-12)
        assert np.dot(np.pad(h, (0, taps)), shifted_g) == pytest.approx(0.0, abs=1e-12)
    n = np.arange(taps)
    for p in range(taps // 2):  # Daubechies: taps/2 vanishing moments of the high-pass
        assert np.dot(n**p, g) == pytest.approx(0.0, abs=1e-9 * max(1, taps**p))


def test_wavelet_constant_image_lives_in_the_approximation_band():
    W = Wavelet2D((16, 8), 3, "db4")
    c = W.forward(torch.ones(16, 8, dtype=F64))
    band = c[W.approximation]
    assert band.shape == (2, 1)
    assert torch.allclose(band, torch.full((2, 1), math.sqrt(16 * 8 / 2), dtype=F64))
    rest = c.clone()
    rest[W.approximation] = 0
    assert rest.abs().max() < 1e-12


def test_wavelet_rejects_sizes_not_divisible_by_2_to_the_levels():
    assert max_wavelet_levels((24, 40)) == 3
    with pytest.raises(ParameterError, match=r"divisible by 2\*\*levels.*levels=4 for shape \(24, 40\).*= 3"):
        Wavelet2D((24, 40), 4)
    with pytest.raises(ParameterError, match=r"wavelet must be one of \('haar', 'db4'\); found 'db2'"):
        Wavelet2D((8, 8), 1, "db2")  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match=r"shape must be \(H, W\)"):
        Wavelet2D((8, 8, 8), 1)  # type: ignore[arg-type]


# -- shrinkage -------------------------------------------------------------------------------------
def test_soft_threshold_real_matches_sign_formula():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0], dtype=F64)
    expected = torch.sign(x) * torch.clamp(x.abs() - 1.0, min=0)
    assert torch.equal(soft_threshold(x, 1.0), expected)


def test_soft_threshold_complex_shrinks_magnitude_and_keeps_phase():
    x = _randn(50, dtype=C128) * 3
    t = 1.0
    out = soft_threshold(x, t)
    big = x.abs() > t
    assert torch.allclose(out.abs()[big], x.abs()[big] - t)
    assert torch.allclose(torch.angle(out[big]), torch.angle(x[big]))
    assert torch.equal(out[~big], torch.zeros_like(out[~big]))


def test_soft_threshold_has_finite_gradients_at_zero():
    x = torch.tensor([0.0, 0.0j + 2.0, 0.5j], dtype=C128, requires_grad=True)
    soft_threshold(x, 1.0).abs().sum().backward()
    assert torch.isfinite(torch.view_as_real(x.grad)).all()


def test_soft_threshold_per_item_threshold():
    x = torch.ones(2, 3, dtype=F64)
    t = per_item(torch.tensor([0.25, 2.0], dtype=F64), x, 1)
    assert torch.equal(soft_threshold(x, t), torch.tensor([[0.75] * 3, [0.0] * 3], dtype=F64))
    with pytest.raises(ShapeError, match=r"batch shape \(2,\); found shape \(3,\)"):
        per_item(torch.ones(3), x, 1)


def test_group_shrink_and_projection_on_gradient_vectors():
    # (2 components, 3 pixels) with norms 5, 0, 0.1
    z = torch.tensor([[3.0, 0.0, 0.1], [4.0, 0.0, 0.0]], dtype=F64)
    shrunk = group_soft_threshold(z, 1.0, dim=0)
    assert torch.allclose(shrunk, torch.tensor([[2.4, 0.0, 0.0], [3.2, 0.0, 0.0]], dtype=F64))
    proj = project_group_ball(z, 1.0, dim=0)
    assert torch.allclose(proj, torch.tensor([[0.6, 0.0, 0.1], [0.8, 0.0, 0.0]], dtype=F64))
    # Moreau: x = prox_{t‖·‖}(x) + proj_{ball(t)}(x).
    assert torch.allclose(shrunk + proj, z)
    c = torch.tensor([3 + 4j, 0.5j], dtype=C128)
    assert torch.allclose(project_group_ball(c, 1.0, dim=None), torch.tensor([0.6 + 0.8j, 0.5j], dtype=C128))


# -- penalties -------------------------------------------------------------------------------------
def test_wavelet_l1_prox_is_the_exact_minimiser():
    W = Wavelet2D((8, 8), 2, "haar", complex_data=True)
    pen = WaveletL1(W, 0.3, penalize_approximation=True)
    x = _randn(8, 8, dtype=C128)
    p = pen.prox(x, 2.0)
    assert torch.allclose(p, W.adjoint(soft_threshold(W.forward(x), 0.6)))

    def objective(z: torch.Tensor) -> float:
        return float(2.0 * pen(z) + 0.5 * torch.linalg.vector_norm(z - x) ** 2)

    best = objective(p)
    for seed in range(10):
        assert objective(p + 1e-3 * _randn(8, 8, dtype=C128, seed=seed + 1)) > best


def test_wavelet_l1_leaves_the_approximation_band_alone_by_default():
    W = Wavelet2D((8, 8), 3, "haar")
    x = torch.full((8, 8), 5.0, dtype=F64)
    assert torch.allclose(WaveletL1(W, 100.0).prox(x, 1.0), x)  # a constant has no detail to shrink
    assert WaveletL1(W, 100.0)(x).item() == pytest.approx(0.0)


def test_cycle_spun_wavelet_prox_is_shift_averaged_and_nonexpansive():
    W = Wavelet2D((8, 8), 2, "haar")
    pen = WaveletL1(W, torch.tensor([0.2, 0.5], dtype=F64), shifts=2)
    x1, x2 = _randn(2, 8, 8, seed=1), _randn(2, 8, 8, seed=2)
    single = WaveletL1(W, torch.tensor([0.2, 0.5], dtype=F64))
    manual = (
        sum(
            torch.roll(single.prox(torch.roll(x1, s, dims=(-2, -1)), 1.0), (-s[0], -s[1]), dims=(-2, -1))
            for s in [(0, 0), (0, 1), (1, 0), (1, 1)]
        )
        / 4
    )
    assert torch.allclose(pen.prox(x1, 1.0), manual)
    # An average of proximal maps is a proximal map: firmly nonexpansive, hence nonexpansive.
    d = pen.prox(x1, 1.0) - pen.prox(x2, 1.0)
    assert torch.linalg.vector_norm(d) <= torch.linalg.vector_norm(x1 - x2)
    assert pen(x1).shape == (2,)
    with pytest.raises(ParameterError, match="shifts must be an int >= 1"):
        WaveletL1(W, 0.1, shifts=0)


def test_l1_and_no_penalty():
    x = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=F64)
    assert torch.equal(L1Penalty(2.0, ndim=1)(x), torch.tensor([6.0, 1.0], dtype=F64))
    expected = torch.tensor([[0.5, -1.5], [0.0, 0.0]], dtype=F64)
    assert torch.equal(L1Penalty(1.0, ndim=1).prox(x, 0.5), expected)
    assert torch.equal(NoPenalty(ndim=1).prox(x, 10.0), x)
    assert torch.equal(NoPenalty(ndim=1)(x), torch.zeros(2, dtype=F64))
    with pytest.raises(ParameterError, match=r"lam must be >= 0.*found -1"):
        L1Penalty(-1.0, ndim=1)
