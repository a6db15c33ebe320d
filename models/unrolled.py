"""Unrolled reconstruction networks: ``model(y, op) -> x``.

Every network here receives the measurement ``y`` and the physics operator ``op``
(a :class:`operators.linear.LinearOperator`) and never re-implements the physics:
coil expansion, FFTs and masks all come from ``op``.

:class:`GradientDescentNet` unrolls ``K`` steps of gradient descent on
``½‖A x − y‖²`` with a learned regulariser ``R_k``::

    x⁰ = Aᴴ y
    xᵏ⁺¹ = xᵏ − ηₖ Aᴴ(A xᵏ − y) + R_k(xᵏ)

Images are complex ``(B, H, W)``; the CNNs see them as two real channels.
Inputs are scaled by ``max |Aᴴ y|`` per item, so a trained network works whatever
the intensity scale of the scan.

Example:
    >>> import torch
    >>> from operators.linear import Identity
    >>> net = GradientDescentNet(GDNetConfig(n_iter=2, features=8))
    >>> op = Identity((16, 16), complex_data=True)
    >>> net(torch.randn(3, 16, 16, dtype=torch.complex64), op).shape
    torch.Size([3, 16, 16])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from operators.linear import LinearOperator

__all__ = ["GDNetConfig", "GradientDescentNet", "ConvRegularizer"]


class ConvRegularizer(nn.Module):
    """A small residual CNN on complex images ``(B, H, W)`` seen as two real channels.

    Args:
        features: channels of the hidden layers.
        depth: number of convolutions (>= 2).
        norm_layer: optional normalisation factory called with the channel count.
    """

    def __init__(
        self, features: int = 32, depth: int = 3, norm_layer: Callable[[int], nn.Module] | None = None
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"ConvRegularizer: depth must be >= 2; found {depth}")
        layers: list[nn.Module] = []
        ch = 2
        for _ in range(depth - 1):
            layers.append(nn.Conv2d(ch, features, 3, padding=1))
            if norm_layer is not None:
                layers.append(norm_layer(features))
            layers.append(nn.LeakyReLU(0.1))
            ch = features
        layers.append(nn.Conv2d(ch, 2, 3, padding=1))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)  # start as the identity map: pure gradient descent
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` complex ``(..., H, W)`` -> complex ``(..., H, W)``."""
        lead = x.shape[:-2]
        z = torch.view_as_real(x.reshape(-1, *x.shape[-2:]))  # (N, H, W, 2)
        z = z.permute(0, 3, 1, 2)  # (N, 2, H, W)
        z = self.net(z).permute(0, 2, 3, 1).contiguous()  # (N, H, W, 2)
        return torch.view_as_complex(z).reshape(*lead, *x.shape[-2:])


@dataclass(frozen=True)
class GDNetConfig:
    """Configuration of :class:`GradientDescentNet`.

    Attributes:
        n_iter: number of unrolled iterations ``K``.
        features: hidden channels of each regulariser CNN.
        depth: convolutions per regulariser CNN.
        shared_weights: one regulariser for all iterations instead of one each.
        step_init: initial gradient step ``ηₖ`` (learned).
    """

    n_iter: int = 5
    features: int = 32
    depth: int = 3
    shared_weights: bool = False
    step_init: float = 1.0

    def __post_init__(self) -> None:
        if self.n_iter < 1:
            raise ValueError(f"GDNetConfig.n_iter must be >= 1; found {self.n_iter}")
        if self.features < 1:
            raise ValueError(f"GDNetConfig.features must be >= 1; found {self.features}")


class GradientDescentNet(nn.Module):
    """Unrolled gradient descent with learned CNN regularisers (see the module docstring)."""

    def __init__(self, config: GDNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or GDNetConfig()
        n_blocks = 1 if self.config.shared_weights else self.config.n_iter
        self.regularizers = nn.ModuleList(
            ConvRegularizer(self.config.features, self.config.depth) for _ in range(n_blocks)
        )
        self.steps = nn.Parameter(torch.full((self.config.n_iter,), float(self.config.step_init)))

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """Reconstruct.

        Args:
            y: measurements ``(B, *op.out_shape)``, complex.
            op: the forward operator; its spatial input shape is ``(H, W)``.

        Returns:
            complex images ``(B, H, W)``.
        """
        x0 = op.adjoint(y)  # (B, H, W)
        spatial = tuple(range(-len(op.in_shape), 0))
        scale = x0.abs().amax(dim=spatial, keepdim=True).clamp_min(1e-12)  # (B, 1, 1)
        scale_y = scale.reshape(*scale.shape[: x0.ndim - len(op.in_shape)], *([1] * len(op.out_shape)))
        y = y / scale_y
        x = x0 / scale
        for k in range(self.config.n_iter):
            reg = self.regularizers[0 if self.config.shared_weights else k]
            x = x - self.steps[k] * op.adjoint(op.forward(x) - y) + reg(x)
        return x * scale

    def config_dict(self) -> dict:
        """Keyword arguments that rebuild this network through the registry."""
        return asdict(self.config)
