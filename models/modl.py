"""MoDL (Aggarwal, Mani & Jacob 2019): a shared CNN denoiser alternating with exact data consistency.

Each of ``K`` iterations denoises, then solves the regularised normal equations::

    zᵏ   = D(xᵏ) = xᵏ + N(xᵏ)                       (one residual CNN shared by all iterations)
    xᵏ⁺¹ = argmin_x ‖A x − y‖² + λ ‖x − zᵏ‖²  =  (AᴴA + λ I)⁻¹ (Aᴴ y + λ zᵏ)

from ``x⁰ = A⁺ y`` (``op.pseudo_inverse``: zero-filled MRI, FBP for CT; ``Aᴴ y`` where there is
none). The solve is ``cg_iter`` steps of conjugate gradient
(:func:`data_consistency`, written against ``op.normal``, with inner products per batch
item), unrolled so that autograd differentiates through it, warm-started at ``zᵏ``.

``λ = softplus(ρ) · ‖A‖²`` with ``ρ`` learned: the weight is relative to the operator's scale
(``‖A‖ = 1`` for Cartesian MRI, much larger for CT projectors), so one ``lam_init`` suits
every operator. ``N`` starts at zero, so an untrained network is proximal-point iteration
towards the least-squares solution from ``x⁰``.

Inputs are scaled by ``max |x⁰|`` per item and the output rescaled (scale invariance).

Example:
    >>> import torch
    >>> from operators.mri import CartesianMRI
    >>> net = MoDL(MoDLConfig(n_iter=2, cg_iter=4, features=8))
    >>> op = CartesianMRI(torch.rand(16, 16) > 0.5)
    >>> net(torch.randn(3, 16, 16, dtype=torch.complex64), op).shape
    torch.Size([3, 16, 16])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from models.blocks import (
    check_image_rank,
    check_spatial_dims,
    image_cnn,
    initial_image,
    item_scale,
    measurement_scale,
)
from models.unrolled import NORM_ITERATIONS
from operators.linear import LinearOperator

__all__ = ["MoDLConfig", "MoDL", "data_consistency"]


def data_consistency(
    op: LinearOperator,
    rhs: torch.Tensor,
    lam: torch.Tensor | float,
    n_iter: int,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(AᴴA + λ I)⁻¹ rhs`` by ``n_iter`` differentiable conjugate-gradient steps, per batch item.

    Each item ``b`` of ``rhs`` ``(*batch, *op.in_shape)`` is its own system: step sizes come from
    its own inner products, and ``λ`` may differ per item. The number of steps is fixed (no
    early stop and no device-to-host read), so the graph is the same every call; an item whose
    residual has fallen to rounding level (``‖r‖ < 100 ε ‖r₀‖``, ε the dtype's machine epsilon:
    about 1e-5 in float32, 2e-14 in float64) stays put. Without
    that floor, CG on a well-conditioned system (Cartesian MRI: ``AᴴA + λI`` has two eigenvalues,
    so CG is exact after two steps) goes on dividing rounding noise by rounding noise, and the
    backward pass through those quotients overflows to NaN in float32.

    This is :class:`operators.solvers.ConjugateGradient`'s iteration without its driver state:
    that solver reports a float residual every step for :func:`operators.solvers.solve`, a
    device synchronisation that an unrolled network layer does not want.

    Args:
        op: the operator ``A`` (only ``op.normal`` is used).
        rhs: the right-hand side, e.g. ``Aᴴ y + λ z``.
        lam: ``λ > 0``: a float, a scalar tensor, or a tensor of the batch shape (one per item).
        n_iter: CG steps.
        x0: the starting point (default zeros), shaped like ``rhs``.

    Returns:
        the approximate solution, shaped like ``rhs``.
    """
    n_event = len(op.in_shape)
    dims = tuple(range(-n_event, 0))

    def per_item(v: torch.Tensor) -> torch.Tensor:  # (*batch) -> (*batch, 1, ..., 1)
        return v.reshape(*v.shape, *([1] * n_event))

    if isinstance(lam, torch.Tensor) and lam.ndim > 0:
        lam = per_item(lam)  # one λ per item

    def system(v: torch.Tensor) -> torch.Tensor:  # (AᴴA + λ I) v
        return op.normal(v) + lam * v

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # Re <a_b, b_b> per item, (*batch)
        return (torch.conj(a) * b).real.sum(dim=dims) if a.is_complex() else (a * b).sum(dim=dims)

    x = torch.zeros_like(rhs) if x0 is None else x0
    r = rhs if x0 is None else rhs - system(x0)  # (*batch, *event)
    p = r
    rr = dot(r, r)  # (*batch)
    eps = torch.finfo(rr.dtype).eps
    floor = (100 * eps) ** 2 * rr.detach()  # converged below this: no more steps for that item

    def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:  # num / den, 0 once converged
        ok = den > floor
        return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))

    for _ in range(n_iter):
        q = system(p)
        alpha = per_item(safe_div(rr, dot(p, q)))  # (*batch, 1, ..., 1)
        x = x + alpha * p
        r = r - alpha * q
        rr_next = dot(r, r)
        p = r + per_item(safe_div(rr_next, rr)) * p
        rr = rr_next
    return x


@dataclass(frozen=True)
class MoDLConfig:
    """Configuration of :class:`MoDL`.

    Attributes:
        n_iter: ``K``, denoiser / data-consistency iterations.
        cg_iter: conjugate-gradient steps per data-consistency solve.
        features: hidden channels of the denoiser CNN.
        depth: convolutions of the denoiser CNN (>= 2).
        lam_init: initial ``λ / ‖A‖²`` (learned, kept positive by a softplus).
        spatial_dims: 2 (a 2D CNN per slice) or 3 (a 3D CNN on ``(D, H, W)``).
    """

    n_iter: int = 5
    cg_iter: int = 10
    features: int = 32
    depth: int = 3
    lam_init: float = 0.05
    spatial_dims: int = 2

    def __post_init__(self) -> None:
        for name in ("n_iter", "cg_iter", "features"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoDLConfig.{name} must be >= 1; found {getattr(self, name)}")
        if self.depth < 2:
            raise ValueError(f"MoDLConfig.depth must be >= 2; found {self.depth}")
        if not (self.lam_init > 0 and math.isfinite(self.lam_init)):
            raise ValueError(f"MoDLConfig.lam_init must be a finite number > 0; found {self.lam_init}")
        check_spatial_dims(self.spatial_dims, "MoDLConfig")


def _inverse_softplus(value: float) -> float:
    """``ρ`` with ``softplus(ρ) = value`` (``value > 0``)."""
    return value + math.log(-math.expm1(-value))


class MoDL(nn.Module):
    """MoDL (see the module docstring).

    Args:
        config: the configuration (defaults when None).
        denoiser: the residual ``N`` in ``D(x) = x + N(x)``, on images ``(..., *spatial)``, real or
            complex; default a zero-initialised CNN of ``config.features`` and ``config.depth``.
    """

    def __init__(self, config: MoDLConfig | None = None, denoiser: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config or MoDLConfig()
        c = self.config
        self.denoiser = denoiser if denoiser is not None else image_cnn(c.features, c.depth, c.spatial_dims)
        self.lam_raw = nn.Parameter(torch.tensor(_inverse_softplus(c.lam_init)))

    @property
    def lam(self) -> torch.Tensor:
        """``λ / ‖A‖² = softplus(ρ)``, a positive scalar."""
        return F.softplus(self.lam_raw)

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """Reconstruct.

        Args:
            y: measurements ``(B, *op.out_shape)``: complex k-space or a real sinogram.
            op: the forward operator.

        Returns:
            images ``(B, *op.in_shape)``: complex for MRI operators, real for CT.
        """
        check_image_rank(op, self.config.spatial_dims, "MoDL")
        x0 = initial_image(y, op)  # (B, *in_shape)
        scale = item_scale(x0, len(op.in_shape))  # (B, 1, ..., 1)
        y = y / measurement_scale(scale, op)
        x = x0 / scale
        lam = self.lam * op.norm(n_iter=NORM_ITERATIONS) ** 2  # λ, relative to ‖A‖²
        aty = op.adjoint(y)  # (B, *in_shape)
        for _ in range(self.config.n_iter):
            z = x + self.denoiser(x)  # D(x)
            x = data_consistency(op, aty + lam * z, lam, self.config.cg_iter, x0=z)
        return x * scale

    def config_dict(self) -> dict:
        """Keyword arguments that rebuild this network through the registry."""
        return asdict(self.config)
