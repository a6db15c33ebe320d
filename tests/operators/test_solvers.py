"""Solvers against closed-form answers on tiny problems, and the driver (operators/solvers.py)."""

import dataclasses
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from operators.errors import NonFiniteError, ParameterError, ShapeError
from operators.linear import Diagonal, Identity, LinearOperator
from operators.regularizers import FiniteDifference, L1Penalty, NoPenalty, soft_threshold
from operators.solvers import FISTA, PDHG, CGState, ConjugateGradient, SolveResult, solve

F64, C128 = torch.float64, torch.complex128


class Dense(LinearOperator):
    """``A x = M x`` for a dense ``(m, n)`` matrix, batched over leading dimensions."""

    def __init__(self, matrix: torch.Tensor) -> None:
        c = matrix.is_complex()
        super().__init__((matrix.shape[1],), (matrix.shape[0],), complex_in=c, complex_out=c)
        self.matrix = matrix

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.T  # (..., n) -> (..., m)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.matrix.conj()  # (..., m) -> (..., n)


def _randn(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.resolve_conj().numpy()


# -- conjugate gradient ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, C128])
def test_cg_matches_numpy_solve_batched(dtype):
    m = _randn(12, 7, dtype=dtype)
    A = Dense(m)
    y = _randn(3, 12, dtype=dtype, seed=1)
    lam = 0.3
    cg = ConjugateGradient(A.normal, lam=lam, event_ndim=1)
    result = solve(cg, cg.init(A.adjoint(y)), max_iter=50, tol=1e-12)
    mat = _np(m).conj().T @ _np(m) + lam * np.eye(7)
    expected = np.linalg.solve(mat, _np(A.adjoint(y)).T).T  # (3, 7)
    assert result.converged and result.iterations <= 8  # n = 7 steps in exact arithmetic
    np.testing.assert_allclose(_np(result.x), expected, atol=1e-10)


def test_cg_per_item_lambda_and_warm_start():
    m = _randn(9, 5)
    A = Dense(m)
    b = _randn(2, 5, seed=2)
    lam = torch.tensor([0.0, 2.0], dtype=F64)
    cg = ConjugateGradient(A.normal, lam=lam, event_ndim=1)
    x0 = _randn(2, 5, seed=3)
    result = solve(cg, cg.init(b, x0=x0), max_iter=50, tol=1e-12)
    for i in range(2):
        expected = np.linalg.solve(_np(m).T @ _np(m) + float(lam[i]) * np.eye(5), _np(b[i]))
        np.testing.assert_allclose(_np(result.x[i]), expected, atol=1e-10)


def test_cg_on_a_diagonal_operator_with_a_whole_array_item():
    w = torch.tensor([[1.0, 2.0], [4.0, 0.5]], dtype=F64)
    A = Diagonal(w)
    cg = ConjugateGradient(A.normal)  # event_ndim=None: the whole (2, 2) array is one system
    b = torch.ones(2, 2, dtype=F64)
    result = solve(cg, cg.init(b), max_iter=10, tol=1e-14)
    assert torch.allclose(result.x, 1 / w**2)


def test_cg_zero_right_hand_side_converges_in_zero_steps():
    cg = ConjugateGradient(Identity((4,)).normal, event_ndim=1)
    result = solve(cg, cg.init(torch.zeros(3, 4, dtype=F64)), max_iter=10, tol=1e-8)
    assert (result.iterations, result.converged, result.residual, result.history) == (0, True, 0.0, ())
    assert torch.equal(result.x, torch.zeros(3, 4, dtype=F64))


def test_cg_rejects_negative_lambda_and_bad_x0():
    with pytest.raises(ParameterError, match=r"ConjugateGradient: lam must be >= 0; found -1"):
        ConjugateGradient(Identity((3,)).normal, lam=-1.0)
    cg = ConjugateGradient(Identity((3,)).normal)
    with pytest.raises(ShapeError, match=r"x0 must have shape \(3,\); found \(4,\)"):
        cg.init(torch.ones(3), x0=torch.ones(4))


# -- FISTA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, C128])
def test_fista_without_regulariser_is_least_squares(dtype):
    m = _randn(14, 6, dtype=dtype, seed=4)
    A = Dense(m)
    y = _randn(2, 14, dtype=dtype, seed=5)
    fista = FISTA(A, y, NoPenalty(ndim=1))
    result = solve(fista, fista.init(), max_iter=3000, tol=1e-13)
    expected = np.linalg.lstsq(_np(m), _np(y).T, rcond=None)[0].T  # (2, 6)
    assert result.converged
    np.testing.assert_allclose(_np(result.x), expected, atol=1e-9)


def test_fista_lasso_with_diagonal_operator_is_soft_thresholding():
    # min ½(a x - y)² + λ|x| has the closed form x = S_λ(a y) / a² per element.
    a = torch.tensor([0.5, 1.0, 2.0, 3.0, 1.5], dtype=F64)
    y = torch.tensor([2.0, -0.3, 1.0, -4.0, 0.1], dtype=F64)
    lam = 0.4
    fista = FISTA(Diagonal(a), y, L1Penalty(lam, ndim=1))
    result = solve(fista, fista.init(), max_iter=2000, tol=1e-14)
    assert torch.allclose(result.x, soft_threshold(a * y, lam) / a**2, atol=1e-10)


def test_fista_step_from_operator_norm():
    A = Diagonal(torch.tensor([1.0, -3.0, 2.0], dtype=F64))
    fista = FISTA(A, torch.ones(3, dtype=F64), NoPenalty(ndim=1))
    assert fista.lipschitz == pytest.approx((1.01 * 3.0) ** 2, rel=1e-6)
    with pytest.raises(ParameterError, match=r"lipschitz must be a finite number > 0.*found -1"):
        FISTA(A, torch.ones(3, dtype=F64), NoPenalty(ndim=1), lipschitz=-1.0)


# -- PDHG ------------------------------------------------------------------------------------------
def test_pdhg_tv_denoising_of_a_step_matches_the_exact_solution():
    # 1D TV denoising of a step from 0 to 1 at index m: the levels move towards each other by
    # λ/m and λ/(n-m) (exact, from the optimality condition with the dual z_i = λ (i+1)/m).
    n, m, lam = 20, 8, 0.5
    y = torch.cat([torch.zeros(m), torch.ones(n - m)]).to(F64)
    D = FiniteDifference((n,))
    pdhg = PDHG(Identity((n,)), y, D, lam, group_dim=D.component_dim)
    result = solve(pdhg, pdhg.init(), max_iter=20000, tol=1e-13)
    expected = torch.cat([torch.full((m,), lam / m), torch.full((n - m,), 1 - lam / (n - m))]).to(F64)
    assert result.converged
    assert torch.allclose(result.x, expected, atol=1e-7)


def _tv1d_reference(y: np.ndarray, lam: float) -> np.ndarray:
    """1D TV denoising through its dual: min_{|z| <= λ} ½‖y - Dᵀz‖², x = y - Dᵀz (L-BFGS-B)."""
    n = len(y)
    dmat = np.diff(np.eye(n), axis=0)  # (n-1, n): (D x)_i = x_{i+1} - x_i

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        r = y - dmat.T @ z
        return 0.5 * r @ r, -dmat @ r

    out = scipy.optimize.minimize(
        fun, np.zeros(n - 1), jac=True, method="L-BFGS-B", bounds=[(-lam, lam)] * (n - 1),
        options={"ftol": 1e-15, "gtol": 1e-13, "maxiter": 20000},
    )  # fmt: skip
    return y - dmat.T @ out.x


def test_pdhg_tv_denoising_of_a_noisy_signal_matches_the_dual_reference():
    rng = np.random.default_rng(0)
    y = np.repeat([0.0, 2.0, 1.0, 1.5], 8) + 0.3 * rng.standard_normal(32)
    lam = 0.8
    D = FiniteDifference((32,))
    pdhg = PDHG(Identity((32,)), torch.from_numpy(y), D, lam, group_dim=D.component_dim)
    result = solve(pdhg, pdhg.init(), max_iter=20000, tol=1e-12)
    np.testing.assert_allclose(result.x.numpy(), _tv1d_reference(y, lam), atol=1e-6)


def test_pdhg_anisotropic_l1_with_identity_is_complex_soft_thresholding():
    y = _randn(3, 10, dtype=C128, seed=6)
    lam = 0.7
    A = Identity((10,), complex_data=True)
    pdhg = PDHG(A, y, A, lam, group_dim=None)
    result = solve(pdhg, pdhg.init(), max_iter=5000, tol=1e-13)
    assert torch.allclose(result.x, soft_threshold(y, lam), atol=1e-9)


def test_pdhg_complex_isotropic_tv_commutes_with_a_global_phase():
    # TV and the data term only see |·| of differences, so a constant phase factors out of the
    # solution: denoising y e^{iφ} gives x e^{iφ} for the real solution x.
    y = _randn(2, 6, 7, seed=7)
    lam = torch.tensor([0.3, 0.6], dtype=F64)  # one weight per batch item
    phase = complex(math.cos(1.1), math.sin(1.1))
    real = PDHG(Identity((6, 7)), y, FiniteDifference((6, 7)), lam, group_dim=-3)
    identity, grad = Identity((6, 7), complex_data=True), FiniteDifference((6, 7), complex_data=True)
    cplx = PDHG(identity, y * phase, grad, lam, group_dim=-3)
    xr = solve(real, real.init(), max_iter=3000, tol=1e-11).x
    xc = solve(cplx, cplx.init(), max_iter=3000, tol=1e-11).x
    assert torch.allclose(xc, xr * phase, atol=1e-7)


def test_pdhg_batch_items_are_independent_problems():
    m = _randn(10, 8, seed=8)
    A = Dense(m)
    y = _randn(2, 10, seed=9)
    D = FiniteDifference((8,))
    lam = torch.tensor([0.1, 1.0], dtype=F64)
    both = PDHG(A, y, D, lam, group_dim=-2)
    xb = solve(both, both.init(), max_iter=4000, tol=1e-12).x
    for i in range(2):
        one = PDHG(A, y[i], D, float(lam[i]), group_dim=-2)
        assert torch.allclose(xb[i], solve(one, one.init(), max_iter=4000, tol=1e-12).x, atol=1e-8)


def test_pdhg_validates_its_problem():
    A = Identity((4,))
    with pytest.raises(ShapeError, match=r"K.in_shape must equal op.in_shape \(4,\).*found \(5,\)"):
        PDHG(A, torch.ones(4), FiniteDifference((5,)), 0.1)
    with pytest.raises(ParameterError, match=r"group_dim must be a negative axis.*\[-2, -1\].*found 0"):
        PDHG(A, torch.ones(4), FiniteDifference((4,)), 0.1, group_dim=0)
    with pytest.raises(ShapeError, match=r"y must have trailing shape \(4,\).*found shape \(5,\)"):
        PDHG(A, torch.ones(5), FiniteDifference((4,)), 0.1).init()


# -- the driver ------------------------------------------------------------------------------------
def _ill_conditioned_cg() -> tuple[ConjugateGradient, CGState]:
    a = torch.logspace(0, 3, 40, dtype=F64)
    cg = ConjugateGradient(Diagonal(a).normal, event_ndim=1)
    return cg, cg.init(torch.ones(40, dtype=F64))


def test_driver_stops_on_tolerance_and_reports_it():
    cg, state = _ill_conditioned_cg()
    calls: list[tuple[int, float]] = []
    result = solve(cg, state, max_iter=1000, tol=1e-8, progress=lambda k, s: calls.append((k, s.residual)))
    assert isinstance(result, SolveResult)
    assert result.converged and result.residual <= 1e-8
    assert 0 < result.iterations < 1000
    assert len(result.history) == result.iterations and result.history[-1] == result.residual
    assert all(h > 1e-8 for h in result.history[:-1])  # it stopped at the first step below tol
    assert [k for k, _ in calls] == list(range(1, result.iterations + 1))
    assert [r for _, r in calls] == list(result.history)
    assert result.seconds >= 0 and result.state.x is result.x


def test_driver_stops_on_the_cap_and_reports_not_converged():
    cg, state = _ill_conditioned_cg()
    result = solve(cg, state, max_iter=3, tol=1e-12)
    assert (result.iterations, result.converged, len(result.history)) == (3, False, 3)
    assert result.residual == result.history[-1] > 1e-12
    # Resuming from the returned state continues the same iteration.
    resumed = solve(cg, result.state, max_iter=2, tol=1e-12)
    straight = solve(cg, state, max_iter=5, tol=1e-12)
    assert torch.equal(resumed.x, straight.x)


def test_driver_with_zero_cap_returns_the_initial_state():
    cg, state = _ill_conditioned_cg()
    result = solve(cg, state, max_iter=0, tol=1e-8)
    assert (result.iterations, result.converged, result.history) == (0, False, ())
    assert result.x is state.x


def test_driver_validates_its_arguments():
    cg, state = _ill_conditioned_cg()
    with pytest.raises(ParameterError, match=r"max_iter must be an int >= 0.*found -1"):
        solve(cg, state, max_iter=-1, tol=1e-6)
    with pytest.raises(ParameterError, match=r"max_iter must be an int >= 0.*found 2.5"):
        solve(cg, state, max_iter=2.5, tol=1e-6)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"tol must be a float >= 0.*found -0.1"):
        solve(cg, state, max_iter=10, tol=-0.1)


def test_driver_raises_on_non_finite_residuals():
    y = torch.tensor([1.0, math.nan], dtype=F64)
    fista = FISTA(Identity((2,)), y, NoPenalty(ndim=1), lipschitz=1.0)
    with pytest.raises(NonFiniteError, match=r"FISTA residual became nan at iteration 1.*NaN/Inf"):
        solve(fista, fista.init(), max_iter=10, tol=1e-6)


def test_states_are_frozen_and_steps_do_not_mutate():
    cg, state = _ill_conditioned_cg()
    x_before = state.x.clone()
    cg.step(state)
    assert torch.equal(state.x, x_before)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.x = torch.zeros(40)  # type: ignore[misc]
    fista = FISTA(Identity((3,)), torch.ones(3, dtype=F64), NoPenalty(ndim=1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fista.init().t = 2.0  # type: ignore[misc]


def test_no_solver_touches_the_global_rng():
    before = torch.get_rng_state()
    m = _randn(8, 5, dtype=C128)
    A = Dense(m)
    y = _randn(8, dtype=C128, seed=1)
    cg = ConjugateGradient(A.normal, lam=0.1, event_ndim=1)
    solve(cg, cg.init(A.adjoint(y)), max_iter=5, tol=0.0)
    fista = FISTA(A, y, L1Penalty(0.1, ndim=1))  # estimates ‖A‖ by power iteration
    solve(fista, fista.init(), max_iter=5, tol=0.0)
    D = FiniteDifference((5,), complex_data=True)
    pdhg = PDHG(A, y, D, 0.1, group_dim=-2)
    solve(pdhg, pdhg.init(), max_iter=5, tol=0.0)
    assert torch.equal(torch.get_rng_state(), before)
