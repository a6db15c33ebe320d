"""Post-processing networks (FBPConvNet, Jin et al. 2017): a residual U-Net on a direct reconstruction.

::

    x⁰ = A⁺ y            (op.pseudo_inverse: FBP for CT, zero-filled for MRI; Aᴴ y where there is none)
    x  = x⁰ + U(x⁰)

``U`` is MONAI's :class:`monai.networks.nets.UNet` (``channels = features``, stride 2 at every
level, so ``len(features) - 1`` halvings), followed by a zero-initialised 1x1 convolution:
an untrained network returns ``x⁰`` exactly.

Channels: the U-Net always has 2 input and 2 output channels. A complex image enters as
(real, imag); a real image (CT) as ``(x, 0)``, and only the real part of the output is kept
(:class:`models.blocks.AsChannels`). One set of weights therefore takes both, and the dtype
of the output follows ``x⁰`` per call, as for the other models.

Sizes: images are zero-padded to multiples of ``2**(len(features) - 1)`` and cropped back
(:class:`models.blocks.PadToMultiple`), so any size works (e.g. 197 x 233).

Inputs are scaled by ``max |x⁰|`` per item and the output rescaled (scale invariance).

Example:
    >>> import torch
    >>> from operators.mri import CartesianMRI
    >>> net = UNetPost(UNetPostConfig(features=(4, 8), num_res_units=0))
    >>> op = CartesianMRI(torch.rand(15, 17) > 0.5)
    >>> net(torch.randn(2, 15, 17, dtype=torch.complex64), op).shape
    torch.Size([2, 15, 17])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.blocks import (
    AsChannels,
    PadToMultiple,
    check_image_rank,
    check_spatial_dims,
    initial_image,
    item_scale,
)
from operators.linear import LinearOperator

__all__ = ["UNetPostConfig", "UNetPost"]


@dataclass(frozen=True)
class UNetPostConfig:
    """Configuration of :class:`UNetPost`.

    Attributes:
        features: channels per U-Net level, MONAI ``UNet``'s ``channels`` (at least two
            levels); a list (from JSON) becomes a tuple.
        spatial_dims: 2 (a 2D U-Net per slice) or 3 (a 3D U-Net on ``(D, H, W)``).
        num_res_units: residual units per level (MONAI ``UNet``'s ``num_res_units``).
    """

    features: tuple[int, ...] = (32, 64, 128, 256)
    spatial_dims: int = 2
    num_res_units: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if len(self.features) < 2 or min(self.features) < 1:
            raise ValueError(
                f"UNetPostConfig.features must be at least two positive channel counts (one per level); "
                f"found {self.features}"
            )
        if self.num_res_units < 0:
            raise ValueError(f"UNetPostConfig.num_res_units must be >= 0; found {self.num_res_units}")
        check_spatial_dims(self.spatial_dims, "UNetPostConfig")

    @property
    def multiple(self) -> int:
        """Image sizes the U-Net takes: multiples of ``2**levels`` (``levels = len(features) - 1``)."""
        return 2 ** (len(self.features) - 1)


def _unet(config: UNetPostConfig) -> nn.Module:
    """MONAI's U-Net ``(N, 2, *spatial) -> (N, features[0], *spatial)``, then a zero 1x1 conv to 2."""
    from monai.networks.nets import UNet  # heavy import, only when a U-Net is built

    levels = len(config.features) - 1
    # No conv bias: every convolution but the last is followed by an instance norm, which removes it.
    body = UNet(
        spatial_dims=config.spatial_dims,
        in_channels=2,
        out_channels=config.features[0],
        channels=config.features,
        strides=(2,) * levels,
        num_res_units=config.num_res_units,
        bias=False,
    )
    head = (nn.Conv2d if config.spatial_dims == 2 else nn.Conv3d)(config.features[0], 2, 1)
    nn.init.zeros_(head.weight)  # start as U = 0: the untrained network returns x⁰
    nn.init.zeros_(head.bias)
    return nn.Sequential(body, head)


class UNetPost(nn.Module):
    """A residual U-Net on the direct reconstruction (see the module docstring)."""

    def __init__(self, config: UNetPostConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetPostConfig()
        self.unet = AsChannels(
            PadToMultiple(_unet(self.config), self.config.multiple), self.config.spatial_dims
        )

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """Reconstruct.

        Args:
            y: measurements ``(B, *op.out_shape)``: complex k-space or a real sinogram.
            op: the forward operator.

        Returns:
            images ``(B, *op.in_shape)``: complex for MRI operators, real for CT.
        """
        sd = self.config.spatial_dims
        check_image_rank(op, sd, "UNetPost")
        spatial = op.in_shape[len(op.in_shape) - sd :]
        padded = self.unet.net.padded_shape(spatial)  # self.unet.net: the PadToMultiple
        if math.prod(padded) == self.config.multiple**sd:
            raise ValueError(
                f"UNetPost: images of spatial shape {spatial} are too small for a U-Net of "
                f"{len(self.config.features) - 1} levels (features {self.config.features}): its coarsest "
                "level would be a single pixel, which instance normalisation cannot take; use a shorter "
                "features tuple or larger images"
            )
        x0 = initial_image(y, op)  # (B, *in_shape)
        scale = item_scale(x0, len(op.in_shape))  # (B, 1, ..., 1)
        x = x0 / scale
        return (x + self.unet(x)) * scale

    def config_dict(self) -> dict:
        """Keyword arguments that rebuild this network through the registry."""
        d = asdict(self.config)
        d["features"] = list(self.config.features)  # JSON has no tuples
        return d
