"""End-to-end variational network (Sriram et al. 2020) for multi-coil Cartesian MRI.

The state is multi-coil k-space ``k`` ``(B, C, H, W)``. With ``E = F S`` the fully sampled
SENSE operator for coil maps ``S`` estimated from the data, ``Eᴴ`` its adjoint (the coil
combination) and ``M`` the sampling mask, each of ``T`` cascades updates::

    kᵗ⁺¹ = kᵗ − ηₜ M (kᵗ − y) + E Rₜ(Eᴴ kᵗ),        k⁰ = y,    x = Eᴴ kᵀ

with a learned soft data-consistency weight ``ηₜ`` (initially 1: hard data consistency) and a
CNN ``Rₜ`` per cascade that refines the coil-combined image; ``Rₜ`` starts at zero.

Coil maps: a sensitivity network takes the fully sampled centre of ``y`` (the ACS lines: the
contiguous run of sampled columns around the centre column ``W // 2``, read from ``op.mask``
at the centre row, per item), transforms each coil to image space, refines each coil image
with a residual CNN (zero at initialisation: the classic low-resolution ACS maps) and
normalises so that ``Σ_c |S_c|² = 1`` (up to ``1e-6`` where there is no signal at all).

The physics stays in the operator: ``E = op.with_maps(S).with_mask(1)``, ``M = op.parts[0]``
and the per-coil inverse FFT of the sensitivity network is ``op.parts[1].adjoint``. Only
2D :class:`operators.mri.SENSE` operators apply; anything else raises a TypeError.

Inputs are scaled by ``max`` of the root-sum-of-squares image ``√Σ_c |Fᴴ y_c|²`` per item and
the output rescaled (scale invariance). The output is the complex image ``(B, H, W)``.

Example:
    >>> import torch
    >>> from operators.mri import birdcage_maps, sense
    >>> mask = torch.zeros(16, 16, dtype=torch.bool); mask[:, ::2] = True; mask[:, 6:10] = True
    >>> op = sense(mask, birdcage_maps((16, 16), 4))
    >>> net = VarNet(VarNetConfig(n_cascades=2, features=8, sens_features=4))
    >>> net(op.forward(torch.randn(2, 16, 16, dtype=torch.complex64)), op).shape
    torch.Size([2, 16, 16])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.blocks import image_cnn, item_scale, measurement_scale
from operators.linear import LinearOperator
from operators.mri import SENSE

__all__ = ["VarNetConfig", "VarNet", "SensitivityNet", "acs_window"]

#: Floor of the root-sum-of-squares that normalises the estimated maps (data scaled to max 1).
MAPS_EPS = 1e-6


def acs_window(mask: torch.Tensor) -> torch.Tensor:
    """The ACS columns of ``mask``: 1 on the contiguous run of sampled columns around ``W // 2``.

    A column counts as sampled where the mask is non-zero at the centre row ``H // 2`` (for
    line masks every row is the same).

    Args:
        mask: ``(*batch, H, W)`` real or bool.

    Returns:
        float ``(*batch, W)``: 1 inside the run, 0 elsewhere (all 0 if column ``W // 2`` is not sampled).
    """
    h, w = mask.shape[-2:]
    sampled = (mask[..., h // 2, :] != 0).to(torch.int64)  # (*batch, W)
    c = w // 2
    right = torch.cumprod(sampled[..., c:], dim=-1).sum(dim=-1)  # run length from c rightwards, (*batch)
    left = torch.cumprod(sampled[..., :c].flip(-1), dim=-1).sum(dim=-1)  # leftwards from c - 1
    left = torch.where(right > 0, left, torch.zeros_like(left))  # no run unless c itself is sampled
    cols = torch.arange(w, device=mask.device)  # (W,)
    start, stop = (c - left).unsqueeze(-1), (c + right).unsqueeze(-1)  # (*batch, 1)
    return ((cols >= start) & (cols < stop)).to(torch.float32)  # (*batch, W)


class SensitivityNet(nn.Module):
    """Coil maps ``(B, C, H, W)`` from the ACS lines of multi-coil k-space, with ``Σ_c |S_c|² = 1``.

    Args:
        features: hidden channels of the per-coil CNN.
        depth: convolutions of the per-coil CNN (>= 2).
    """

    def __init__(self, features: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.cnn = image_cnn(features, depth, spatial_dims=2)

    def forward(self, y: torch.Tensor, op: SENSE) -> torch.Tensor:
        """``y`` ``(B, C, H, W)`` k-space of ``op`` -> maps ``(B, C, H, W)`` complex."""
        window = acs_window(op.mask)  # (*batch, W)
        if bool((window.sum(dim=-1) == 0).any()):
            w = op.in_shape[-1]
            raise ValueError(
                f"VarNet: the mask does not sample the centre column W // 2 = {w // 2}, so there are no "
                "ACS lines to estimate coil maps from; use a mask with a fully sampled centre "
                "(center_fraction > 0)"
            )
        acs = y * window.unsqueeze(-2).unsqueeze(-2).to(y.device)  # (B, C, H, W), window (*batch, 1, 1, W)
        coils = op.parts[1].adjoint(acs)  # per-coil images Fᴴ(ACS ⊙ y), (B, C, H, W)
        maps = coils + self.cnn(coils)  # (B, C, H, W)
        rss = torch.sqrt(
            (maps.real**2 + maps.imag**2).sum(dim=-3, keepdim=True) + MAPS_EPS**2
        )  # (B, 1, H, W)
        return maps / rss


@dataclass(frozen=True)
class VarNetConfig:
    """Configuration of :class:`VarNet`.

    Attributes:
        n_cascades: ``T``, the number of cascades.
        features: hidden channels of each cascade's refinement CNN.
        depth: convolutions of each refinement CNN (>= 2).
        sens_features: hidden channels of the sensitivity network's CNN.
        sens_depth: convolutions of the sensitivity network's CNN (>= 2).
        dc_init: initial data-consistency weight ``ηₜ`` (learned).
    """

    n_cascades: int = 4
    features: int = 32
    depth: int = 3
    sens_features: int = 8
    sens_depth: int = 3
    dc_init: float = 1.0

    def __post_init__(self) -> None:
        for name in ("n_cascades", "features", "sens_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"VarNetConfig.{name} must be >= 1; found {getattr(self, name)}")
        for name in ("depth", "sens_depth"):
            if getattr(self, name) < 2:
                raise ValueError(f"VarNetConfig.{name} must be >= 2; found {getattr(self, name)}")


class VarNet(nn.Module):
    """End-to-end variational network with estimated coil maps (see the module docstring)."""

    def __init__(self, config: VarNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or VarNetConfig()
        c = self.config
        self.sens = SensitivityNet(c.sens_features, c.sens_depth)
        self.refiners = nn.ModuleList(
            image_cnn(c.features, c.depth, spatial_dims=2) for _ in range(c.n_cascades)
        )
        self.dc_weights = nn.Parameter(torch.full((c.n_cascades,), float(c.dc_init)))

    @staticmethod
    def check_operator(op: LinearOperator) -> SENSE:
        """``op`` if it is a 2D SENSE operator; a TypeError naming what was found otherwise."""
        if not isinstance(op, SENSE):
            raise TypeError(
                f"VarNet needs a multi-coil operators.mri.SENSE operator (build one with "
                f"operators.mri.sense(mask, coil_maps)); found {type(op).__name__}. For single-coil MRI "
                "or CT use 'unrolled_gd', 'modl', 'neumann' or 'unet_post'"
            )
        if op.ndim != 2:
            raise TypeError(f"VarNet needs a 2D SENSE operator (ndim=2); found SENSE with ndim={op.ndim}")
        return op

    def estimate_maps(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """Coil maps ``(B, C, H, W)`` estimated from ``y`` ``(B, C, H, W)`` (any scale)."""
        op = self.check_operator(op)
        return self.sens(y / measurement_scale(self._scale(y, op), op), op)

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """Reconstruct.

        Args:
            y: multi-coil k-space ``(B, C, H, W)`` complex.
            op: a 2D SENSE operator; its coil maps are not used (the network estimates its own),
                its mask is.

        Returns:
            complex images ``(B, H, W)``.
        """
        op = self.check_operator(op)
        scale = self._scale(y, op)  # (B, 1, 1)
        y = y / measurement_scale(scale, op)  # (B, C, H, W)
        maps = self.sens(y, op)  # (B, C, H, W)
        expand = op.with_mask(torch.ones_like(op.mask)).with_maps(maps)  # E = F S, fully sampled
        sampling = op.parts[0]  # M ⊙ ·
        k = y
        for t, refine in enumerate(self.refiners):
            k = k - self.dc_weights[t] * sampling.forward(k - y) + expand.forward(refine(expand.adjoint(k)))
        return expand.adjoint(k) * scale

    @staticmethod
    def _scale(y: torch.Tensor, op: SENSE) -> torch.Tensor:
        """``max √Σ_c |Fᴴ y_c|²`` per item, ``(B, 1, 1)``."""
        coils = op.parts[1].adjoint(y)  # (B, C, H, W)
        sos = (coils.real**2 + coils.imag**2).sum(dim=-3)  # Σ_c |Fᴴ y_c|², (B, H, W)
        return item_scale(sos, 2).sqrt()  # the root after the max: no 0 · ∞ in autograd where sos = 0

    def config_dict(self) -> dict:
        """Keyword arguments that rebuild this network through the registry."""
        return asdict(self.config)
