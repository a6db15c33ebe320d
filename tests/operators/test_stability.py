"""The stability audit (operators/stability.py): worst case against random perturbations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from operators.ct import ParallelBeam, sparse_view_angles
from operators.errors import ParameterError, ShapeError
from operators.linear import LinearOperator
from operators.masks import random_1d
from operators.mri import CartesianMRI
from operators.recon import reconstruct
from operators.stability import (
    AuditResult,
    evaluate_perturbation,
    random_perturbation,
    worst_case_perturbation,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/operators/conftest.py

N = 12  # image size: small enough for dense singular values


def _mri(dtype: torch.dtype = torch.float64, n: int = N) -> CartesianMRI:
    return CartesianMRI(random_1d((n, n), acceleration=4, center_fraction=0.1, seed=0)).to(dtype=dtype)


def _ct(n: int = N) -> ParallelBeam:
    return ParallelBeam((n, n), sparse_view_angles(6))


def _images(op: LinearOperator, batch: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A batch of random images ``(batch, *op.in_shape)``, complex for MRI, items of different scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *op.in_shape, generator=g, dtype=dtype)
    if op.complex_in:
        x = torch.complex(x, torch.rand(batch, *op.in_shape, generator=g, dtype=dtype))
    scales = torch.logspace(0, 2, batch, dtype=dtype).reshape(batch, 1, 1)  # (batch, 1, 1)
    return x * scales


def _per_item_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(start_dim=1), dim=-1)  # (B,)


def _gain(result: AuditResult) -> torch.Tensor:
    """``‖f(y + A r) - f(y)‖ / ‖r‖`` per item: what the search maximises, per unit of budget."""
    return _per_item_norm(result.reconstruction - result.baseline) / _per_item_norm(result.perturbation)


def _dense(f, op: LinearOperator) -> torch.Tensor:
    """The matrix of the linear map ``r -> f(A r)`` on ``(N, N)`` images (columns: basis images)."""
    dtype = torch.complex128 if op.complex_in else torch.float64
    basis = torch.eye(N * N, dtype=dtype).reshape(N * N, N, N)  # (N², N, N)
    return f(op.forward(basis)).reshape(N * N, N * N).T  # (N², N²)


def _spike_weight() -> torch.Tensor:
    """A weight ``(N, N)`` of 1 with a bump of 5: ``w ⊙ Aᴴ`` has a distinct top singular value."""
    w = torch.ones(N, N, dtype=torch.float64)
    w[4:6, 5:8] = 5.0
    return w


# -- linear maps: the worst case is the largest singular value -------------------------------------
def test_pseudo_inverse_of_cartesian_mri_has_amplification_one():
    # f = Aᴴ and AᴴA is an orthogonal projection (binary mask): ‖Aᴴ A r‖ = ‖A r‖ for every r.
    op = _mri()
    x = _images(op, 3, seed=0)
    y = op.forward(x)
    worst = worst_case_perturbation(op.pseudo_inverse, y, op, x, eps=0.05, steps=10)
    control = random_perturbation(op.pseudo_inverse, y, op, x, eps=0.05)
    for result in (worst, control):
        assert result.amplification.shape == (3,)
        assert torch.allclose(result.amplification, torch.ones(3, dtype=torch.float64), atol=1e-9)
    # The search finds a perturbation the data sees entirely (‖A r‖ = ‖r‖); random ones it sees in part.
    assert bool((_gain(worst) <= 1 + 1e-9).all()) and bool((_gain(worst) > 0.999).all())
    assert bool((_gain(control) < 0.8).all())


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_worst_case_of_a_linear_map_approaches_its_largest_singular_value(modality):
    op = _mri() if modality == "mri" else _ct()
    w = _spike_weight()

    def f(y: torch.Tensor) -> torch.Tensor:
        return w * op.adjoint(y)  # B = diag(w) Aᴴ

    top = float(torch.linalg.svdvals(_dense(f, op))[0])  # σ₁(B A)
    x = _images(op, 2, seed=1)
    worst = worst_case_perturbation(f, op.forward(x), op, x, eps=0.01, steps=20)
    gain = _gain(worst)
    assert bool((gain <= top * (1 + 1e-9)).all()), (gain, top)
    assert bool((gain >= 0.99 * top).all()), (gain, top)
    control = random_perturbation(f, op.forward(x), op, x, eps=0.01, trials=5)
    assert bool((_gain(control) < 0.7 * top).all())


# -- unstable maps: the worst case beats random perturbations of the same norm --------------------
@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_worst_case_finds_a_larger_amplification_than_random_perturbations(modality):
    # f(y) = Aᴴy + c <v, Aᴴy> v blows up one image direction v (the data must see v: v = AᴴA u).
    # A random r of norm ρ has a component of about ρ / 32 along v in 32² pixels: it misses it.
    op = _mri(n=32) if modality == "mri" else _ct(n=32)
    u = _images(op, 1, seed=5)[0] - _images(op, 1, seed=5)[0].mean()
    v = op.normal(u)
    v = v / torch.linalg.vector_norm(v)  # (32, 32), unit norm

    def f(y: torch.Tensor) -> torch.Tensor:
        z = op.adjoint(y)  # (B, 32, 32)
        coeff = (v.conj() * z).sum(dim=(-2, -1), keepdim=True)  # <v, z>, (B, 1, 1)
        return z + 100.0 * coeff * v

    x = _images(op, 2, seed=2)
    y = op.forward(x)
    worst = worst_case_perturbation(f, y, op, x, eps=0.01)
    control = random_perturbation(f, y, op, x, eps=0.01, trials=5)
    assert worst.search == "gradient" and control.search == "random"
    assert bool((worst.amplification > 4 * control.amplification).all()), (
        worst.amplification,
        control.amplification,
    )
    assert bool((worst.relative_change > 10 * control.relative_change).all())


class _TinyNet(nn.Module):
    """``x + conv(relu(conv(x)))`` on ``x = Aᴴ y``, with big random weights; complex images as 2 channels."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, dtype=torch.float64)
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1, dtype=torch.float64)
        for conv in (self.conv1, self.conv2):
            with torch.no_grad():
                conv.weight.copy_(20 * torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        x = op.adjoint(y)  # (B, H, W) complex
        h = torch.view_as_real(x).movedim(-1, 1)  # (B, 2, H, W)
        out = self.conv2(torch.relu(self.conv1(h))).movedim(1, -1).contiguous()  # (B, H, W, 2)
        return x + torch.view_as_complex(out)  # (B, H, W)


def test_a_tiny_net_with_big_weights_is_less_stable_than_random_tries_suggest_and_keeps_no_grads():
    op = _mri(n=24)
    net = _TinyNet(seed=0).eval()
    x = _images(op, 2, seed=3)
    y = op.forward(x)

    def f(measurements: torch.Tensor) -> torch.Tensor:
        return net(measurements, op)

    worst = worst_case_perturbation(f, y, op, x, eps=0.01)
    control = random_perturbation(f, y, op, x, eps=0.01)
    assert bool((worst.amplification > 1.5 * control.amplification).all()), (
        worst.amplification,
        control.amplification,
    )
    assert bool((worst.relative_change > 2.5 * control.relative_change).all())
    assert all(p.grad is None for p in net.parameters())
    assert not worst.perturbation.requires_grad and not worst.reconstruction.requires_grad


# -- budget, shapes, dtypes, batches ---------------------------------------------------------------
@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_perturbations_respect_the_budget_per_item_and_take_the_image_dtype(modality):
    op = _mri(torch.float32) if modality == "mri" else _ct()
    x = _images(op, 3, seed=4, dtype=torch.float32)  # items 1x, 10x, 100x
    y = op.forward(x)
    eps = 0.02
    budget = eps * _per_item_norm(x)  # (3,)
    for result in (
        worst_case_perturbation(op.pseudo_inverse, y, op, x, eps=eps, steps=3),
        random_perturbation(op.pseudo_inverse, y, op, x, eps=eps, trials=3),
    ):
        r = result.perturbation
        assert r.shape == (3, N, N) and r.is_complex() == (modality == "mri")
        assert r.dtype == (torch.complex64 if modality == "mri" else torch.float32)
        assert bool((_per_item_norm(r) <= budget * (1 + 1e-5)).all())
        assert bool((_per_item_norm(r) >= budget * (1 - 1e-5)).all())  # the ascent ends on the sphere
        assert result.amplification.shape == result.relative_change.shape == (3,)
        assert result.reconstruction.shape == result.baseline.shape == (3, N, N)
        assert (result.eps, result.amplification.dtype) == (eps, torch.float32)


def test_the_default_reference_is_the_reconstruction_and_unbatched_data_work():
    op = _mri()
    x = _images(op, 1, seed=6)[0]  # (N, N)
    y = op.forward(x)
    result = worst_case_perturbation(op.pseudo_inverse, y, op, None, eps=0.1, steps=2)
    assert result.amplification.shape == () and result.perturbation.shape == (N, N)
    expected = 0.1 * torch.linalg.vector_norm(op.pseudo_inverse(y))
    assert float(torch.linalg.vector_norm(result.perturbation)) == pytest.approx(float(expected), rel=1e-6)


def test_batch_items_are_audited_independently():
    op = _ct()
    w = _spike_weight()

    def f(y: torch.Tensor) -> torch.Tensor:
        return w * op.adjoint(y)

    x = _images(op, 2, seed=7)
    y = op.forward(x)
    both = worst_case_perturbation(f, y, op, x, eps=0.01, steps=20)
    one = worst_case_perturbation(f, y[1:], op, x[1:], eps=0.01, steps=20)
    # Different random starts, the same optimum: the item's result does not depend on its neighbours.
    assert float(both.amplification[1]) == pytest.approx(float(one.amplification[0]), rel=1e-4)


# -- randomness ------------------------------------------------------------------------------------
def test_same_seed_same_result_and_the_global_rng_is_untouched():
    op = _mri()
    x = _images(op, 2, seed=8)
    y = op.forward(x)
    before = torch.get_rng_state()
    a = worst_case_perturbation(op.pseudo_inverse, y, op, x, eps=0.05, steps=3, seed=11)
    b = worst_case_perturbation(op.pseudo_inverse, y, op, x, eps=0.05, steps=3, seed=11)
    c = worst_case_perturbation(op.pseudo_inverse, y, op, x, eps=0.05, steps=3, seed=12)
    ra = random_perturbation(op.pseudo_inverse, y, op, x, eps=0.05, seed=11)
    rb = random_perturbation(op.pseudo_inverse, y, op, x, eps=0.05, seed=11)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.perturbation, b.perturbation) and torch.equal(a.amplification, b.amplification)
    assert not torch.equal(a.perturbation, c.perturbation)
    assert torch.equal(ra.perturbation, rb.perturbation)


# -- classical methods -----------------------------------------------------------------------------
def test_without_differentiation_the_search_is_the_worst_of_random_directions():
    op = _mri()
    x = _images(op, 2, seed=9)
    y = op.forward(x)

    def cs(measurements: torch.Tensor) -> torch.Tensor:
        return reconstruct("cs_tv", measurements, op, max_iter=10, tol=0.0).image

    search = worst_case_perturbation(cs, y, op, x, eps=0.02, steps=3, seed=4, differentiable=False)
    control = random_perturbation(cs, y, op, x, eps=0.02, trials=3, seed=4)
    assert (search.search, search.steps) == ("random", 3)
    assert torch.equal(search.perturbation, control.perturbation)
    assert torch.equal(search.amplification, control.amplification)


# The solvers read their residual with float() on a tensor that carries gradients here.
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_a_classical_method_can_be_differentiated_and_can_take_a_given_perturbation():
    op = _ct()
    x = _images(op, 2, seed=10)
    y = op.forward(x)

    def cs(measurements: torch.Tensor) -> torch.Tensor:
        return reconstruct("cs_tv", measurements, op, max_iter=10, tol=0.0).image

    worst = worst_case_perturbation(cs, y, op, x, eps=0.02, steps=2)
    assert worst.search == "gradient" and bool(torch.isfinite(worst.amplification).all())
    # Antun et al.'s transfer: one map's worst case applied to another (here: to itself, as a check).
    again = evaluate_perturbation(cs, y, op, x, worst.perturbation)
    assert again.search == "given" and again.eps == pytest.approx(0.02, rel=1e-5)
    assert torch.allclose(again.amplification, worst.amplification, rtol=1e-6)


# -- errors ----------------------------------------------------------------------------------------
def test_bad_arguments_are_refused_with_the_fix():
    op = _mri()
    x = _images(op, 2, seed=0)
    y = op.forward(x)
    f = op.pseudo_inverse
    with pytest.raises(ParameterError, match=r"eps must be a finite number > 0.*found 0"):
        worst_case_perturbation(f, y, op, x, eps=0)
    with pytest.raises(ParameterError, match=r"eps must be a finite number > 0.*found nan"):
        random_perturbation(f, y, op, x, eps=math.nan)
    with pytest.raises(ParameterError, match=r"steps must be an int >= 1; found 0"):
        worst_case_perturbation(f, y, op, x, eps=0.1, steps=0)
    with pytest.raises(ParameterError, match=r"trials must be an int >= 1; found 2.5"):
        random_perturbation(f, y, op, x, eps=0.1, trials=2.5)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"step_size must be a finite number > 0.*found -1"):
        worst_case_perturbation(f, y, op, x, eps=0.1, step_size=-1)
    bad_y = r"y must be measurements of trailing shape op.out_shape = \(12, 12\).*found \(2, 12, 5\)"
    with pytest.raises(ShapeError, match=bad_y):
        worst_case_perturbation(f, y[..., :5], op, x, eps=0.1)
    bad_x = r"x must have the batch shape of y, \(2,\), in front; found \(3, 12, 12\)"
    with pytest.raises(ShapeError, match=bad_x):
        worst_case_perturbation(f, y, op, _images(op, 3, seed=0), eps=0.1)
