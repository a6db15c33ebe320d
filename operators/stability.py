"""Stability audit of reconstruction maps (Antun et al. 2020, "On instabilities of deep learning
in image reconstruction", PNAS 117(48)).

A reconstruction map ``f: y -> x̂`` is anything callable on measurements: a learned network
``lambda y: model(y, op)`` or a classical method
``lambda y: reconstruct("cs_tv", y, op).image``. The audit asks how much a small change of the
*image* can change the reconstruction. With measurements ``y`` ``(*batch, *op.out_shape)``, a
reference image ``x`` (the ground truth, or ``f(y)``) and a relative budget ``ε``, per batch item::

    ρ  = ε ‖x‖                                         (the perturbation budget)
    r* = argmax_{‖r‖ <= ρ} ‖f(y + A r) - f(y)‖²        (r in the image domain, A = op)

and reports, for the ``r`` found::

    amplification   = ‖f(y + A r) - f(y)‖ / ‖A r‖     (the map's gain on the data change A r)
    relative_change = ‖f(y + A r) - f(y)‖ / ‖f(y)‖

(with ``x = f(y)``, ``relative_change / ε = ‖f(y + A r) - f(y)‖ / ‖r‖``, the gain on the image
change that the search maximises). Norms are Euclidean over all non-batch axes; images are
complex for MRI operators (``op.complex_in``) and real for CT.

:func:`worst_case_perturbation` searches by projected gradient ascent, with gradients taken by
autograd through ``f`` with respect to ``r`` only (``torch.autograd.grad``, so a model's
parameters never accumulate ``.grad``)::

    r_0     = ρ u / ‖u‖,  u ~ N(0, I) (complex normal for complex images; a seeded generator)
    g_k     = ∇_r ‖f(y + A r_k) - f(y)‖²
    r_{k+1} = Π(r_k + α ρ g_k / ‖g_k‖),   Π(r) = r · min(1, ρ / ‖r‖)

each per item, for ``k < steps``; the iterate among ``r_0 .. r_steps`` with the largest change
is kept per item. This is a local search: its amplification is a lower bound on the true worst
case, never an upper bound. For a linear ``f = B`` the objective is ``‖B A r‖²`` and the search is
a damped power iteration, so ``‖f(y + A r) - f(y)‖ / ‖r‖`` tends to the largest singular value
of ``B A`` (slowly where the top singular values are close).

The search maximises the change for a fixed *image* budget, while ``amplification`` divides by
the *data* change ``‖A r‖``. Where ``A`` has a wide spectrum (CT), a random ``r`` lies mostly
where ``A`` is small, so its ``‖A r‖`` is small and its amplification inflated, even for a
stable map; compare ``relative_change`` as well, which shares the search's normalisation.

:func:`random_perturbation` is the control: ``trials`` random ``r`` on the same sphere
``‖r‖ = ρ``, reporting per item the worst of them (a conservative control: a worst case is
only remarkable if it beats the best of the random tries). Antun et al.'s finding is that for
unstable networks the worst case is far larger than the random control at the same ``ε``.

Classical iterative methods are differentiable through autograd, but backpropagating through
hundreds of iterations costs memory and time. With ``differentiable=False``,
:func:`worst_case_perturbation` does not differentiate: it evaluates ``steps`` random
directions on the sphere and keeps the worst per item, which is exactly
:func:`random_perturbation` with ``trials=steps`` (``search == "random"`` in the result). That
is an honest but weak lower bound. The comparison Antun et al. make for classical methods is
the other one: the worst case found for a network, applied to the classical method with
:func:`evaluate_perturbation`.

``f`` must treat batch items independently and deterministically (put models in ``eval()``
mode). No function here uses the global RNG.

Example:
    >>> import torch
    >>> from operators.linear import Identity
    >>> op = Identity((4,))
    >>> gain = torch.tensor([1.0, 1.0, 1.0, 20.0])  # f amplifies one direction 20x
    >>> f = lambda y: gain * y
    >>> y = torch.ones(2, 4)  # a batch of two
    >>> worst = worst_case_perturbation(f, y, op, y, eps=0.1)
    >>> control = random_perturbation(f, y, op, y, eps=0.1)
    >>> worst.amplification.round(decimals=2)
    tensor([20., 20.])
    >>> bool((control.amplification < worst.amplification).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from operators.errors import ParameterError, ShapeError
from operators.linear import LinearOperator, complex_dtype_for, real_dtype_for

__all__ = [
    "AuditResult",
    "worst_case_perturbation",
    "random_perturbation",
    "evaluate_perturbation",
]

Tensor = torch.Tensor
ReconMap = Callable[[Tensor], Tensor]
Search = Literal["gradient", "random", "given"]


@dataclass(frozen=True, eq=False)
class AuditResult:
    """The perturbation an audit found and what it did to the reconstruction.

    Attributes:
        amplification: ``‖f(y + A r) - f(y)‖ / ‖A r‖`` per item, real ``(*batch)`` (``inf``
            where ``A r = 0`` but the reconstruction changed, ``0`` where neither changed).
        relative_change: ``‖f(y + A r) - f(y)‖ / ‖f(y)‖`` per item, real ``(*batch)``.
        perturbation: the image-domain ``r`` ``(*batch, *op.in_shape)``, ``‖r‖ <= ε ‖x‖`` per item.
        reconstruction: ``f(y + A r)``, the layout ``f`` returns ``(*batch, ...)``.
        baseline: ``f(y)``, the unperturbed reconstruction.
        eps: the relative budget ``ε`` (for :func:`evaluate_perturbation`: the largest
            ``‖r‖ / ‖x‖`` over the items).
        steps: gradient steps (``"gradient"``), random draws (``"random"``), or 0 (``"given"``).
        search: ``"gradient"`` (projected gradient ascent), ``"random"`` (worst of random
            draws) or ``"given"`` (a perturbation passed to :func:`evaluate_perturbation`).
    """

    amplification: Tensor
    relative_change: Tensor
    perturbation: Tensor
    reconstruction: Tensor
    baseline: Tensor
    eps: float
    steps: int
    search: Search


# -- checks and per-item helpers -------------------------------------------------------------------
def _batch_ndim(y: Tensor, op: LinearOperator) -> int:
    n = len(op.out_shape)
    if not isinstance(y, torch.Tensor) or y.ndim < n or tuple(y.shape[y.ndim - n :]) != op.out_shape:
        found = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ShapeError(
            f"y must be measurements of trailing shape op.out_shape = {op.out_shape} (any leading "
            f"batch dimensions); found {found}"
        )
    return y.ndim - n


def _check_batch(t: Tensor, batch: tuple[int, ...], what: str) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape[: len(batch)]) != batch or t.ndim < len(batch):
        found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ShapeError(f"{what} must have the batch shape of y, {batch}, in front; found {found}")


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ParameterError(
            f"eps must be a finite number > 0 (the budget relative to ‖x‖, e.g. 0.01); found {eps!r}"
        )
    return float(eps)


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{name} must be an int >= 1; found {value!r}")
    return value


def _norm(t: Tensor, batch_ndim: int) -> Tensor:
    """``‖t_b‖₂`` over all non-batch axes: real ``(*batch)``."""
    return torch.linalg.vector_norm(t.flatten(start_dim=batch_ndim), dim=-1)  # (*batch)


def _squared_norm_sum(t: Tensor) -> Tensor:
    """``Σ_b ‖t_b‖²``, differentiable everywhere (also at 0, unlike a norm or ``abs`` of complex)."""
    return torch.sum(t.real**2 + t.imag**2) if t.is_complex() else torch.sum(t**2)


def _per_item(v: Tensor, like: Tensor, batch_ndim: int) -> Tensor:
    """``v`` ``(*batch)`` viewed as ``(*batch, 1, ..., 1)`` to broadcast against ``like``."""
    return v.reshape(*v.shape, *([1] * (like.ndim - batch_ndim)))


def _sphere(
    shape: tuple[int, ...], radius: Tensor, batch_ndim: int, dtype: torch.dtype, g: torch.Generator
) -> Tensor:
    """Uniform random points on the per-item spheres ``‖r_b‖ = radius_b``, ``shape = (*batch, *event)``."""
    real = real_dtype_for(dtype)
    u = torch.randn(shape, generator=g, dtype=real)  # drawn on the CPU: the same on every device
    if dtype.is_complex:
        u = torch.complex(u, torch.randn(shape, generator=g, dtype=real))
    u = u.to(radius.device)
    return u * _per_item(radius / _norm(u, batch_ndim), u, batch_ndim)


def _project(r: Tensor, radius: Tensor, batch_ndim: int) -> Tensor:
    """``r_b · min(1, radius_b / ‖r_b‖)``: the projection onto the per-item balls."""
    n = _norm(r, batch_ndim)
    scale = torch.where(n > radius, radius / n.clamp_min(torch.finfo(n.dtype).tiny), torch.ones_like(n))
    return r * _per_item(scale, r, batch_ndim)


@dataclass(frozen=True, eq=False)
class _Setup:
    """What every audit needs: the detached data, ``f(y)``, budgets and the perturbation dtype."""

    y: Tensor
    baseline: Tensor  # f(y)
    radius: Tensor  # ρ_b = ε ‖x_b‖, (*batch)
    batch_ndim: int
    r_dtype: torch.dtype


def _setup(f: ReconMap, y: Tensor, op: LinearOperator, x: Tensor | None, eps: float) -> _Setup:
    if not callable(f):
        raise ParameterError(f"f must be a callable reconstruction map y -> image; found {type(f).__name__}")
    batch_ndim = _batch_ndim(y, op)
    y = y.detach()
    batch = tuple(y.shape[:batch_ndim])
    with torch.no_grad():
        baseline = f(y)
    _check_batch(baseline, batch, "f(y)")
    reference = baseline if x is None else x.detach()
    _check_batch(reference, batch, "x")
    real = real_dtype_for(y.dtype)
    r_dtype = complex_dtype_for(real) if op.complex_in else real
    radius = eps * _norm(reference, batch_ndim).to(device=y.device, dtype=real)  # (*batch)
    return _Setup(y, baseline.detach(), radius, batch_ndim, r_dtype)


class _Worst:
    """Per item, the perturbation with the largest change seen so far."""

    def __init__(self, s: _Setup) -> None:
        self.s = s
        self.change: Tensor | None = None  # (*batch)
        self.r: Tensor | None = None
        self.out: Tensor | None = None

    def offer(self, r: Tensor, out: Tensor) -> None:
        change = _norm(out - self.s.baseline, self.s.batch_ndim)  # (*batch)
        if self.change is None or self.r is None or self.out is None:
            self.change, self.r, self.out = change, r, out
            return
        better = change > self.change  # (*batch)
        nb = self.s.batch_ndim
        self.r = torch.where(_per_item(better, r, nb), r, self.r)
        self.out = torch.where(_per_item(better, out, nb), out, self.out)
        self.change = torch.where(better, change, self.change)


def _result(
    s: _Setup, op: LinearOperator, r: Tensor, out: Tensor, eps: float, steps: int, search: Search
) -> AuditResult:
    nb = s.batch_ndim
    with torch.no_grad():
        change = _norm(out - s.baseline, nb)  # (*batch)
        data = _norm(op.forward(r), nb)  # ‖A r‖, (*batch)
        tiny = torch.finfo(change.dtype).tiny
        amplification = torch.where(
            data > 0,
            change / data.clamp_min(tiny),
            torch.where(change > 0, torch.full_like(change, math.inf), torch.zeros_like(change)),
        )
        relative = change / _norm(s.baseline, nb).clamp_min(tiny)
    return AuditResult(
        amplification=amplification,
        relative_change=relative,
        perturbation=r,
        reconstruction=out,
        baseline=s.baseline,
        eps=eps,
        steps=steps,
        search=search,
    )


# -- the audits ------------------------------------------------------------------------------------
def worst_case_perturbation(
    f: ReconMap,
    y: Tensor,
    op: LinearOperator,
    x: Tensor | None,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    seed: int = 0,
    differentiable: bool = True,
) -> AuditResult:
    """The perturbation ``‖r‖ <= ε‖x‖`` that changes ``f(y + A r)`` most, by projected gradient ascent.

    See the module docstring for the iteration. Costs ``steps`` forward and backward passes of
    ``f`` and ``steps + 2`` forward passes without gradients.

    Args:
        f: the reconstruction map, ``f(y)`` ``(*batch, ...)`` for ``y`` ``(*batch, *op.out_shape)``;
            items must be independent.
        y: measurements ``(*batch, *op.out_shape)``.
        op: the forward operator ``A`` the perturbation goes through (``y + A r``).
        x: the reference image ``(*batch, ...)`` whose norm sets the budget (the ground truth),
            or None for ``x = f(y)``.
        eps: the budget ``ε > 0`` relative to ``‖x‖``, per item.
        steps: gradient steps (or random draws when ``differentiable=False``).
        step_size: ``α``, the step length relative to the budget ``ρ``; default 1 (each step
            moves by ``ρ`` before the projection; larger steps approach plain power iteration,
            ``r_{k+1} = ρ g_k / ‖g_k‖``).
        seed: seed of the random start (a private generator; the global RNG is untouched).
        differentiable: False: no autograd through ``f``; the worst of ``steps`` random
            directions instead (exactly :func:`random_perturbation` with ``trials=steps``).

    Returns:
        An :class:`AuditResult` with ``search == "gradient"`` (or ``"random"``).

    Raises:
        ShapeError: ``y`` does not end with ``op.out_shape``, or ``x`` or ``f(y)`` lack its batch shape.
        ParameterError: ``eps``, ``steps`` or ``step_size`` out of range.
    """
    eps = _check_eps(eps)
    steps = _check_count(steps, "steps")
    step_size = 1.0 if step_size is None else step_size
    if isinstance(step_size, bool) or not (isinstance(step_size, (int, float)) and 0 < step_size < math.inf):
        raise ParameterError(
            f"step_size must be a finite number > 0 (the step relative to the budget, e.g. 0.5); "
            f"found {step_size!r}"
        )
    if not differentiable:
        return random_perturbation(f, y, op, x, eps=eps, trials=steps, seed=seed)
    s = _setup(f, y, op, x, eps)
    nb = s.batch_ndim
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = _sphere((*s.y.shape[:nb], *op.in_shape), s.radius, nb, s.r_dtype, g)  # (*batch, *in_shape)
    worst = _Worst(s)
    for _ in range(steps):
        r_var = r.detach().requires_grad_(True)
        with torch.enable_grad():
            out = f(s.y + op.forward(r_var))  # (*batch, ...)
            (grad,) = torch.autograd.grad(_squared_norm_sum(out - s.baseline), r_var)
        worst.offer(r, out.detach())
        gn = _norm(grad, nb)  # (*batch)
        direction = grad * _per_item(1 / gn.clamp_min(torch.finfo(gn.dtype).tiny), grad, nb)
        r = _project(r + step_size * _per_item(s.radius, r, nb) * direction, s.radius, nb)
    with torch.no_grad():
        worst.offer(r, f(s.y + op.forward(r)))
    assert worst.r is not None and worst.out is not None
    return _result(s, op, worst.r, worst.out, eps, steps, "gradient")


def random_perturbation(
    f: ReconMap,
    y: Tensor,
    op: LinearOperator,
    x: Tensor | None,
    *,
    eps: float,
    trials: int = 5,
    seed: int = 0,
) -> AuditResult:
    """The control: the worst per item of ``trials`` random ``r`` with ``‖r‖ = ε‖x‖``.

    ``r`` is uniform on the sphere (complex normal direction for complex images). No
    gradients; ``trials + 1`` evaluations of ``f``. Arguments as for
    :func:`worst_case_perturbation`.

    Returns:
        An :class:`AuditResult` with ``search == "random"`` and ``steps == trials``.
    """
    eps = _check_eps(eps)
    trials = _check_count(trials, "trials")
    s = _setup(f, y, op, x, eps)
    nb = s.batch_ndim
    g = torch.Generator(device="cpu").manual_seed(seed)
    worst = _Worst(s)
    with torch.no_grad():
        for _ in range(trials):
            r = _sphere((*s.y.shape[:nb], *op.in_shape), s.radius, nb, s.r_dtype, g)  # (*batch, *in_shape)
            worst.offer(r, f(s.y + op.forward(r)))
    assert worst.r is not None and worst.out is not None
    return _result(s, op, worst.r, worst.out, eps, trials, "random")


def evaluate_perturbation(
    f: ReconMap, y: Tensor, op: LinearOperator, x: Tensor | None, r: Tensor
) -> AuditResult:
    """The effect on ``f`` of a given perturbation ``r`` ``(*batch, *op.in_shape)``.

    Use it to apply the worst case found for one map to another, as Antun et al. do for
    classical methods: ``evaluate_perturbation(cs, y, op, x, audit_of_net.perturbation)``.

    Returns:
        An :class:`AuditResult` with ``search == "given"``, ``steps == 0`` and ``eps`` the
        largest ``‖r_b‖ / ‖x_b‖`` over the items.
    """
    s = _setup(f, y, op, x, 1.0)  # radius = ‖x‖ per item
    nb = s.batch_ndim
    _check_batch(r, tuple(s.y.shape[:nb]), "r")
    r = r.detach()
    with torch.no_grad():
        out = f(s.y + op.forward(r))
        eps = float((_norm(r, nb) / s.radius.clamp_min(torch.finfo(s.radius.dtype).tiny)).max())
    return _result(s, op, r, out, eps, 0, "given")
