"""Analysis networks: segmentation and classification of volumes, built on MONAI's networks.

Every network takes a batch of volumes ``x`` of shape ``(B, C, D, H, W)``: ``C`` input channels
(1 for an image or a reconstruction; 2 for single-coil k-space as log-magnitude and phase).

* ``unet3d``: MONAI's :class:`~monai.networks.nets.BasicUNet` (two convolutions per level, four
  poolings, so ``D, H, W`` must be multiples of 16, and at least 32 with instance normalisation;
  training crops patches and inference slides a window of that size) returning per-class logits
  ``(B, K, D, H, W)``.
* ``unet2d``: the same network in 2D, applied to every slice (:class:`SliceWise`): what a 2D
  segmentation sees, with the same input and output shapes as the 3D one.
* ``vnet``: MONAI's :class:`~monai.networks.nets.VNet` (Milletari et al. 2016: residual stages,
  strided convolutions instead of pooling), per-class logits. MONAI fixes its widths (16 to 256
  channels, 46 M parameters): on two CPU cores it is the slow choice.
* ``densenet3d`` and ``resnet3d``: MONAI's 3D DenseNet and ResNet, one logit per volume ``(B,)``.
* ``unet_classifier``: the encoder of ``unet3d`` (the same layers under the same names) with
  global average and max pooling and a linear head, one logit per volume. Its encoder loads the
  weights of a trained segmentation ``unet3d`` (:func:`load_encoder`), and ``freeze`` trains only
  the head: transfer learning from segmentation to classification.

Example:
    >>> import torch
    >>> net = build_unet(spatial_dims=3, in_channels=1, out_channels=4, features=(4, 4, 8, 8, 16, 4))
    >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
    torch.Size([1, 4, 32, 32, 32])
    >>> clf = UNetClassifier(in_channels=1, features=(4, 4, 8, 8, 16, 4))
    >>> clf(torch.zeros(2, 1, 32, 32, 32)).shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "SliceWise",
    "UNetClassifier",
    "build_unet",
    "build_unet2d",
    "build_vnet",
    "build_densenet",
    "build_resnet",
    "load_encoder",
    "ENCODER_LAYERS",
]

#: The layers of MONAI's BasicUNet that make its encoder (the contracting path).
ENCODER_LAYERS = ("conv_0", "down_1", "down_2", "down_3", "down_4")

_FEATURES = (16, 16, 32, 64, 128, 16)


def _features(features: Sequence[int]) -> tuple[int, int, int, int, int, int]:
    f = tuple(int(v) for v in features)
    if len(f) != 6 or min(f) < 1:
        raise ValueError(
            f"features: expected 6 positive channel counts (5 levels and the output); found {list(f)}"
        )
    return f  # type: ignore[return-value]


def build_unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    features: Sequence[int] = _FEATURES,
    dropout: float = 0.0,
    norm: str = "instance",
) -> nn.Module:
    """MONAI's BasicUNet: per-class logits, input sizes multiples of 16."""
    from monai.networks.nets import BasicUNet

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims: expected 2 or 3; found {spatial_dims}")
    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=_features(features),
        norm=(norm, {"affine": True}),
        dropout=dropout,
    )


class SliceWise(nn.Module):
    """A 2D network applied to every slice of a volume: ``(B, C, D, H, W) -> (B, K, D, H, W)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        out = self.net(x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w))
        return out.reshape(b, d, -1, h, w).permute(0, 2, 1, 3, 4)


def build_unet2d(
    in_channels: int = 1,
    out_channels: int = 2,
    features: Sequence[int] = (32, 32, 64, 128, 256, 32),
    dropout: float = 0.0,
    norm: str = "instance",
) -> nn.Module:
    """The 2D BasicUNet, slice by slice."""
    return SliceWise(build_unet(2, in_channels, out_channels, features, dropout, norm))


def build_vnet(in_channels: int = 1, out_channels: int = 2, dropout: float = 0.0) -> nn.Module:
    """MONAI's 3D VNet (input sizes multiples of 16)."""
    from monai.networks.nets import VNet

    return VNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, dropout_prob_down=dropout,
                dropout_prob_up=(dropout, dropout))  # fmt: skip


class _Squeeze(nn.Module):
    """``(B, 1)`` logits as ``(B,)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(x.shape[0])


def build_densenet(
    in_channels: int = 1,
    init_features: int = 16,
    growth_rate: int = 8,
    block_config: Sequence[int] = (2, 4, 4),
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI's 3D DenseNet with one output logit."""
    from monai.networks.nets import DenseNet

    return _Squeeze(
        DenseNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=1,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            dropout_prob=dropout,
        )
    )


def build_resnet(
    in_channels: int = 1, widths: Sequence[int] = (16, 32, 64, 128), layers: Sequence[int] = (1, 1, 1, 1)
) -> nn.Module:
    """MONAI's 3D ResNet (basic blocks) with one output logit."""
    from monai.networks.nets import ResNet

    return _Squeeze(
        ResNet(
            block="basic",
            layers=list(layers),
            block_inplanes=list(widths),
            spatial_dims=3,
            n_input_channels=in_channels,
            num_classes=1,
        )
    )


class UNetClassifier(nn.Module):
    """The encoder of :func:`build_unet` (3D) and a linear head on its pooled features: one logit a volume.

    ``freeze`` keeps the encoder's weights fixed (they come from a segmentation model, see
    :func:`load_encoder`) and its normalisation in eval mode; only the head learns.
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = _FEATURES,
        dropout: float = 0.0,
        norm: str = "instance",
        freeze: bool = False,
    ) -> None:
        super().__init__()
        unet = build_unet(3, in_channels, 2, features, dropout, norm)
        self.encoder = nn.ModuleDict({name: getattr(unet, name) for name in ENCODER_LAYERS})
        width = sum(_features(features)[:5])  # pooled features of every level
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, 1))
        self.freeze = freeze
        if freeze:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> UNetClassifier:
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for name in ENCODER_LAYERS:
            x = self.encoder[name](x)
            pooled += [x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))]
        return self.head(torch.cat(pooled, dim=1)).reshape(-1)


def load_encoder(classifier: UNetClassifier, segmenter_state: dict[str, Any]) -> int:
    """Copy a segmentation ``unet3d``'s encoder weights into ``classifier``; returns the tensors copied.

    Raises:
        ValueError: the state has no encoder layers, or their shapes differ (another ``features``).
    """
    own = classifier.encoder.state_dict()
    found = {k: v for k, v in segmenter_state.items() if k.split(".", 1)[0] in ENCODER_LAYERS}
    if not found:
        raise ValueError(f"the segmentation model has no encoder layers {ENCODER_LAYERS}: is it a unet3d?")
    wrong = [k for k, v in found.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(
            f"the segmentation model's encoder does not fit this classifier ({len(wrong)} tensors differ, "
            f"e.g. {wrong[0]}): give both the same in_channels and features"
        )
    classifier.encoder.load_state_dict(found, strict=True)
    return len(found)
