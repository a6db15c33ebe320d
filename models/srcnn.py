"""SRCNN (Dong et al. 2014): super-resolution by a three-layer CNN on the bicubic image.

::

    x⁰ = bicubic_f(y)                                   (B, h, w) -> (B, h f, w f)
    s  = max |x⁰|                                       per item
    z₁ = ReLU(W₁ * (x⁰/s) + b₁)    k₁ x k₁, n₁ maps     patch extraction and representation
    z₂ = ReLU(W₂ * z₁ + b₂)        k₂ x k₂, n₂ maps     non-linear mapping
    r  = W₃ * z₂ + b₃              k₃ x k₃, 1 map       reconstruction
    x  = s (x⁰/s + r)              residual=True (the network learns the detail bicubic misses)
    x  = s r                       residual=False (the original SRCNN)

Defaults are the paper's 9-5-5 network with ``n₁, n₂ = 64, 32``. Every convolution keeps the
size ('same' padding, edges replicated as bicubic does), so the output is exactly
``(B, h f, w f)`` for any ``h, w`` (odd included). Dividing by ``s`` and multiplying back makes
the network scale invariant: ``net(a y) = a net(y)`` for ``a > 0``.

Initialisation: He-normal for the two hidden layers; with ``residual=True`` the last layer is
zero, so an untrained network returns the bicubic image exactly (``residual=False`` uses the
paper's ``N(0, 10⁻³)``). Its gradient still reaches every parameter from the first step on:
the last layer's weight gets one at once, and the others once it has moved.

Two call conventions: ``net(y)`` with ``y`` the low-res image ``(..., h, w)``, and, like the
reconstruction models of :mod:`models`, ``net(y, op)`` with ``op`` an
:class:`operators.resolution.Downsample` of the config's factor and ``y`` of shape
``(B, *op.out_shape)``; the result has shape ``(B, *op.in_shape)``.

:func:`train_srcnn` fits one on random crops of high-resolution images (seeded, no global RNG).

Example:
    >>> import torch
    >>> from operators.resolution import Downsample, bicubic_upsample
    >>> net = SRCNN(SRCNNConfig(factor=2, features=(8, 4)))
    >>> op = Downsample((30, 34), 2)
    >>> y = op(torch.rand(3, 30, 34))
    >>> net(y, op).shape, net(y[0]).shape
    (torch.Size([3, 30, 34]), torch.Size([30, 34]))
    >>> torch.equal(net(y), bicubic_upsample(y, 2))  # untrained, residual: the bicubic image
    True
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.blocks import item_scale
from operators.errors import DTypeError, ShapeError
from operators.linear import LinearOperator
from operators.resolution import Downsample, bicubic_upsample

__all__ = ["SRCNNConfig", "SRCNN", "SRCNNHistory", "train_srcnn"]


@dataclass(frozen=True)
class SRCNNConfig:
    """Configuration of :class:`SRCNN`.

    Attributes:
        factor: the integer up-sampling factor ``f`` (the low-res image is ``f`` times smaller).
        features: ``(n₁, n₂)``, the channels of the two hidden layers; a list becomes a tuple.
        kernel_sizes: ``(k₁, k₂, k₃)``, odd, the kernel sizes of the three layers.
        residual: add the network's output to the bicubic image (the last layer starts at zero).
    """

    factor: int = 2
    features: tuple[int, int] = (64, 32)
    kernel_sizes: tuple[int, int, int] = (9, 5, 5)
    residual: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(int(n) for n in self.features))
        object.__setattr__(self, "kernel_sizes", tuple(int(k) for k in self.kernel_sizes))
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(
                f"SRCNNConfig.factor must be a positive integer (2, 3, 4, ...); found {self.factor!r}"
            )
        if len(self.features) != 2 or min(self.features) < 1:
            raise ValueError(
                f"SRCNNConfig.features must be two positive channel counts (n1, n2); found {self.features}"
            )
        if len(self.kernel_sizes) != 3 or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(
                f"SRCNNConfig.kernel_sizes must be three odd positive sizes (k1, k2, k3), so that 'same' "
                f"padding is symmetric; found {self.kernel_sizes}"
            )

    @property
    def receptive_field(self) -> int:
        """The width in high-res pixels of the bicubic patch one output pixel sees: ``k₁ + k₂ + k₃ - 2``."""
        return sum(self.kernel_sizes) - 2


class SRCNN(nn.Module):
    """SRCNN on the bicubic image (see the module docstring)."""

    def __init__(self, config: SRCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or SRCNNConfig()
        (n1, n2), (k1, k2, k3) = self.config.features, self.config.kernel_sizes

        def conv(cin: int, cout: int, k: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, k, padding=k // 2, padding_mode="replicate")

        self.body = nn.Sequential(conv(1, n1, k1), nn.ReLU(), conv(n1, n2, k2), nn.ReLU(), conv(n2, 1, k3))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """He-normal hidden layers, zero biases; last layer zero (residual) or ``N(0, 10⁻³)``.

        Args:
            generator: draw the weights from it (global RNG state untouched); None: the global RNG.
        """
        convs = [m for m in self.body if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for c in convs[:-1]:
                nn.init.kaiming_normal_(c.weight, nonlinearity="relu", generator=generator)
                nn.init.zeros_(c.bias)
            last = convs[-1]
            if self.config.residual:
                nn.init.zeros_(last.weight)  # an untrained network returns the bicubic image
            else:
                nn.init.normal_(last.weight, std=1e-3, generator=generator)
            nn.init.zeros_(last.bias)

    def upsample(self, y: torch.Tensor) -> torch.Tensor:
        """The bicubic image ``(..., h f, w f)`` of ``y`` ``(..., h, w)``: the network's input."""
        return bicubic_upsample(y, self.config.factor)

    def forward(self, y: torch.Tensor, op: LinearOperator | None = None) -> torch.Tensor:
        """Super-resolve.

        Args:
            y: low-res real images ``(..., h, w)``; with ``op``, ``(B, *op.out_shape)``.
            op: optional :class:`~operators.resolution.Downsample` whose factor is the config's.

        Returns:
            real images ``(..., h f, w f)`` (``(B, *op.in_shape)`` with ``op``), the dtype of ``y``.
        """
        if op is not None:
            self._check_operator(y, op)
        if y.is_complex():
            raise DTypeError(f"SRCNN: y must be real low-res images; found {y.dtype}")
        if y.ndim < 2:
            raise ShapeError(f"SRCNN: y must be low-res images (..., h, w); found shape {tuple(y.shape)}")
        x0 = self.upsample(y)  # (..., H, W)
        lead, spatial = x0.shape[:-2], x0.shape[-2:]
        x0 = x0.reshape(-1, 1, *spatial)  # (N, 1, H, W)
        scale = item_scale(x0, 3)  # (N, 1, 1, 1)
        r = self.body(x0 / scale) * scale  # (N, 1, H, W)
        out = x0 + r if self.config.residual else r  # s (x⁰/s + r), written so that r = 0 gives x⁰ exactly
        return out.reshape(*lead, *spatial)  # (..., H, W)

    def _check_operator(self, y: torch.Tensor, op: LinearOperator) -> None:
        if not isinstance(op, Downsample):
            raise TypeError(
                f"SRCNN: op must be an operators.resolution.Downsample (super-resolution); found {op!r}"
            )
        if op.factor != self.config.factor:
            raise ValueError(
                f"SRCNN: op's factor {op.factor} differs from the network's factor {self.config.factor}; "
                f"build SRCNN(SRCNNConfig(factor={op.factor})) or use Downsample(..., {self.config.factor})"
            )
        if y.ndim != len(op.out_shape) + 1 or tuple(y.shape[1:]) != op.out_shape:
            raise ShapeError(f"SRCNN: y must have shape (B, *{op.out_shape}); found {tuple(y.shape)}")

    def config_dict(self) -> dict:
        """Keyword arguments that rebuild this network through the registry."""
        d = asdict(self.config)
        d["features"], d["kernel_sizes"] = list(self.config.features), list(self.config.kernel_sizes)
        return d


# -- training ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SRCNNHistory:
    """What :func:`train_srcnn` did.

    Attributes:
        losses: the training loss at every step (on the crops, high-res intensity units).
        lr: the learning rate at every step (warm-up, then cosine decay from ``lr`` to ``lr / 100``).
        seconds: wall time of the training loop.
    """

    losses: tuple[float, ...]
    lr: tuple[float, ...]
    seconds: float

    def summary(self, fraction: float = 0.1) -> tuple[float, float]:
        """Mean loss over the first and the last ``fraction`` of the steps."""
        k = max(1, int(len(self.losses) * fraction))
        return float(np.mean(self.losses[:k])), float(np.mean(self.losses[-k:]))


def _crops(
    highres: torch.Tensor, batch_size: int, patch: int, rng: np.random.Generator, augment: bool
) -> torch.Tensor:
    """``batch_size`` random crops ``(B, P, P)`` of random images (``P = patch``), flipped and rotated."""
    n, h, w = highres.shape
    idx = rng.integers(0, n, batch_size)
    top = rng.integers(0, h - patch + 1, batch_size)
    left = rng.integers(0, w - patch + 1, batch_size)
    out = []
    for i, t, lft in zip(idx, top, left, strict=True):
        c = highres[i, t : t + patch, lft : lft + patch]  # (P, P)
        if augment:  # one of the 8 symmetries of the square
            c = torch.rot90(c, int(rng.integers(0, 4)), dims=(0, 1))
            if rng.integers(0, 2):
                c = c.flip(-1)
        out.append(c)
    return torch.stack(out)  # (B, P, P)


def train_srcnn(
    highres: torch.Tensor,
    config: SRCNNConfig | None = None,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    patch: int | None = None,
    loss: Literal["l1", "mse"] = "mse",
    augment: bool = True,
    warmup: int | None = None,
) -> tuple[SRCNN, SRCNNHistory]:
    """Train an :class:`SRCNN` on random crops of high-res images, down-sampled by area averaging.

    Each step draws ``batch_size`` crops (random image, position and, with ``augment``, one of the
    8 flips/rotations), down-samples them with :class:`~operators.resolution.Downsample` and
    takes one Adam step on ``loss(net(A crop), crop)``. The learning rate rises linearly over the
    first ``warmup`` steps, then decays as a cosine from ``lr`` to ``lr / 100``; without the
    warm-up, Adam's first full-size steps (every weight moving by about ``lr`` at once, 800 of them
    per unit of the second layer) can push every unit of the mapping layer below zero, and the
    network stays the bicubic image (seen at ``lr = 1e-3`` and ``2e-3`` on 32² phantoms).
    Weights and crops come from generators seeded with ``seed``, so a seed gives the same
    network, and the global RNG state is untouched.

    Args:
        highres: float32/64 images ``(N, H, W)``, intensities of order 1.
        config: the network (default :class:`SRCNNConfig`).
        steps: optimiser steps.
        batch_size: crops per step.
        lr: the peak Adam learning rate.
        seed: seeds the weights and the crops.
        patch: crop size in high-res pixels, a multiple of ``factor`` of at most ``min(H, W)``;
            None: the largest such multiple up to 48 (or the image).
        loss: ``"mse"`` (what PSNR measures) or ``"l1"``.
        augment: random flips and 90-degree rotations of the crops.
        warmup: steps of linear learning-rate warm-up; None: ``steps // 10``.

    Returns:
        ``(model in eval mode, history)``.

    Raises:
        ShapeError: ``highres`` is not ``(N, H, W)``, or ``patch`` does not fit.
        ValueError: a non-positive ``steps`` or ``batch_size``, or an unknown ``loss``.
    """
    config = config or SRCNNConfig()
    f = config.factor
    if highres.ndim != 3 or highres.is_complex() or not highres.is_floating_point():
        raise ShapeError(
            "train_srcnn: highres must be real float images (N, H, W); "
            f"found {highres.dtype} {tuple(highres.shape)}"
        )
    n, h, w = highres.shape
    if patch is None:
        patch = min(48, h, w) // f * f
    if patch < f or patch % f or patch > min(h, w):
        raise ShapeError(
            f"train_srcnn: patch must be a multiple of factor {f} between {f} and min(H, W) = {min(h, w)}; "
            f"found {patch}"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(
            f"train_srcnn: steps and batch_size must be positive; found {steps} and {batch_size}"
        )
    losses_fn = {"mse": F.mse_loss, "l1": F.l1_loss}
    if loss not in losses_fn:
        raise ValueError(f"train_srcnn: loss must be one of {sorted(losses_fn)}; found {loss!r}")

    with torch.random.fork_rng(devices=[]):  # nn.Conv2d's own initialisation draws from the global RNG
        model = SRCNN(config)
    model.reset_parameters(generator=torch.Generator().manual_seed(seed))  # every weight from the seed
    model = model.to(device=highres.device, dtype=highres.dtype)
    rng = np.random.default_rng([seed, 1])
    op = Downsample((patch, patch), f)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    warm = steps // 10 if warmup is None else warmup

    def factor(s: int) -> float:  # linear warm-up, then a cosine from 1 to 0.01
        if s < warm:
            return (s + 1) / (warm + 1)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses, lrs = [], []
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        x = _crops(highres, batch_size, patch, rng, augment)  # (B, P, P)
        value = losses_fn[loss](model(op(x), op), x)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
        losses.append(float(value.detach()))
    model.eval()
    return model, SRCNNHistory(tuple(losses), tuple(lrs), time.perf_counter() - t0)
