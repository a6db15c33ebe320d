"""Building blocks shared by the reconstruction networks: image CNNs, padding, per-item scaling.

Images are complex ``(..., *spatial)`` for MRI and real for CT. Networks in ``torch.nn`` see
real tensors ``(N, 2, *spatial)``: the real and imaginary parts as two channels (a real image
is ``x + 0i``, and only the real part of the output is kept). :class:`AsChannels` does that
conversion around any such network, so one set of weights serves MRI and CT alike.

Scale: every model divides its input by ``s = max |x⁰|`` per item (``x⁰`` a first image from
the data) and multiplies its output by ``s``, so a trained network works whatever the
intensity scale of the scan (:func:`item_scale`, :func:`measurement_scale`).

Example:
    >>> import torch
    >>> cnn = image_cnn(features=8, depth=3, spatial_dims=2)
    >>> x = torch.randn(2, 3, 15, 17, dtype=torch.complex64)  # (..., H, W)
    >>> cnn(x).shape, cnn(x).dtype
    (torch.Size([2, 3, 15, 17]), torch.complex64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from operators.linear import LinearOperator

__all__ = [
    "AsChannels",
    "PadToMultiple",
    "conv_stack",
    "image_cnn",
    "image_unet",
    "initial_image",
    "item_scale",
    "measurement_scale",
    "check_spatial_dims",
    "check_image_rank",
]

_CONV: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}


def check_spatial_dims(spatial_dims: int, owner: str) -> None:
    """ValueError unless ``spatial_dims`` is 2 or 3."""
    if spatial_dims not in _CONV:
        raise ValueError(f"{owner}.spatial_dims must be 2 or 3; found {spatial_dims!r}")


class AsChannels(nn.Module):
    """Apply a network on real ``(N, 2, *spatial)`` tensors to images ``(..., *spatial)``.

    Complex images enter as ``(real, imag)``; real images as ``(x, 0)``, and the real part
    (channel 0) of the output is returned. Leading dimensions are flattened into ``N``, so a
    2D network applied to a volume ``(B, D, H, W)`` runs slice by slice.

    Args:
        net: maps ``(N, 2, *spatial)`` to ``(N, 2, *spatial)``.
        spatial_dims: number of trailing spatial dimensions (2 or 3).
    """

    def __init__(self, net: nn.Module, spatial_dims: int = 2) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims, "AsChannels")
        self.net = net
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., *spatial)`` complex or real -> the same shape and dtype."""
        nd = self.spatial_dims
        if x.ndim < nd:
            raise ValueError(
                f"AsChannels: images must have at least spatial_dims={nd} dimensions; "
                f"found shape {tuple(x.shape)}"
            )
        lead, spatial = x.shape[: x.ndim - nd], x.shape[x.ndim - nd :]
        flat = x.reshape(-1, *spatial)  # (N, *spatial)
        if x.is_complex():
            z = torch.view_as_real(flat).movedim(-1, 1)  # (N, 2, *spatial)
        else:
            z = torch.stack([flat, torch.zeros_like(flat)], dim=1)  # (N, 2, *spatial): x + 0i
        out = self.net(z)  # (N, 2, *spatial)
        if not x.is_complex():
            return out[:, 0].reshape(*lead, *spatial)  # the real part
        out = out.movedim(1, -1).contiguous()  # (N, *spatial, 2)
        return torch.view_as_complex(out).reshape(*lead, *spatial)


class PadToMultiple(nn.Module):
    """Zero-pad ``(N, C, *spatial)`` to multiples of ``multiple``, apply ``net``, crop back.

    The padding is split evenly between both ends of each dimension (the odd pixel at the
    end), so the image stays centred. A U-Net with ``L`` stride-2 levels needs
    ``multiple = 2**L``; with this wrapper it takes any size, e.g. ``197 x 233``.

    Args:
        net: maps ``(N, C, *padded)`` to ``(N, C', *padded)``.
        multiple: every padded spatial size is a multiple of this.
    """

    def __init__(self, net: nn.Module, multiple: int) -> None:
        super().__init__()
        if multiple < 1:
            raise ValueError(f"PadToMultiple.multiple must be >= 1; found {multiple}")
        self.net = net
        self.multiple = multiple

    def padded_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial shape ``net`` sees for images of shape ``spatial``."""
        m = self.multiple
        return tuple(-(-n // m) * m for n in spatial)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` ``(N, C, *spatial)`` -> ``(N, C', *spatial)``."""
        spatial = tuple(z.shape[2:])
        extra = [p - n for p, n in zip(self.padded_shape(spatial), spatial, strict=True)]
        pad: list[int] = []
        for e in reversed(extra):  # F.pad takes (left, right) pairs from the last dimension back
            pad += [e // 2, e - e // 2]
        out = self.net(F.pad(z, pad) if any(extra) else z)  # (N, C', *padded)
        crop = tuple(slice(e // 2, e // 2 + n) for e, n in zip(extra, spatial, strict=True))
        return out[(slice(None), slice(None), *crop)]  # (N, C', *spatial)


def conv_stack(
    in_channels: int,
    out_channels: int,
    features: int,
    depth: int,
    spatial_dims: int = 2,
    norm_layer: Callable[[int], nn.Module] | None = None,
    zero_last: bool = True,
) -> nn.Sequential:
    """``depth`` 3x3(x3) convolutions with LeakyReLU between them: ``in -> features -> ... -> out``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        features: channels of the hidden layers.
        depth: number of convolutions (>= 2).
        spatial_dims: 2 (``Conv2d``) or 3 (``Conv3d``).
        norm_layer: optional normalisation factory called with the channel count.
        zero_last: zero the last convolution, so the stack starts as the zero map.
    """
    check_spatial_dims(spatial_dims, "conv_stack")
    if depth < 2:
        raise ValueError(f"conv_stack: depth must be >= 2; found {depth}")
    if features < 1:
        raise ValueError(f"conv_stack: features must be >= 1; found {features}")
    conv = _CONV[spatial_dims]
    layers: list[nn.Module] = []
    ch = in_channels
    for _ in range(depth - 1):
        layers.append(conv(ch, features, 3, padding=1))
        if norm_layer is not None:
            layers.append(norm_layer(features))
        layers.append(nn.LeakyReLU(0.1))
        ch = features
    last = conv(ch, out_channels, 3, padding=1)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def image_cnn(
    features: int = 32,
    depth: int = 3,
    spatial_dims: int = 2,
    norm_layer: Callable[[int], nn.Module] | None = None,
) -> AsChannels:
    """A plain CNN on images ``(..., *spatial)`` (real or complex), zero at initialisation.

    The N-d form of :class:`models.unrolled.ConvRegularizer`: used as a residual
    ``x + cnn(x)`` or an update ``x - cnn(x)``, an untrained network is the identity.
    """
    return AsChannels(conv_stack(2, 2, features, depth, spatial_dims, norm_layer), spatial_dims)


def image_unet(features: int = 32, levels: int = 2, spatial_dims: int = 2) -> AsChannels:
    """A multi-scale CNN on images ``(..., *spatial)`` (real or complex), zero at initialisation.

    MONAI's :class:`~monai.networks.nets.UNet` with channels ``features · 2^i`` for
    ``i = 0..levels`` (``levels`` stride-2 halvings), LeakyReLU and **no normalisation**,
    followed by a zero-initialised 1x1 convolution; any image size (zero-padded to a multiple
    of ``2**levels`` and cropped back, :class:`PadToMultiple`).

    No normalisation, because the map must be homogeneous-ish in its input's scale: as the
    regulariser of a Neumann series it acts on terms that shrink from one to the next, and an
    instance norm would return an output of unit scale for every term, so the series would not
    converge. Its receptive field spans the image (a 3x3 stack of depth 3 sees 7x7 pixels).
    """
    from monai.networks.nets import UNet  # heavy import, only when a U-Net is built

    check_spatial_dims(spatial_dims, "image_unet")
    if levels < 1:
        raise ValueError(f"image_unet: levels must be >= 1; found {levels}")
    if features < 1:
        raise ValueError(f"image_unet: features must be >= 1; found {features}")
    channels = tuple(features * 2**i for i in range(levels + 1))
    body = UNet(
        spatial_dims=spatial_dims,
        in_channels=2,
        out_channels=features,
        channels=channels,
        strides=(2,) * levels,
        num_res_units=0,
        act=("leakyrelu", {"negative_slope": 0.1}),
        norm=None,
    )
    head = _CONV[spatial_dims](features, 2, 1)
    nn.init.zeros_(head.weight)  # start as the zero map
    nn.init.zeros_(head.bias)
    return AsChannels(PadToMultiple(nn.Sequential(body, head), 2**levels), spatial_dims)


def initial_image(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
    """``A⁺ y`` (``op.pseudo_inverse``: zero-filled MRI, FBP for CT), or ``Aᴴ y`` where there is none."""
    try:
        return op.pseudo_inverse(y)
    except NotImplementedError:
        return op.adjoint(y)


def item_scale(x: torch.Tensor, n_event: int) -> torch.Tensor:
    """``max |x|`` over the last ``n_event`` dimensions, kept as ``(*batch, 1, ..., 1)``, at least 1e-12."""
    dims = tuple(range(-n_event, 0))
    return x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12)  # (*batch, 1, ..., 1)


def measurement_scale(scale: torch.Tensor, op: LinearOperator) -> torch.Tensor:
    """An image scale ``(*batch, 1, ..., 1)`` reshaped to broadcast against data ``(*batch, *out_shape)``."""
    batch = scale.shape[: scale.ndim - len(op.in_shape)]
    return scale.reshape(*batch, *([1] * len(op.out_shape)))  # (*batch, 1, ..., 1)


def check_image_rank(op: LinearOperator, spatial_dims: int, owner: str) -> None:
    """ValueError unless ``op``'s images have at least ``spatial_dims`` dimensions."""
    if len(op.in_shape) < spatial_dims:
        raise ValueError(
            f"{owner}: spatial_dims={spatial_dims} needs images with at least {spatial_dims} dimensions, "
            f"but {type(op).__name__} has in_shape {op.in_shape}; build the model with "
            f"spatial_dims={len(op.in_shape)}"
        )
