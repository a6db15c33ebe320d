"""Unrolled reconstruction networks: ``model(y, op) -> x``.

Every network here receives the measurement ``y`` and the physics operator ``op``
(a :class:`operators.linear.LinearOperator`) and never re-implements the physics:
coil expansion, FFTs and masks all come from ``op``.

:class:`GradientDescentNet` unrolls ``K`` steps of gradient descent on
``½‖A x − y‖²`` with a learned regulariser ``R_k``::

    x⁰ = A⁺ y                       (op.pseudo_inverse: zero-filled MRI, FBP for CT; else Aᴴ y)
    xᵏ⁺¹ = xᵏ − (ηₖ / L) Aᴴ(A xᵏ − y) + R_k(xᵏ),    L = ‖A‖² (the gradient's Lipschitz constant)

so an untrained network (``R_k = 0``, ``ηₖ = 1``) is plain gradient descent with a step that is
safe for any operator: ``‖A‖ = 1`` for Cartesian MRI, but a CT projector's norm grows with the
number of views and the image size.

Images are complex ``(B, H, W)`` for MRI and real for CT; the CNNs see two real channels
(real and imaginary parts; zero imaginary part for real images). Inputs are scaled by
``max |x⁰|`` per item, so a trained network works whatever the intensity scale of the scan.

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

from models.blocks import AsChannels, conv_stack
from operators.linear import LinearOperator

__all__ = ["GDNetConfig", "GradientDescentNet", "ConvRegularizer"]


#: Power iterations for the step normaliser ``‖A‖²``: exact after one for Cartesian MRI (its normal
#: operator's eigenvalues are 0 and 1), within a few per cent for CT projectors; the learned step
#: ``ηₖ`` absorbs the rest.
NORM_ITERATIONS = 10


class ConvRegularizer(AsChannels):
    """A small residual CNN on 2D images ``(B, H, W)``, complex or real, seen as two real channels.

    :func:`models.blocks.image_cnn` in 2D (the same layers, so saved weights keep loading).

    Args:
        features: channels of the hidden layers.
        depth: number of convolutions (>= 2).
        norm_layer: optional normalisation factory called with the channel count.
    """

    def __init__(
        self, features: int = 32, depth: int = 3, norm_layer: Callable[[int], nn.Module] | None = None
    ) -> None:
        super().__init__(conv_stack(2, 2, features, depth, 2, norm_layer), spatial_dims=2)


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
            y: measurements ``(B, *op.out_shape)``: complex k-space or a real sinogram.
            op: the forward operator; its spatial input shape is ``(H, W)``.

        Returns:
            images ``(B, H, W)``: complex for MRI operators, real for CT.
        """
        try:
            x0 = op.pseudo_inverse(y)  # (B, H, W)
        except NotImplementedError:
            x0 = op.adjoint(y)
        lipschitz = op.norm(n_iter=NORM_ITERATIONS) ** 2
        spatial = tuple(range(-len(op.in_shape), 0))
        scale = x0.abs().amax(dim=spatial, keepdim=True).clamp_min(1e-12)  # (B, 1, 1)
        scale_y = scale.reshape(*scale.shape[: x0.ndim - len(op.in_shape)], *([1] * len(op.out_shape)))
        y = y / scale_y
        x = x0 / scale
        for k in range(self.config.n_iter):
            reg = self.regularizers[0 if self.config.shared_weights else k]
            x = x - (self.steps[k] / lipschitz) * op.adjoint(op.forward(x) - y) + reg(x)
        return x * scale

    def config_dict(self) -> dict:
        """Keyword arguments that rebuild this network through the registry."""
        return asdict(self.config)
