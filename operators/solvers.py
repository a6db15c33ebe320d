"""Iterative solvers as ``init -> State`` and ``step(State) -> State``, and one driver.

Each solver is a small frozen dataclass holding its problem (operators, data, weights, step
sizes). ``solver.init(...)`` builds the first :class:`State` (a frozen dataclass, never a
dict) and ``solver.step(state)`` returns the next one; neither mutates anything, and no solver
draws random numbers (spectral norms use :meth:`LinearOperator.norm`, which seeds its own
generator). :func:`solve` is the only loop: it stops on tolerance or the iteration cap, times
the run, records the residual history and calls an optional progress callback.

Solvers (``x`` has shape ``(*batch, *event)``; every batch item is its own problem, and the
stopping residual is the worst item's):

* :class:`ConjugateGradient`: ``(N + λ I) x = b`` for a Hermitian positive semi-definite
  normal map ``N`` (e.g. ``AᴴA``) given as a callable. Residual ``‖b - (N + λI) x‖ / ‖b‖``.
* :class:`FISTA`: ``min_x ½‖A x - y‖² + R(x)`` (Beck & Teboulle 2009): a gradient step of size
  ``1 / L``, ``L = ‖A‖²``, then ``prox`` of the :class:`~operators.regularizers.Penalty` ``R``,
  with Nesterov momentum. Residual ``‖x_k - x_{k-1}‖ / ‖x_k‖``.
* :class:`PDHG`: ``min_x ½‖A x - y‖² + λ‖K x‖₁`` (Chambolle & Pock 2011) with the data
  term dualised too, so no inner solve is needed. ``‖·‖₁`` is the group (l2,1) norm over
  ``group_dim`` when given, e.g. isotropic TV with ``K`` a
  :class:`~operators.regularizers.FiniteDifference`. Residual as for FISTA.

Complex data (MRI) works throughout: inner products conjugate, and shrinkage keeps phase.

Example:
    >>> import torch
    >>> from operators.linear import Diagonal
    >>> A = Diagonal(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    >>> cg = ConjugateGradient(A.normal, lam=0.0)
    >>> result = solve(cg, cg.init(A.adjoint(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))),
    ...                max_iter=10, tol=1e-10)
    >>> result.x.round(decimals=8), result.converged
    (tensor([1., 1., 1.], dtype=torch.float64), True)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from operators.errors import NonFiniteError, ParameterError, ShapeError
from operators.linear import LinearOperator, complex_dtype_for
from operators.regularizers import Penalty, per_item, project_group_ball

__all__ = [
    "State",
    "Solver",
    "SolveResult",
    "solve",
    "ConjugateGradient",
    "CGState",
    "FISTA",
    "FISTAState",
    "PDHG",
    "PDHGState",
]

Tensor = torch.Tensor
Weight = float | Tensor  # a float, or a tensor of the batch shape (one value per item)

# Power iterations for spectral norms, and the safety factor on them (power iteration
# approaches ‖A‖ from below; a step a little too long can make FISTA or PDHG diverge).
_NORM_ITERS = 50
_NORM_SAFETY = 1.01


class State(Protocol):
    """What the driver reads from every solver state."""

    @property
    def x(self) -> Tensor: ...

    @property
    def residual(self) -> float: ...


S = TypeVar("S", bound=State)


class Solver(Protocol[S]):
    """Anything with ``step(state) -> state``."""

    def step(self, state: S) -> S: ...


@dataclass(frozen=True, eq=False)
class SolveResult(Generic[S]):
    """The outcome of :func:`solve`.

    Attributes:
        x: the final iterate.
        iterations: steps taken.
        residual: the final relative residual (the solver's stopping quantity).
        converged: ``residual <= tol``.
        seconds: wall time of the loop.
        history: the residual after each step (``len(history) == iterations``).
        state: the final state (to resume with another :func:`solve`).
    """

    x: Tensor
    iterations: int
    residual: float
    converged: bool
    seconds: float
    history: tuple[float, ...]
    state: S


def solve(
    solver: Solver[S],
    state: S,
    *,
    max_iter: int,
    tol: float,
    progress: Callable[[int, S], None] | None = None,
) -> SolveResult[S]:
    """Step ``solver`` from ``state`` until ``state.residual <= tol`` or ``max_iter`` steps.

    A state that already meets the tolerance (e.g. CG with ``b = 0``) returns after zero
    steps.

    Args:
        solver: an object with ``step(state) -> state``.
        state: the first state, from ``solver.init(...)``.
        max_iter: the iteration cap, ``>= 0``.
        tol: the tolerance on the relative residual, ``>= 0``.
        progress: called as ``progress(iteration, state)`` after every step.

    Raises:
        ParameterError: ``max_iter`` or ``tol`` out of range.
        NonFiniteError: the residual became NaN or Inf (a step size too large for the problem,
            or non-finite data).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ParameterError(f"solve: max_iter must be an int >= 0 (the iteration cap); found {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ParameterError(f"solve: tol must be a float >= 0 (relative residual); found {tol!r}")
    start = time.perf_counter()
    history: list[float] = []
    iterations = 0
    converged = state.residual <= tol
    while not converged and iterations < max_iter:
        state = solver.step(state)
        iterations += 1
        residual = state.residual
        if not math.isfinite(residual):
            raise NonFiniteError(
                f"solve: {type(solver).__name__} residual became {residual} at iteration {iterations}; "
                "expected a finite value. Check the data for NaN/Inf, or pass a smaller step size"
            )
        history.append(residual)
        if progress is not None:
            progress(iterations, state)
        converged = residual <= tol
    return SolveResult(
        x=state.x,
        iterations=iterations,
        residual=float(state.residual),
        converged=bool(converged),
        seconds=time.perf_counter() - start,
        history=tuple(history),
        state=state,
    )


# -- helpers ---------------------------------------------------------------------------------------
def _sq_norm(x: Tensor, event_ndim: int) -> Tensor:
    """``‖x_b‖²`` per batch item, real ``(*batch)``."""
    sq = x.real**2 + x.imag**2 if x.is_complex() else x**2
    return sq.flatten(start_dim=x.ndim - event_ndim).sum(-1) if event_ndim else sq


def _dot(a: Tensor, b: Tensor, event_ndim: int) -> Tensor:
    """``<a_b, b_b> = Σ conj(a) b`` per batch item, ``(*batch)``."""
    prod = torch.conj(a) * b if a.is_complex() else a * b
    return prod.flatten(start_dim=prod.ndim - event_ndim).sum(-1) if event_ndim else prod


def _expand(v: Tensor, event_ndim: int) -> Tensor:
    """``(*batch)`` -> ``(*batch, 1, ..., 1)`` to broadcast against ``(*batch, *event)``."""
    return v.reshape(*v.shape, *([1] * event_ndim))


def _relative_change(new: Tensor, old: Tensor, event_ndim: int) -> float:
    """``max_b ‖new_b - old_b‖ / ‖new_b‖`` (0 where both are zero)."""
    num = _sq_norm(new - old, event_ndim)
    den = _sq_norm(new, event_ndim)
    return _max_sqrt_ratio(num, den)


def _max_sqrt_ratio(num: Tensor, den: Tensor) -> float:
    """``max_b sqrt(num_b / den_b)``: 0 where both are zero, inf where only ``den`` is, NaN kept."""
    safe = torch.where(den == 0, torch.ones_like(den), den)
    ratio = torch.where(den == 0, torch.where(num == 0, 0.0, math.inf), num / safe)
    return float(torch.sqrt(ratio.max())) if ratio.numel() else 0.0


def _image_zeros(op: LinearOperator, y: Tensor) -> Tensor:
    """Zeros of shape ``(*batch, *op.in_shape)`` in the image dtype matching ``y``."""
    n_out = len(op.out_shape)
    if y.ndim < n_out or tuple(y.shape[y.ndim - n_out :]) != op.out_shape:
        raise ShapeError(
            f"y must have trailing shape {op.out_shape} (the operator's out_shape, any leading batch "
            f"dimensions); found shape {tuple(y.shape)}"
        )
    batch = y.shape[: y.ndim - n_out]
    real = y.real.dtype if y.is_complex() else y.dtype
    dtype = complex_dtype_for(real) if op.complex_in else real
    return torch.zeros(*batch, *op.in_shape, dtype=dtype, device=y.device)


def _check_x0(x0: Tensor, like: Tensor, who: str) -> Tensor:
    if tuple(x0.shape) != tuple(like.shape):
        raise ShapeError(f"{who}: x0 must have shape {tuple(like.shape)}; found {tuple(x0.shape)}")
    return x0.to(like.dtype)


def _check_weight(value: Weight, name: str, who: str) -> None:
    bad = bool((value < 0).any()) if isinstance(value, Tensor) else value < 0
    if bad:
        raise ParameterError(f"{who}: {name} must be >= 0; found {value}")


# -- conjugate gradient ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CGState:
    """Conjugate-gradient iterate.

    Attributes:
        x: the estimate ``(*batch, *event)``.
        r: the residual ``b - (N + λI) x``.
        p: the search direction.
        rr: ``‖r‖²`` per item, real ``(*batch)``.
        b_norm_sq: ``‖b‖²`` per item, real ``(*batch)``.
        residual: ``max_b ‖r_b‖ / ‖b_b‖``.
    """

    x: Tensor
    r: Tensor
    p: Tensor
    rr: Tensor
    b_norm_sq: Tensor
    residual: float


@dataclass(frozen=True, eq=False)
class ConjugateGradient:
    """Conjugate gradient for ``(N + λ I) x = b``, ``N`` Hermitian positive semi-definite.

    Args:
        normal: the map ``x -> N x``, e.g. ``op.normal`` for ``N = AᴴA``.
        lam: Tikhonov weight ``λ >= 0``, a float or a tensor of the batch shape.
        event_ndim: how many trailing dimensions make one item (the rest are batch);
            ``None``: the whole array is one item.
    """

    normal: Callable[[Tensor], Tensor]
    lam: Weight = 0.0
    event_ndim: int | None = None

    def __post_init__(self) -> None:
        _check_weight(self.lam, "lam", "ConjugateGradient")

    def _ndim(self, x: Tensor) -> int:
        return x.ndim if self.event_ndim is None else self.event_ndim

    def _apply(self, x: Tensor) -> Tensor:
        lam = per_item(self.lam, x, self._ndim(x))
        out = self.normal(x)
        return out + lam * x if not (isinstance(lam, float) and lam == 0.0) else out

    def init(self, b: Tensor, x0: Tensor | None = None) -> CGState:
        """Start from ``x0`` (default zeros) for the right-hand side ``b`` ``(*batch, *event)``."""
        nd = self._ndim(b)
        if x0 is None:
            x = torch.zeros_like(b)
            r = b
        else:
            x = _check_x0(x0, b, "ConjugateGradient.init")
            r = b - self._apply(x)
        rr = _sq_norm(r, nd)
        b_sq = _sq_norm(b, nd)
        return CGState(x=x, r=r, p=r, rr=rr, b_norm_sq=b_sq, residual=_ratio(rr, b_sq))

    def step(self, s: CGState) -> CGState:
        nd = self._ndim(s.x)
        q = self._apply(s.p)
        pq = _dot(s.p, q, nd).real  # (*batch), > 0 for a positive definite system
        alpha = torch.where(pq == 0, 0.0, s.rr / torch.where(pq == 0, 1, pq))  # (*batch); NaN propagates
        a = _expand(alpha, nd).to(s.x.dtype)
        x = s.x + a * s.p
        r = s.r - a * q
        rr = _sq_norm(r, nd)
        beta = torch.where(s.rr == 0, 0.0, rr / torch.where(s.rr == 0, 1, s.rr))  # (*batch)
        p = r + _expand(beta, nd).to(s.x.dtype) * s.p
        return dataclasses.replace(s, x=x, r=r, p=p, rr=rr, residual=_ratio(rr, s.b_norm_sq))


def _ratio(rr: Tensor, b_sq: Tensor) -> float:
    """``max_b sqrt(rr_b / b_b)``, 0 where both are zero."""
    return _max_sqrt_ratio(rr, b_sq)


# -- FISTA -----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FISTAState:
    """FISTA iterate.

    Attributes:
        x: the estimate ``x_k``.
        z: the extrapolated point where the next gradient is taken.
        t: the momentum parameter ``t_k``.
        residual: ``max_b ‖x_k - x_{k-1}‖ / ‖x_k‖`` (``inf`` before the first step).
    """

    x: Tensor
    z: Tensor
    t: float
    residual: float


@dataclass(frozen=True, eq=False)
class FISTA:
    """FISTA for ``min_x ½‖A x - y‖² + R(x)``.

    Iteration (Beck & Teboulle 2009), with step ``s = 1 / L``::

        x_k     = prox_{s R}(z_k - s Aᴴ(A z_k - y))
        t_{k+1} = (1 + sqrt(1 + 4 t_k²)) / 2
        z_{k+1} = x_k + (t_k - 1) / t_{k+1} · (x_k - x_{k-1})

    Args:
        op: the forward operator ``A``; ``x`` is ``(*batch, *op.in_shape)``.
        y: data ``(*batch, *op.out_shape)``.
        penalty: the regulariser ``R`` (see :class:`operators.regularizers.Penalty`).
        lipschitz: ``L >= ‖A‖²``; default ``(1.01 ‖A‖)²`` from :meth:`LinearOperator.norm`.
    """

    op: LinearOperator
    y: Tensor
    penalty: Penalty
    lipschitz: float | None = None
    aty: Tensor = dataclasses.field(init=False, repr=False)  # Aᴴy, (*batch, *in_shape)

    def __post_init__(self) -> None:
        if self.lipschitz is None:
            object.__setattr__(self, "lipschitz", (_NORM_SAFETY * self.op.norm(n_iter=_NORM_ITERS)) ** 2)
        if not (self.lipschitz is not None and self.lipschitz > 0 and math.isfinite(self.lipschitz)):
            raise ParameterError(
                f"FISTA: lipschitz must be a finite number > 0 (a bound on ‖A‖²); found {self.lipschitz}"
            )
        object.__setattr__(self, "aty", self.op.adjoint(self.y))

    @property
    def step_size(self) -> float:
        """``1 / L``."""
        assert self.lipschitz is not None
        return 1.0 / self.lipschitz

    def init(self, x0: Tensor | None = None) -> FISTAState:
        """Start from ``x0`` (default zeros)."""
        zeros = _image_zeros(self.op, self.y)
        x = zeros if x0 is None else _check_x0(x0, zeros, "FISTA.init")
        return FISTAState(x=x, z=x, t=1.0, residual=math.inf)

    def step(self, s: FISTAState) -> FISTAState:
        grad = self.op.normal(s.z) - self.aty  # Aᴴ(A z - y)
        x = self.penalty.prox(s.z - self.step_size * grad, self.step_size)
        t = (1 + math.sqrt(1 + 4 * s.t**2)) / 2
        z = x + ((s.t - 1) / t) * (x - s.x)
        return FISTAState(x=x, z=z, t=t, residual=_relative_change(x, s.x, len(self.op.in_shape)))


# -- PDHG ------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PDHGState:
    """Chambolle-Pock iterate (duals of the normalised problem; see :class:`PDHG`).

    Attributes:
        x: the primal estimate ``(*batch, *A.in_shape)``.
        x_bar: the over-relaxed primal ``x_k + θ (x_k - x_{k-1})``.
        p: dual of the data term ``(*batch, *A.out_shape)``.
        q: dual of the ``K`` term ``(*batch, *K.out_shape)``.
        residual: ``max_b ‖x_k - x_{k-1}‖ / ‖x_k‖`` (``inf`` before the first step).
    """

    x: Tensor
    x_bar: Tensor
    p: Tensor
    q: Tensor
    residual: float


@dataclass(frozen=True, eq=False)
class PDHG:
    """Chambolle-Pock for ``min_x ½‖A x - y‖² + λ ‖K x‖₁``.

    Both terms are dualised. With ``a = ‖A‖``, ``k = ‖K‖``, the problem is rescaled to
    unit-norm operators ``Â = A / a``, ``K̂ = K / k``, ``ŷ = y / a`` and weight
    ``μ = λ k / a²`` (same minimiser), and iterated with ``τ σ ‖[Â; K̂]‖² <= 2 τ σ < 1``::

        p     = (p + σ (Â x̄ - ŷ)) / (1 + σ)               prox of σ f*,  f = ½‖· - ŷ‖²
        q     = proj_{‖q_i‖₂ <= μ}(q + σ K̂ x̄)              prox of σ g*,  g = μ‖·‖₂,₁
        x_new = x - τ (Âᴴ p + K̂ᴴ q)
        x̄     = x_new + θ (x_new - x)

    Args:
        op: the forward operator ``A``.
        y: data ``(*batch, *op.out_shape)``.
        K: the sparsifying operator, ``K.in_shape == op.in_shape``.
        lam: ``λ >= 0``, a float or a tensor of the batch shape.
        group_dim: axis of ``K``'s output (counted from the end) whose l2 norm is taken
            before the l1 sum, e.g. ``K.component_dim`` of a FiniteDifference for isotropic
            TV; ``None``: plain (anisotropic) l1, complex magnitude per element.
        op_norm, K_norm: ``‖A‖``, ``‖K‖``; default from :meth:`LinearOperator.norm` (``‖A‖``
            times 1.01, as power iteration approaches it from below).
        step_ratio: ``τ / σ``; ``τ = r · 0.99 / √2``, ``σ = 0.99 / (√2 r)``. Larger moves the
            primal faster.
        theta: over-relaxation ``θ`` in ``[0, 1]``.
    """

    op: LinearOperator
    y: Tensor
    K: LinearOperator
    lam: Weight
    group_dim: int | None = None
    op_norm: float | None = None
    K_norm: float | None = None
    step_ratio: float = 1.0
    theta: float = 1.0

    def __post_init__(self) -> None:
        if self.K.in_shape != self.op.in_shape:
            raise ShapeError(
                f"PDHG: K.in_shape must equal op.in_shape {self.op.in_shape} (both act on the image); "
                f"found {self.K.in_shape}"
            )
        _check_weight(self.lam, "lam", "PDHG")
        if self.group_dim is not None and not -len(self.K.out_shape) <= self.group_dim < 0:
            raise ParameterError(
                f"PDHG: group_dim must be a negative axis of K's output, in [-{len(self.K.out_shape)}, -1], "
                f"or None; found {self.group_dim}"
            )
        if not (self.step_ratio > 0 and 0 <= self.theta <= 1):
            raise ParameterError(
                f"PDHG: step_ratio must be > 0 and theta in [0, 1]; found step_ratio={self.step_ratio}, "
                f"theta={self.theta}"
            )
        if self.op_norm is None:
            object.__setattr__(self, "op_norm", _NORM_SAFETY * self.op.norm(n_iter=_NORM_ITERS))
        if self.K_norm is None:
            object.__setattr__(self, "K_norm", _NORM_SAFETY * self.K.norm(n_iter=_NORM_ITERS))
        for name in ("op_norm", "K_norm"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ParameterError(f"PDHG: {name} must be a finite number > 0; found {v}")

    @property
    def tau(self) -> float:
        """Primal step of the normalised problem."""
        return self.step_ratio * 0.99 / math.sqrt(2)

    @property
    def sigma(self) -> float:
        """Dual step of the normalised problem."""
        return 0.99 / (math.sqrt(2) * self.step_ratio)

    def _mu(self, q: Tensor) -> float | Tensor:
        a, k = self.op_norm, self.K_norm
        assert a is not None and k is not None
        lam = per_item(self.lam, q, len(self.K.out_shape))
        return lam * (k / a**2)

    def init(self, x0: Tensor | None = None) -> PDHGState:
        """Start from ``x0`` (default zeros) with zero duals."""
        zeros = _image_zeros(self.op, self.y)
        x = zeros if x0 is None else _check_x0(x0, zeros, "PDHG.init")
        batch = x.shape[: x.ndim - len(self.op.in_shape)]
        y_dtype = x.dtype if self.op.complex_out else x.real.dtype
        p = torch.zeros(*batch, *self.op.out_shape, dtype=y_dtype, device=x.device)
        q = torch.zeros(*batch, *self.K.out_shape, dtype=x.dtype if self.K.complex_out else x.real.dtype,
                        device=x.device)  # fmt: skip
        return PDHGState(x=x, x_bar=x, p=p, q=q, residual=math.inf)

    def step(self, s: PDHGState) -> PDHGState:
        a, k = self.op_norm, self.K_norm
        assert a is not None and k is not None
        tau, sigma = self.tau, self.sigma
        p = (s.p + sigma * (self.op.forward(s.x_bar) - self.y) / a) / (1 + sigma)
        q = project_group_ball(s.q + (sigma / k) * self.K.forward(s.x_bar), self._mu(s.q), self.group_dim)
        x = s.x - tau * (self.op.adjoint(p) / a + self.K.adjoint(q) / k)
        x_bar = x + self.theta * (x - s.x)
        return PDHGState(x=x, x_bar=x_bar, p=p, q=q, residual=_relative_change(x, s.x, len(self.op.in_shape)))
