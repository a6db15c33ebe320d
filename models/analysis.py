"""Analysis networks: segmentation and classification of volumes, built on MONAI's networks.

Every network takes a batch of volumes ``x`` of shape ``(B, C, D, H, W)``: ``C`` input channels
(1 for an image or a reconstruction; 2 for single-coil k-space as log-magnitude and phase).

* ``unet3d``: MONAI's :class:`~monai.networks.nets.UNet` (a strided convolution and a residual
  unit per level, instance normalisation; sizes are multiples of ``2 ** (levels - 1)``: training
  crops patches and inference slides a window) returning per-class logits ``(B, K, D, H, W)``.
  On two CPU cores it trains four times faster than MONAI's ``BasicUNet`` (two full convolutions
  per level) at a 32 x 64 x 64 patch.
* ``unet2d``: the same network in 2D, applied to every slice (:class:`SliceWise`): what a 2D
  segmentation sees, with the same input and output shapes as the 3D one.
* ``vnet``: MONAI's :class:`~monai.networks.nets.VNet` (Milletari et al. 2016: residual stages,
  strided convolutions instead of pooling), per-class logits. MONAI fixes its widths (16 to 256
  channels, 46 M parameters): on two CPU cores it is the slow choice.
* ``densenet3d`` and ``resnet3d``: MONAI's 3D DenseNet and ResNet, one logit per volume ``(B,)``.
* ``unet_classifier``: the encoder of ``unet3d`` (its contracting path, :func:`encoder_layers`)
  with global average and max pooling of every level and a linear head, one logit per volume.
  Its encoder loads the
  weights of a trained segmentation ``unet3d`` (:func:`load_encoder`), and ``freeze`` trains only
  the head: transfer learning from segmentation to classification.
* ``seg_classifier``: a whole trained segmentation ``unet3d`` read as a detector
  (:class:`SegmentationClassifier`): the volume's logit is an affine map of the largest log-odds
  of one class (lesions) over the volume, by sliding windows of the segmentation's patch.
  ``freeze`` trains only the map's two numbers (calibration); fine-tuning trains the whole
  network from the per-scan label (multiple-instance learning through the max).

Example:
    >>> import torch
    >>> net = build_unet(spatial_dims=3, in_channels=1, out_channels=4, channels=(4, 8, 16))
    >>> net(torch.zeros(1, 1, 16, 16, 16)).shape
    torch.Size([1, 4, 16, 16, 16])
    >>> clf = UNetClassifier(in_channels=1, channels=(4, 8, 16))
    >>> clf(torch.zeros(2, 1, 16, 16, 16)).shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "SliceWise",
    "SegmentationClassifier",
    "UNetClassifier",
    "build_unet",
    "build_unet2d",
    "build_vnet",
    "build_densenet",
    "build_resnet",
    "load_encoder",
    "encoder_layers",
]

_CHANNELS = (16, 32, 64, 128)


def build_unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    channels: Sequence[int] = _CHANNELS,
    num_res_units: int = 1,
    dropout: float = 0.0,
    norm: str = "instance",
) -> nn.Module:
    """MONAI's UNet: a strided convolution down at every level (``len(channels) - 1`` halvings, so
    sizes are multiples of ``2 ** (len(channels) - 1)``), residual units, per-class logits."""
    from monai.networks.nets import UNet

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims: expected 2 or 3; found {spatial_dims}")
    widths = tuple(int(c) for c in channels)
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(
            f"channels: expected at least 2 positive widths, one per level; found {list(widths)}"
        )
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=widths,
        strides=(2,) * (len(widths) - 1),
        num_res_units=num_res_units,
        dropout=dropout,
        norm=norm,
    )


def encoder_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The contracting path of a MONAI UNet: ``(state-dict prefix, layer)`` from the top level down.

    MONAI nests each level as ``Sequential(down, SkipConnection(next level), up)``; the bottom
    level's ``SkipConnection`` holds the bottom layer itself.
    """
    from monai.networks.layers import SkipConnection

    out: list[tuple[str, nn.Module]] = []
    node: Any = unet.model
    prefix = "model"
    while True:
        out.append((f"{prefix}.0", node[0]))
        inner = node[1].submodule
        if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
            node, prefix = inner, f"{prefix}.1.submodule"
            continue
        out.append((f"{prefix}.1.submodule", inner))
        return out


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
    channels: Sequence[int] = (32, 64, 128, 256),
    num_res_units: int = 1,
    dropout: float = 0.0,
    norm: str = "instance",
) -> nn.Module:
    """The 2D UNet, slice by slice."""
    return SliceWise(build_unet(2, in_channels, out_channels, channels, num_res_units, dropout, norm))


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


class _Transferred(nn.Module):
    """A classifier built on a part transferred from a segmentation (:meth:`transferred`), which
    ``freeze`` keeps fixed: no gradients, and its normalisation in eval mode while training."""

    freeze: bool = False

    def transferred(self) -> nn.Module:
        raise NotImplementedError

    def _set_freeze(self, freeze: bool) -> None:
        self.freeze = freeze
        if freeze:
            self.transferred().requires_grad_(False)

    def train(self, mode: bool = True) -> _Transferred:
        super().train(mode)
        if self.freeze:
            self.transferred().eval()
        return self


class UNetClassifier(_Transferred):
    """The encoder of :func:`build_unet` (3D) and a linear head on its pooled features: one logit a volume.

    ``freeze`` keeps the encoder's weights fixed (they come from a segmentation model, see
    :func:`load_encoder`) and its normalisation in eval mode; only the head learns.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = _CHANNELS,
        num_res_units: int = 1,
        dropout: float = 0.0,
        norm: str = "instance",
        freeze: bool = False,
    ) -> None:
        super().__init__()
        unet = build_unet(3, in_channels, 2, channels, num_res_units, dropout, norm)
        layers = encoder_layers(unet)
        self.prefixes = [p for p, _ in layers]
        self.encoder = nn.ModuleList([m for _, m in layers])
        width = sum(int(c) for c in channels)  # every level's features, pooled
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, 1))
        self._set_freeze(freeze)

    def transferred(self) -> nn.Module:
        return self.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for layer in self.encoder:
            x = layer(x)
            pooled += [x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))]
        return self.head(torch.cat(pooled, dim=1)).reshape(-1)


class SegmentationClassifier(_Transferred):
    """A segmentation ``unet3d`` as a per-volume detector of class ``target_channel``.

    The evidence of a volume is the largest log-odds of the target class over its voxels,
    ``m = max_v (ℓ_t(v) - logsumexp_{k≠t} ℓ_k(v))``, and its logit is ``scale · m + bias``. Inference
    slides windows of ``roi`` (the patch the segmentation trained on: its normalisation saw
    patches of that size) with a Gaussian blend, as the segment stage does.

    Args:
        in_channels, out_channels, channels, num_res_units, dropout, norm: the ``unet3d``'s.
        target_channel: the class to detect (``-1``: the last).
        roi: the window ``(D, H, W)``; None runs the network on the whole volume.
        freeze: keep the segmentation fixed (and its normalisation in eval mode); only ``scale``
            and ``bias`` learn.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = _CHANNELS,
        num_res_units: int = 1,
        dropout: float = 0.0,
        norm: str = "instance",
        target_channel: int = -1,
        roi: Sequence[int] | None = None,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        if not -out_channels <= target_channel < out_channels or out_channels < 2:
            raise ValueError(
                f"target_channel {target_channel} of {out_channels} output channels; expected a class "
                "index of a segmentation with at least 2 classes"
            )
        self.unet = build_unet(3, in_channels, out_channels, channels, num_res_units, dropout, norm)
        self.target = target_channel % out_channels
        self.roi = tuple(int(r) for r in roi) if roi is not None else None
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.tensor(0.0))
        self._set_freeze(freeze)

    def transferred(self) -> nn.Module:
        return self.unet

    def log_odds(self, x: torch.Tensor) -> torch.Tensor:
        """Per-voxel log-odds of the target class ``(B, D, H, W)``."""
        if self.roi is not None and tuple(x.shape[2:]) != self.roi:
            from monai.inferers import sliding_window_inference

            logits = sliding_window_inference(x, self.roi, 4, self.unet, overlap=0.25, mode="gaussian")
        else:
            logits = self.unet(x)
        assert isinstance(logits, torch.Tensor)
        others = torch.cat([logits[:, : self.target], logits[:, self.target + 1 :]], dim=1)
        return logits[:, self.target] - torch.logsumexp(others, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = self.log_odds(x).flatten(1).amax(dim=1)  # (B,)
        return self.scale * evidence + self.bias


def load_encoder(classifier: UNetClassifier | SegmentationClassifier, segmenter_state: dict[str, Any]) -> int:
    """Copy a segmentation ``unet3d``'s encoder weights into ``classifier`` (all its weights into a
    :class:`SegmentationClassifier`); returns the tensors copied.

    Raises:
        ValueError: the state lacks an encoder layer, or its shapes differ (another ``channels``).
    """
    if isinstance(classifier, SegmentationClassifier):
        try:
            classifier.unet.load_state_dict(segmenter_state)
        except RuntimeError as exc:
            raise ValueError(
                "the segmentation model does not fit this seg_classifier: give both the same "
                f"in_channels, out_channels, channels and num_res_units ({str(exc).splitlines()[0]})"
            ) from None
        return len(segmenter_state)
    copied = 0
    for layer, prefix in zip(classifier.encoder, classifier.prefixes, strict=True):
        own = layer.state_dict()
        found = {k[len(prefix) + 1 :]: v for k, v in segmenter_state.items() if k.startswith(prefix + ".")}
        if not found:
            raise ValueError(f"the segmentation model has no encoder layer {prefix!r}: is it a unet3d?")
        if set(found) != set(own) or any(own[k].shape != v.shape for k, v in found.items()):
            raise ValueError(
                f"the segmentation model's encoder layer {prefix!r} does not fit this classifier: "
                "give both the same in_channels, channels and num_res_units"
            )
        layer.load_state_dict(found)
        copied += len(found)
    return copied
