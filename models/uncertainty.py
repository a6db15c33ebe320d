"""Per-voxel uncertainty for any reconstruction ``model(y, op)``: MC dropout, deep ensembles, calibration.

**MC dropout** (Gal & Ghahramani 2016) without touching a model's class: :func:`mc_dropout`
registers forward hooks on the model's convolutions that apply channel dropout (whole feature
maps, as ``torch.nn.functional.dropout2d`` / ``dropout3d`` with ``training=True``) to their
outputs, and removes them on exit. Inside the context the model is a dropout network, for
training (the principled way: the weights are then the variational posterior's means) as for
inference. :func:`sample_reconstructions` runs the model ``samples`` times inside it and returns
the mean image and the per-voxel standard deviation of ``|x|``.

Which layers: every ``Conv2d``, ``Conv3d``, ``ConvTranspose2d`` and ``ConvTranspose3d`` (the
up-sampling layers of MONAI's U-Net) **except those with at most** ``output_channels = 2``
**outputs**. In every network of ``models/`` those are the image outputs: the layers that produce
``(real, imaginary)`` (:class:`models.blocks.AsChannels`), i.e. the zero-initialised heads of
:class:`models.post.UNetPost` and :func:`models.blocks.image_unet`, the last convolution of
:func:`models.blocks.conv_stack` (the regularisers of the Neumann network, MoDL and VarNet) and
VarNet's coil-sensitivity CNN. Dropping one of two channels there would zero the whole real or
imaginary part of the network's correction, which is not a feature being dropped but the output.
Dropout on a layer's output is dropout on the next layer's input, so the rule puts dropout before
every weight layer but the first, as Gal & Ghahramani's construction does.

Masks are drawn from a ``torch.Generator`` on the CPU, one Bernoulli draw per ``(item, channel)``
per call of the layer, scaled by ``1 / (1 - p)`` ("inverted" dropout: the deterministic network,
outside the context, is the usual dropout-trained network at test time); the global RNG is never
used, so a seed gives the same samples on any device. A layer called several times in one forward
pass (the shared regulariser of an unrolled network) gets a fresh mask at each call.

**Deep ensembles** (Lakshminarayanan et al. 2017): :func:`ensemble_std` is the same mean and
spread over a list of independently trained models.

**Calibration**: :func:`calibration` is Pearson's r between the predicted std and the absolute
error over the voxels of one scan (optionally a foreground mask, :func:`foreground`), and
:func:`uncertainty_figure` shows reference, reconstruction, error and std side by side.

Shapes: ``y`` is ``(B, *op.out_shape)``; the mean has the model's own output shape and dtype
``(B, *op.in_shape)`` (complex for MRI, real for CT); the std is real ``(B, *op.in_shape)``.

Example:
    >>> import torch
    >>> from models.registry import build_model
    >>> from operators.mri import CartesianMRI
    >>> net = build_model("unet_post", {"features": [4, 8], "num_res_units": 0})
    >>> op = CartesianMRI(torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) > 0.5)
    >>> y = op.forward(torch.rand(2, 16, 16, dtype=torch.complex64))
    >>> mean, std = sample_reconstructions(net, y, op, samples=4, p=0.1, seed=0)
    >>> mean.shape, mean.dtype, std.shape, std.dtype
    (torch.Size([2, 16, 16]), torch.complex64, torch.Size([2, 16, 16]), torch.float32)
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from operators.errors import ParameterError, ShapeError
from operators.linear import LinearOperator

__all__ = [
    "DROPOUT_LAYERS",
    "DropoutHooks",
    "mc_dropout",
    "sample_reconstructions",
    "ensemble_std",
    "foreground",
    "calibration",
    "uncertainty_figure",
]

#: The layer types :func:`mc_dropout` hooks (when they have more than ``output_channels`` outputs).
DROPOUT_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)

#: Models inside an :func:`mc_dropout` context now (a second one would apply dropout twice).
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass(frozen=True)
class DropoutHooks:
    """What an :func:`mc_dropout` context applies: the rate and the hooked layers' names."""

    p: float
    layers: tuple[str, ...]


def _check_p(p: float) -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ParameterError(f"mc_dropout: the dropout rate p must be in [0, 1); found {p}")
    return p


def _channel_dropout(p: float, generator: torch.Generator) -> Callable[[nn.Module, Any, torch.Tensor], Any]:
    """A forward hook that zeroes whole channels of ``out`` ``(N, C, *spatial)`` with probability ``p``."""

    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor | None:
        if p == 0.0:
            return None  # keep the output as it is
        if out.ndim < 3:
            raise ShapeError(
                f"mc_dropout: {type(module).__name__} returned shape {tuple(out.shape)}; expected "
                "(N, C, *spatial) feature maps"
            )
        n, c = out.shape[:2]
        keep = torch.bernoulli(torch.full((n, c), 1.0 - p), generator=generator)  # (N, C) on the CPU
        scale = keep / (1.0 - p)  # inverted dropout: E[scale] = 1
        scale = scale.reshape(n, c, *([1] * (out.ndim - 2)))  # (N, C, 1, ..., 1)
        return out * scale.to(device=out.device, dtype=out.dtype)

    return hook


@contextmanager
def mc_dropout(
    model: nn.Module,
    p: float = 0.1,
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    output_channels: int = 2,
) -> Iterator[DropoutHooks]:
    """Channel dropout at rate ``p`` on the outputs of ``model``'s convolutions while the context is open.

    Active whatever ``model.training`` says (the context is the switch), so it serves for training
    with dropout and for MC sampling at inference alike; the hooks are removed on exit, also on
    an exception. Which layers, and why the image outputs are left alone: the module docstring.

    Args:
        model: any ``nn.Module``; its class and state dict are not changed.
        p: the probability of dropping a channel, in ``[0, 1)``; ``0`` leaves the model exact.
        seed: seeds a fresh CPU generator for the masks (ignored when ``generator`` is given).
        generator: a CPU ``torch.Generator`` to draw the masks from (it advances); ``seed=None``
            and no generator draws a nondeterministic seed.
        output_channels: convolutions with at most this many output channels are the network's
            image outputs and get no dropout.

    Yields:
        :class:`DropoutHooks`: the rate and the names of the hooked layers.

    Raises:
        ParameterError: ``p`` outside ``[0, 1)``, or a generator that is not on the CPU.
        ValueError: the model has no convolution to hook.
        RuntimeError: the model is already inside an ``mc_dropout`` context.
    """
    p = _check_p(p)
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
    elif generator.device.type != "cpu":
        raise ParameterError(
            f"mc_dropout: the generator must be a CPU torch.Generator (masks are drawn on the CPU and "
            f"moved); found one on {generator.device}"
        )
    if model in _ACTIVE:
        raise RuntimeError(
            f"mc_dropout: {type(model).__name__} is already inside an mc_dropout context; nesting "
            "would apply dropout twice"
        )
    names = tuple(
        name
        for name, m in model.named_modules()
        if isinstance(m, DROPOUT_LAYERS) and m.out_channels > output_channels
    )
    if not names:
        kinds = ", ".join(t.__name__ for t in DROPOUT_LAYERS)
        raise ValueError(
            f"mc_dropout: {type(model).__name__} has no convolution ({kinds}) with more than "
            f"output_channels={output_channels} outputs to apply dropout to"
        )
    modules = dict(model.named_modules())
    hook = _channel_dropout(p, generator)
    handles = [modules[name].register_forward_hook(hook) for name in names]
    _ACTIVE.add(model)
    try:
        yield DropoutHooks(p, names)
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.discard(model)


def _moments(outputs: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the outputs and the sample std (``n - 1``) of their magnitudes, streamed (Welford)."""
    n = 0
    total: torch.Tensor | None = None
    mean_mag = m2 = torch.zeros(())
    for out in outputs:
        n += 1
        mag = out.abs()  # (B, *in_shape), real
        if total is None:
            total, mean_mag, m2 = out.clone(), mag.clone(), torch.zeros_like(mag)
            continue
        total = total + out
        delta = mag - mean_mag
        mean_mag = mean_mag + delta / n
        m2 = m2 + delta * (mag - mean_mag)
    if total is None or n < 2:
        raise ParameterError(f"a standard deviation needs at least 2 samples or models; found {n}")
    return total / n, (m2 / (n - 1)).clamp_min(0).sqrt()


def sample_reconstructions(
    model: nn.Module,
    y: torch.Tensor,
    op: LinearOperator,
    *,
    samples: int = 8,
    p: float = 0.1,
    seed: int = 0,
    output_channels: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MC-dropout reconstructions of ``y``: their mean and the per-voxel std of their magnitude.

    The model runs ``samples`` times without gradients, in eval mode (restored afterwards; eval
    matters for batch norm, whose running statistics MC dropout keeps), inside
    :func:`mc_dropout` with one generator seeded by ``seed``: the same seed gives the same
    samples, and sample ``k`` differs from sample ``k - 1``.

    Args:
        model: any reconstruction network ``model(y, op)`` (best trained under ``mc_dropout`` at ``p``).
        y: measurements ``(B, *op.out_shape)``.
        op: the forward operator.
        samples: forward passes (>= 2).
        p: the dropout rate; ``0`` gives ``std == 0``.
        seed: seeds the dropout masks.
        output_channels: see :func:`mc_dropout`.

    Returns:
        ``(mean, std)``: the mean of the outputs ``(B, *op.in_shape)`` in the model's dtype
        (complex for MRI, real for CT), and the sample standard deviation (``n - 1``) of ``|x|``,
        real ``(B, *op.in_shape)``.
    """
    if samples < 2:
        raise ParameterError(f"sample_reconstructions: samples must be >= 2 for a std; found {samples}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), mc_dropout(model, p, seed=seed, output_channels=output_channels):
            return _moments(model(y, op) for _ in range(samples))
    finally:
        model.train(was_training)


def ensemble_std(
    models: Sequence[nn.Module], y: torch.Tensor, op: LinearOperator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A deep ensemble's mean reconstruction and the per-voxel std of ``|x|`` over its members.

    Each member runs once, without gradients and in eval mode (each restored afterwards).

    Args:
        models: at least two networks ``model(y, op)`` (e.g. the same architecture trained from
            different seeds).
        y: measurements ``(B, *op.out_shape)``.
        op: the forward operator.

    Returns:
        ``(mean, std)`` as :func:`sample_reconstructions`: ``(B, *op.in_shape)`` in the models'
        dtype, and the sample std (``n - 1``) of the magnitudes, real.
    """
    if len(models) < 2:
        raise ParameterError(f"ensemble_std: an ensemble needs at least 2 models; found {len(models)}")
    modes = [m.training for m in models]

    def outputs() -> Iterator[torch.Tensor]:
        for m in models:
            m.eval()
            yield m(y, op)

    try:
        with torch.no_grad():
            return _moments(outputs())
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _as_float64(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if np.iscomplexobj(a):
        raise ShapeError(f"calibration: {name} must be real (take .abs() of complex images first)")
    return a.astype(np.float64, copy=False)


def foreground(reference: np.ndarray | torch.Tensor, fraction: float = 0.05) -> np.ndarray:
    """The voxels where ``|reference|`` exceeds ``fraction`` of its maximum: a boolean array of its shape.

    Outside the head the error and the std are both near zero; over all voxels that shared
    zero inflates Pearson's r, so :func:`calibration` is also reported inside this mask.
    """
    ref = reference.detach().cpu().abs().numpy() if isinstance(reference, torch.Tensor) else np.abs(reference)
    return ref > fraction * float(np.nanmax(ref))


def calibration(
    std: np.ndarray | torch.Tensor,
    error: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
) -> float:
    """Pearson's r between the predicted std and the absolute error over the voxels of one scan.

    Args:
        std: predicted standard deviation, real, any shape (e.g. ``(D, H, W)`` or ``(B, H, W)``).
        error: the absolute error ``| |x| - reference |`` of the same shape (its absolute value is taken).
        mask: optional boolean array of that shape: only these voxels count (e.g.
            :func:`foreground` of the reference, ``reference > 5 %`` of its max).

    Returns:
        r in ``[-1, 1]``, computed in float64 over the voxels where both are finite (NaN and Inf
        are left out); ``nan`` when fewer than two voxels remain or either map is constant there
        (e.g. ``std == 0`` at ``p = 0``), where r is undefined.

    Raises:
        ShapeError: the shapes differ, or an input is complex.
    """
    s, e = _as_float64(std, "std"), np.abs(_as_float64(error, "error"))
    if s.shape != e.shape:
        raise ShapeError(
            f"calibration: std and error must have the same shape; found {s.shape} and {e.shape}"
        )
    keep = np.isfinite(s) & np.isfinite(e)
    if mask is not None:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.shape != s.shape:
            raise ShapeError(f"calibration: mask must have the shape of std {s.shape}; found {m.shape}")
        keep &= m.astype(bool)
    s, e = s[keep], e[keep]
    if s.size < 2:
        return math.nan
    s, e = s - s.mean(), e - e.mean()
    denom = math.sqrt(float(np.dot(s, s)) * float(np.dot(e, e)))
    if denom == 0.0 or not math.isfinite(denom):
        return math.nan
    return float(np.clip(np.dot(s, e) / denom, -1.0, 1.0))


def _image(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """A 2D magnitude image as float64 numpy."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = np.abs(a).astype(np.float64)
    if a.ndim != 2:
        raise ShapeError(f"uncertainty_figure: {name} must be one 2D image (H, W); found shape {a.shape}")
    return a


def uncertainty_figure(
    reference: np.ndarray | torch.Tensor,
    recon: np.ndarray | torch.Tensor,
    std: np.ndarray | torch.Tensor,
    title: str,
    *,
    fraction: float = 0.05,
) -> Any:
    """A matplotlib figure (Agg): reference, reconstruction, ``|error|`` and std side by side.

    Each panel has its colour bar; the reconstruction's title gives its PSNR (range: the
    reference's max - min, as ``pipelines/evaluate.py``), and the caption Pearson's r between
    std and ``|error|`` over all pixels and over the foreground (``reference > fraction · max``).

    Args:
        reference: the true image ``(H, W)`` (its magnitude is used).
        recon: the reconstruction ``(H, W)``, real or complex (its magnitude is used).
        std: the predicted standard deviation ``(H, W)``.
        title: the figure's title.
        fraction: the foreground threshold of the caption's second r.

    Returns:
        a ``matplotlib.figure.Figure``; close it with ``plt.close(fig)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from operators.metrics import psnr

    ref, rec, sd = _image(reference, "reference"), _image(recon, "recon"), _image(std, "std")
    if not ref.shape == rec.shape == sd.shape:
        raise ShapeError(
            f"uncertainty_figure: reference, recon and std must have one shape; found {ref.shape}, "
            f"{rec.shape} and {sd.shape}"
        )
    err = np.abs(rec - ref)
    r_all = calibration(sd, err)
    r_fg = calibration(sd, err, foreground(ref, fraction))
    vmax = float(ref.max())
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.3), layout="constrained")
    panels = [
        (ref, "reference", "gray", 0.0, vmax, "intensity"),
        (rec, f"reconstruction\nPSNR {psnr(rec, ref, data_range=vmax - float(ref.min())):.2f} dB", "gray",
         0.0, vmax, "intensity"),
        (err, "|reconstruction − reference|", "inferno", 0.0, None, "absolute error"),
        (sd, "predicted std", "inferno", 0.0, None, "standard deviation"),
    ]  # fmt: skip
    for ax, (img, name, cmap, lo, hi, label) in zip(axes, panels, strict=True):
        im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.85, label=label)
    fig.suptitle(title)
    fig.supxlabel(
        f"Pearson r(std, |error|) = {r_all:.3f} over all pixels, {r_fg:.3f} over the foreground "
        f"(reference > {100 * fraction:.0f}% of its max)"
    )
    return fig
