"""A DCGAN image prior for reconstruction: compressed sensing with a generative model (Bora et al. 2017).

A generator ``G: z ∈ ℝᴸ -> x ∈ ℝ^{S×S}`` is trained adversarially on real magnitude slices, then
frozen; a reconstruction searches its range for the image that explains the measurements::

    ẑ = argmin_z  ‖A(s(z) G(z)) - y‖² / ‖y‖²  +  λ_z ‖z‖² / L
    x  = s(ẑ) G(ẑ)

Networks (Radford et al. 2016), ``n = log2(S) - 2`` stride-2 stages, ``F = features``::

    G: z (B, L) -> 4x4 (8F at S=64) -> ... -> (B, S, S)    ConvTranspose 4x4 + BatchNorm + ReLU
    D: (B, S, S) -> ... -> 4x4 -> logit (B,)               Conv 4x4 stride 2 + LeakyReLU(0.2),
                                                           spectral norm on every convolution

Channels halve at every stage of ``G`` (``F·2ⁿ⁻¹`` at 4x4, ``F`` before the last layer) and
double at every stage of ``D``. ``D`` is spectrally normalised by default (Miyato et al. 2018);
``disc_norm="batch"`` is DCGAN's BatchNorm instead (not on the first and last layers). On 64x64
brain slices and a CPU budget of ~10³ steps, BatchNorm's ``D`` won outright (``D(fake)`` near 0)
and its generator gave noisier images and latent-search reconstructions ~1.5 dB worse; at 32x32
it learned more structure than spectral norm. ``D`` also appends the
minibatch standard deviation (Karras et al. 2018) as one more channel at 4x4
(``minibatch_std``), so it can see a batch of fakes that lacks the variety of real slices: its
logits then depend on the whole batch, not on each image alone.

``G`` ends with no activation by default (``output="none"``): the slices are magnitudes in
``[0, ~1.2]`` with a background that is exactly 0, and a linear output reaches 0 without
saturating, so the latent search keeps useful gradients everywhere (a tanh would clip the
bright fat of the scalp, a softplus only approaches 0 as its input goes to -∞).
``output="softplus"`` keeps every pixel positive instead.

Training (:func:`train_dcgan`): the non-saturating loss with logits, ``ℓ(t, c) = BCE(σ(t), c)``::

    L_D = ℓ(D(x), 1) + ℓ(D(G(z)), 0)        L_G = ℓ(D(G(z)), 1)

one Adam step (``betas=(0.5, 0.999)``) on each per iteration, real and fake batches through
``D`` separately (its BatchNorm must not mix them). The generator returned holds the
exponential moving average of its weights over the iterations (``ema``; the last iterate of
adversarial training carries high-frequency artefacts), with BatchNorm statistics re-estimated
on those weights (the running averages of training belong to other weights); both networks are
returned in eval mode.

Image scale: train on slices divided by their 99.5th percentile (:func:`normalise_slices`), so
the generator learns shapes at one scale. Reconstruction never needs that scale: for each
``z`` the best scalar ``s`` has a closed form (variable projection),
``s(z) = ⟨A G(z), y⟩ / ‖A G(z)‖²`` (complex for complex operators, so a constant phase is
absorbed too), and ``x = s G(z)`` comes out at the scale of the data.

Reconstruction (:func:`gan_prior_reconstruct`): Adam over ``z`` for every item of the batch
and every restart at once (``restarts`` seeded draws of ``z ~ N(0, I)``); each item keeps the
restart with the smallest data residual. ``G`` is frozen and in eval mode. The data term is
divided by ``‖y‖²`` and the penalty by ``L``, so ``λ_z`` (``z_penalty``) means the same at any
scale and latent size.

Image-adaptive refinement (``adapt_steps > 0``; Hussein, Tirer & Giryes 2020): a trained ``G``'s
range seldom holds the test image (on 64² brain slices at 4x the search leaves a data residual
near 0.2), so after the search each item gets its own copy ``G_b = G_θ_b`` of the generator and
Adam minimises the same objective over ``(z_b, θ_b)`` jointly, from ``(ẑ_b, θ)``, with a small
learning rate (``adapt_lr``); the copies stay in eval mode, so BatchNorm is a fixed affine map
and items do not interact. Its regulariser is early stopping: the weights can fit anything
measured, so they fit the image's structure first and then the noise and aliasing. On validation
brain slices (4x, 40 dB; not the benchmark's test subjects) the PSNR peaked after 50-75 steps at
``adapt_lr = 3e-4`` (+0.85 dB over zero filling) and fell after it (+0.27 dB at 200 steps).

Optional data consistency afterwards:

* :class:`~operators.mri.CartesianMRI` with a binary mask ``M``: replace the measured samples,
  ``x ← Fᴴ[(1 - M) F x + M y] = x + Aᴴ(y - A x)`` (exact, so ``A x = y`` afterwards);
* any other operator (SENSE, CT, soft masks): there are no samples to replace, so a few
  conjugate-gradient steps on ``AᴴA δ = Aᴴ(y - A x)`` from ``δ = 0`` and ``x ← x + δ``; this
  moves ``x`` towards its projection ``x + A⁺(y - A x)`` on ``{A x = y}`` (what the Cartesian
  replacement is), changing it only along the range of ``Aᴴ``.

Example:
    >>> import torch
    >>> from operators.mri import CartesianMRI
    >>> cfg = DCGANConfig(latent=8, image_size=16, features=4)
    >>> g, d = DCGANGenerator(cfg), DCGANDiscriminator(cfg)
    >>> g(torch.randn(2, 8)).shape, d(torch.rand(2, 16, 16)).shape
    (torch.Size([2, 16, 16]), torch.Size([2]))
    >>> op = CartesianMRI(torch.rand(16, 16) > 0.5)
    >>> y = op.forward(torch.rand(3, 16, 16).to(torch.complex64))
    >>> x, info = gan_prior_reconstruct(g.eval(), op, y, steps=5, data_consistency=True)
    >>> x.shape, x.dtype, info["residual"].shape
    (torch.Size([3, 16, 16]), torch.complex64, torch.Size([3]))
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from models.blocks import initial_image
from operators.linear import LinearOperator, complex_dtype_for, real_dtype_for
from operators.mri import CartesianMRI
from operators.solvers import ConjugateGradient

__all__ = [
    "DCGANConfig",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "normalise_slices",
    "train_dcgan",
    "prior_objective",
    "gan_prior_reconstruct",
]

_log = logging.getLogger(__name__)

_OUTPUTS = ("none", "softplus")
_DISC_NORMS = ("spectral", "batch")


@dataclass(frozen=True)
class DCGANConfig:
    """Configuration of :class:`DCGANGenerator` and :class:`DCGANDiscriminator`.

    Attributes:
        latent: size ``L`` of the latent code ``z``.
        image_size: side ``S`` of the square images, a power of 2 and at least 16.
        features: channels ``F`` next to the image (``G``'s last hidden layer, ``D``'s first);
            they double at every stage away from it.
        output: ``G``'s final activation, ``"none"`` (linear) or ``"softplus"`` (positive).
        disc_norm: ``D``'s normalisation, ``"batch"`` (DCGAN) or ``"spectral"``.
        minibatch_std: give ``D`` the batch's standard deviation as an extra channel at 4x4.
    """

    latent: int = 64
    image_size: int = 64
    features: int = 32
    output: str = "none"
    disc_norm: str = "spectral"
    minibatch_std: bool = True

    def __post_init__(self) -> None:
        if self.latent < 1:
            raise ValueError(f"DCGANConfig.latent must be >= 1; found {self.latent}")
        s = self.image_size
        if s < 16 or s & (s - 1):
            raise ValueError(
                f"DCGANConfig.image_size must be a power of 2 >= 16 (16, 32, 64, ...); found {s}"
            )
        if self.features < 1:
            raise ValueError(f"DCGANConfig.features must be >= 1; found {self.features}")
        if self.output not in _OUTPUTS:
            raise ValueError(f"DCGANConfig.output must be one of {_OUTPUTS}; found {self.output!r}")
        if self.disc_norm not in _DISC_NORMS:
            raise ValueError(f"DCGANConfig.disc_norm must be one of {_DISC_NORMS}; found {self.disc_norm!r}")

    @property
    def stages(self) -> int:
        """Stride-2 stages between 4x4 and the image, ``log2(image_size) - 2``."""
        return int(math.log2(self.image_size)) - 2


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: convolution weights ``N(0, 0.02)``, BatchNorm scales ``N(1, 0.02)``."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANGenerator(nn.Module):
    """``G``: latent codes ``(B, latent)`` -> real images ``(B, S, S)`` (see the module docstring)."""

    def __init__(self, config: DCGANConfig | None = None) -> None:
        super().__init__()
        self.config = config or DCGANConfig()
        f, n = self.config.features, self.config.stages
        ch = f * 2 ** (n - 1)
        # No conv bias before a BatchNorm (it would be removed by the normalisation).
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(self.config.latent, ch, 4, 1, 0, bias=False),  # (B, ch, 4, 4)
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
        ]
        for _ in range(n - 1):  # 4 -> S/2
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2)]
            layers.append(nn.ReLU(inplace=True))
            ch //= 2
        layers.append(nn.ConvTranspose2d(ch, 1, 4, 2, 1))  # (B, 1, S, S)
        if self.config.output == "softplus":
            layers.append(nn.Softplus())
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` ``(B, latent)`` -> images ``(B, S, S)``, real, in ``z``'s dtype."""
        if z.ndim != 2 or z.shape[1] != self.config.latent:
            raise ValueError(
                f"DCGANGenerator: z must have shape (B, latent={self.config.latent}); found {tuple(z.shape)}"
            )
        out = self.net(z[:, :, None, None])  # (B, L, 1, 1) -> (B, 1, S, S)
        return out[:, 0]  # (B, S, S)

    def config_dict(self) -> dict:
        """Keyword arguments that rebuild this network through the registry."""
        return asdict(self.config)


class DCGANDiscriminator(nn.Module):
    """``D``: real images ``(B, S, S)`` -> logits ``(B,)`` (positive: "real")."""

    def __init__(self, config: DCGANConfig | None = None) -> None:
        super().__init__()
        self.config = config or DCGANConfig()
        f, n = self.config.features, self.config.stages
        convs: list[nn.Conv2d] = []
        ch_in, ch = 1, f
        for _ in range(n):  # S -> 4
            convs.append(nn.Conv2d(ch_in, ch, 4, 2, 1))
            ch_in, ch = ch, ch * 2
        extra = 1 if self.config.minibatch_std else 0
        convs.append(nn.Conv2d(ch_in + extra, 1, 4, 1, 0))  # 4x4 -> 1x1
        layers: list[nn.Module] = []
        spectral = self.config.disc_norm == "spectral"
        for i, conv in enumerate(convs):
            _dcgan_init(conv)  # before the parametrisation takes the weight over
            layers.append(spectral_norm(conv) if spectral else conv)
            if not spectral and 0 < i < n:  # DCGAN: no BatchNorm on the first and last layers
                layers.append(nn.BatchNorm2d(conv.out_channels))
                _dcgan_init(layers[-1])
            if i < n:
                layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.body = nn.Sequential(*layers[:-1])  # (B, 1, S, S) -> (B, C, 4, 4)
        self.head = layers[-1]  # (B, C (+1), 4, 4) -> (B, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, S, S)`` real -> logits ``(B,)``."""
        s = self.config.image_size
        if x.ndim != 3 or tuple(x.shape[1:]) != (s, s) or x.is_complex():
            raise ValueError(
                f"DCGANDiscriminator: x must be real images of shape (B, {s}, {s}); "
                f"found {tuple(x.shape)} {x.dtype} (take .abs() of complex images)"
            )
        h = self.body(x[:, None])  # (B, 1, S, S) -> (B, C, 4, 4)
        if self.config.minibatch_std:
            std = h.std(dim=0, unbiased=False).mean()  # one number for the batch: its diversity
            h = torch.cat([h, std.expand(h.shape[0], 1, *h.shape[2:])], dim=1)  # (B, C + 1, 4, 4)
        return self.head(h).flatten()  # (B, 1, 1, 1) -> (B,)


def normalise_slices(images: torch.Tensor, quantile: float = 0.995) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide each slice of ``images`` ``(N, H, W)`` (real) by its ``quantile`` of intensity.

    Returns ``(images / scale, scale)`` with ``scale`` ``(N,)`` (at least 1e-12). The 99.5th
    percentile, rather than the maximum, so that a few hot pixels do not set the scale.
    """
    if images.ndim != 3 or images.is_complex():
        raise ValueError(f"normalise_slices: images must be real (N, H, W); found {tuple(images.shape)}")
    scale = torch.quantile(images.flatten(1).float(), quantile, dim=1).clamp_min(1e-12)  # (N,)
    return images / scale.to(images.dtype)[:, None, None], scale


@torch.no_grad()
def _recalibrate_batchnorm(
    generator: DCGANGenerator, rng: torch.Generator, batches: int, batch_size: int
) -> None:
    """Replace the BatchNorm running statistics by their averages over fresh samples of ``G``."""
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    generator.train()
    for _ in range(batches):
        generator(torch.randn(batch_size, generator.config.latent, generator=rng))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def train_dcgan(
    images: torch.Tensor,
    config: DCGANConfig | None = None,
    *,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 2e-4,
    seed: int = 0,
    log_every: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    ema: float = 0.99,
    label_smoothing: float = 0.0,
) -> tuple[DCGANGenerator, DCGANDiscriminator, dict[str, Any]]:
    """Train a DCGAN on ``images`` ``(N, S, S)`` (real, normalised, e.g. by :func:`normalise_slices`).

    Args:
        images: the training slices, float32 ``(N, S, S)`` with ``S = config.image_size``.
        config: the networks (default :class:`DCGANConfig`).
        steps: iterations, each one Adam step on ``D`` then one on ``G``.
        batch_size: real images (drawn with replacement) and fakes per step.
        lr: Adam learning rate of both networks (``betas=(0.5, 0.999)``).
        seed: the initial weights, batches and latent draws. The global RNG is forked: its
            state is the same after the call as before.
        log_every: log the losses (``logging`` at INFO) every this many steps.
        on_step: called after every step with ``(step, {"loss_d", "loss_g", "d_real", "d_fake"})``.
        ema: decay of the moving average of the generator's weights that is returned (0: the
            last weights). The average smooths out the oscillation of adversarial training,
            whose last iterate carries high-frequency artefacts (Yazıcı et al. 2019).
        label_smoothing: one-sided label smoothing (Salimans et al. 2016): ``D``'s target for
            real images is ``1 - label_smoothing``, which keeps it from saturating.

    Returns:
        ``(generator, discriminator, history)``, both networks in eval mode; ``history`` holds
        per-step lists ``loss_d``, ``loss_g``, ``d_real`` and ``d_fake`` (mean ``σ(D)`` on the
        real and fake batch), and ``seconds``.
    """
    config = config or DCGANConfig()
    s = config.image_size
    if images.ndim != 3 or tuple(images.shape[1:]) != (s, s) or images.is_complex():
        raise ValueError(
            f"train_dcgan: images must be real (N, {s}, {s}) for image_size={s}; "
            f"found {tuple(images.shape)} {images.dtype}"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_dcgan: steps and batch_size must be >= 1; found {steps}, {batch_size}")
    images = images.float()
    history: dict[str, Any] = {"loss_d": [], "loss_g": [], "d_real": [], "d_fake": []}
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights (and spectral norm's first vectors)
        generator, discriminator = DCGANGenerator(config), DCGANDiscriminator(config)
        rng = torch.Generator().manual_seed(seed)  # batches and latent codes
        opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        labels = torch.cat([torch.ones(batch_size), torch.zeros(batch_size)])  # (2B,): real, fake
        targets = labels * (1 - label_smoothing)  # D's targets: real ones smoothed
        averaged = [p.detach().clone() for p in generator.parameters()]
        generator.train()
        discriminator.train()
        for step in range(steps):
            real = images[torch.randint(images.shape[0], (batch_size,), generator=rng)]  # (B, S, S)
            fake = generator(torch.randn(batch_size, config.latent, generator=rng))  # (B, S, S)
            # D: real and fake in separate passes (a BatchNorm in D must not mix them).
            logits = torch.cat([discriminator(real), discriminator(fake.detach())])  # (2B,)
            loss_d = 2 * F.binary_cross_entropy_with_logits(logits, targets)  # ℓ(D(x),1) + ℓ(D(G(z)),0)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # G: the non-saturating loss, through the updated D.
            loss_g = F.binary_cross_entropy_with_logits(discriminator(fake), labels[:batch_size])
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            with torch.no_grad():
                decay = min(ema, (1 + step) / (10 + step))  # short memory at first
                for a, p in zip(averaged, generator.parameters(), strict=True):
                    a.lerp_(p, 1 - decay)

            prob = torch.sigmoid(logits.detach())
            entry = {
                "loss_d": float(loss_d.detach()),
                "loss_g": float(loss_g.detach()),
                "d_real": float(prob[:batch_size].mean()),
                "d_fake": float(prob[batch_size:].mean()),
            }
            for key, value in entry.items():
                history[key].append(value)
            if on_step is not None:
                on_step(step, entry)
            if log_every and (step + 1) % log_every == 0:
                _log.info(
                    "dcgan step %d/%d: loss_d %.3f loss_g %.3f D(real) %.2f D(fake) %.2f",
                    step + 1, steps, entry["loss_d"], entry["loss_g"], entry["d_real"], entry["d_fake"],
                )  # fmt: skip
        with torch.no_grad():
            for a, p in zip(averaged, generator.parameters(), strict=True):
                p.copy_(a)
        _recalibrate_batchnorm(generator, rng, batches=8, batch_size=max(batch_size, 32))
    history["seconds"] = time.perf_counter() - t0
    return generator.eval(), discriminator.eval(), history


# -- reconstruction --------------------------------------------------------------------------------
@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode with no parameter gradients, restored afterwards."""
    training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval()
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        module.train(training)


def _sq_norm(x: torch.Tensor, n_event: int) -> torch.Tensor:
    """``‖x‖²`` over the last ``n_event`` dimensions, real."""
    dims = tuple(range(-n_event, 0))
    return (x.real**2 + x.imag**2).sum(dim=dims) if x.is_complex() else (x**2).sum(dim=dims)


def _expand(v: torch.Tensor, n_event: int) -> torch.Tensor:
    return v.reshape(*v.shape, *([1] * n_event))  # (*lead) -> (*lead, 1, ..., 1)


def prior_objective(
    generator: DCGANGenerator,
    op: LinearOperator,
    y: torch.Tensor,
    z: torch.Tensor,
    *,
    z_penalty: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The latent objective of every code in ``z``, differentiable in ``z`` (and ``G``).

    Args:
        generator: ``G``, images ``(S, S)`` equal to ``op.in_shape``.
        op: the forward operator.
        y: measurements ``(B, *op.out_shape)``.
        z: codes ``(*lead, B, latent)``, e.g. ``(restarts, B, latent)``.
        z_penalty: ``λ_z``.

    Returns:
        ``(objective, residual, x, scale)``: ``‖A x - y‖² / ‖y‖² + λ_z ‖z‖² / L`` ``(*lead, B)``,
        the relative residual ``‖A x - y‖ / ‖y‖`` ``(*lead, B)``, the images ``x = s G(z)``
        ``(*lead, B, *op.in_shape)`` (complex for a complex operator) and ``s`` ``(*lead, B)``.
    """
    lead = z.shape[:-1]  # (*lead, B)
    g = generator(z.reshape(-1, z.shape[-1])).reshape(*lead, *op.in_shape)  # (*lead, B, S, S)
    return _image_objective(g, op, y, z, z_penalty)


def _image_objective(
    g: torch.Tensor, op: LinearOperator, y: torch.Tensor, z: torch.Tensor, z_penalty: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`prior_objective` of the generator's images ``g`` ``(*lead, B, *in_shape)`` (real)."""
    n_in, n_out = len(op.in_shape), len(op.out_shape)
    g = g.to(complex_dtype_for(y.dtype) if op.complex_in else real_dtype_for(y.dtype))  # G's images are real
    ag = op.forward(g)  # (*lead, B, *out_shape)
    y_sq = _sq_norm(y, n_out).clamp_min(1e-30)  # (B,)
    ag_sq = _sq_norm(ag, n_out)  # (*lead, B)
    inner = (ag.conj() * y).sum(dim=tuple(range(-n_out, 0)))  # ⟨A G, y⟩, (*lead, B)
    scale = inner / (ag_sq + 1e-12 * y_sq)  # the least-squares s for this z
    r = _expand(scale, n_out) * ag - y  # (*lead, B, *out_shape)
    res_sq = _sq_norm(r, n_out) / y_sq  # (*lead, B)
    objective = res_sq + z_penalty * (z**2).mean(dim=-1)
    return objective, res_sq.sqrt(), _expand(scale, n_in) * g, scale


def _data_consistency(op: LinearOperator, x: torch.Tensor, y: torch.Tensor, iterations: int) -> torch.Tensor:
    """Move ``x`` ``(B, *in_shape)`` to agree with ``y`` (see the module docstring)."""
    if isinstance(op, CartesianMRI) and bool(((op.mask == 0) | (op.mask == 1)).all()):
        # Fᴴ[(1 - M) F x + M y] = x - Fᴴ M F x + Fᴴ M y = x + Aᴴ(y - A x) for a 0/1 mask (M² = M).
        return x + op.adjoint(y - op.forward(x))
    cg = ConjugateGradient(op.normal, event_ndim=len(op.in_shape))
    state = cg.init(op.adjoint(y - op.forward(x)))  # δ = 0
    for _ in range(iterations):
        state = cg.step(state)
    return x + state.x


def _adapt(
    generator: DCGANGenerator,
    op: LinearOperator,
    y: torch.Tensor,
    z: torch.Tensor,
    *,
    steps: int,
    lr: float,
    z_lr: float,
    z_penalty: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Image-adaptive refinement: Adam on ``z`` ``(B, L)`` and a copy of ``G``'s weights per item.

    Every item ``b`` gets its own copy ``G_b`` of ``generator`` (in eval mode: BatchNorm keeps its
    running statistics and acts as a fixed affine map) and minimises the latent objective over
    ``(z_b, θ_b)`` jointly, starting from the search's code and the trained weights. ``generator``
    itself is not touched. Each step runs the ``B`` copies one image at a time.

    Returns:
        ``(residual, x, scale, history)``: the relative residual ``(B,)``, the images ``s G_b(z_b)``
        ``(B, *in_shape)`` and ``s`` ``(B,)`` of the last weights (as :func:`prior_objective`), and
        the mean objective per step.
    """
    batch = y.shape[0]
    copies = [copy.deepcopy(generator).eval().requires_grad_(True) for _ in range(batch)]
    z = z.detach().clone().requires_grad_(True)  # (B, L)
    optimiser = torch.optim.Adam(
        [{"params": [p for g in copies for p in g.parameters()], "lr": lr}, {"params": [z], "lr": z_lr}]
    )

    def images() -> torch.Tensor:
        return torch.stack([g(z[b : b + 1])[0] for b, g in enumerate(copies)])  # B x (S, S) -> (B, S, S)

    history: list[float] = []
    for _ in range(steps):
        objective, _, _, _ = _image_objective(images(), op, y, z, z_penalty)  # (B,)
        optimiser.zero_grad(set_to_none=True)
        objective.sum().backward()  # each item's loss reaches only its own copy and code
        optimiser.step()
        history.append(float(objective.detach().mean()))
    with torch.no_grad():
        _, residual, x, scale = _image_objective(images(), op, y, z, z_penalty)
    return residual, x, scale, history


def gan_prior_reconstruct(
    generator: DCGANGenerator,
    op: LinearOperator,
    y: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 0.05,
    restarts: int = 2,
    seed: int = 0,
    data_consistency: bool = False,
    z_penalty: float = 1e-3,
    dc_iterations: int = 5,
    adapt_steps: int = 0,
    adapt_lr: float = 3e-4,
    adapt_z_lr: float | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Reconstruct ``x = s G(ẑ)`` from ``y`` with the frozen generator (see the module docstring).

    With ``adapt_steps > 0`` the image is ``s G_θ̂(ẑ)`` instead, from a copy of the generator
    adapted to each item's measurements (image-adaptive GAN); ``generator`` is still unchanged.

    Args:
        generator: a trained :class:`DCGANGenerator` whose image size equals ``op.in_shape``;
            it is used in eval mode, unchanged.
        op: the forward operator; only ``forward``, ``adjoint`` and ``pseudo_inverse`` are used
            (and the mask of a :class:`~operators.mri.CartesianMRI` for data consistency).
        y: measurements ``(B, *op.out_shape)``.
        steps: Adam steps on the codes.
        lr: Adam's learning rate.
        restarts: independent starting codes per item; each item keeps its best.
        seed: the starting codes (a ``torch.Generator``; the global RNG is untouched).
        data_consistency: enforce the measurements afterwards (exact for a Cartesian mask,
            ``dc_iterations`` CG steps otherwise).
        z_penalty: ``λ_z``, the weight of ``‖z‖² / L``.
        dc_iterations: CG steps of the data consistency for operators without a 0/1 mask.
        adapt_steps: image-adaptive steps after the search (0: none, plain CSGM): Adam on the
            kept code and a per-item copy of ``G``'s weights together (see the module docstring;
            50 at 4x on 64² brain slices, the recon methods ``gan_prior+adapt``).
        adapt_lr: Adam's learning rate on the weights during adaptation.
        adapt_z_lr: Adam's learning rate on the code during adaptation (None: ``adapt_lr``).

    Returns:
        ``(x, info)``: ``x`` ``(B, *op.in_shape)``, the dtype of ``op.pseudo_inverse(y)``
        (complex64 for MRI). ``info``: ``prior`` the image ``s G(ẑ)`` before data consistency
        (``s G_θ̂(ẑ)`` with adaptation; ``x`` itself when ``data_consistency`` is False),
        ``residual`` ``(B,)`` the relative data residual ``‖A x - y‖ / ‖y‖`` of the prior's image
        (before data consistency), ``residual_search`` ``(B,)`` the same of the search's image
        before adaptation (equal to ``residual`` without it), ``residual_dc`` ``(B,)`` the
        residual after data consistency (equal to ``residual`` when ``data_consistency`` is
        False), ``scale`` ``(B,)``, ``z`` ``(B, latent)`` the search's code, ``restart`` ``(B,)``
        the restart kept, ``objective`` the mean objective per step of the search and
        ``adapt_objective`` of the adaptation (lists), ``seconds``.
    """
    t0 = time.perf_counter()
    s = generator.config.image_size
    if op.in_shape != (s, s):
        raise ValueError(
            f"gan_prior_reconstruct: the generator makes ({s}, {s}) images but the operator's images "
            f"are {op.in_shape}; train a generator with image_size matching the operator"
        )
    n_out = len(op.out_shape)
    if y.ndim != n_out + 1 or tuple(y.shape[1:]) != op.out_shape:
        raise ValueError(
            f"gan_prior_reconstruct: y must have shape (B, *op.out_shape) = (B, *{op.out_shape}); "
            f"found {tuple(y.shape)}"
        )
    if restarts < 1 or steps < 0 or adapt_steps < 0:
        raise ValueError(
            "gan_prior_reconstruct: need restarts >= 1, steps >= 0 and adapt_steps >= 0; "
            f"found {restarts}, {steps}, {adapt_steps}"
        )
    like = initial_image(y, op)  # (B, *in_shape): the output's dtype
    batch, latent = y.shape[0], generator.config.latent
    dtype = next(generator.parameters()).dtype
    rng = torch.Generator(device=y.device).manual_seed(seed)
    z = torch.randn(restarts, batch, latent, generator=rng, device=y.device, dtype=dtype)  # (R, B, L)
    z.requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=lr)
    history: list[float] = []
    with _frozen(generator):
        for _ in range(steps):
            objective, _, _, _ = prior_objective(generator, op, y, z, z_penalty=z_penalty)  # (R, B)
            optimiser.zero_grad(set_to_none=True)
            objective.sum().backward()  # items and restarts are independent: one sum, separate gradients
            optimiser.step()
            history.append(float(objective.detach().mean()))
        with torch.no_grad():
            _, residual, x_all, scale = prior_objective(generator, op, y, z, z_penalty=z_penalty)
    best = residual.argmin(dim=0)  # (B,)
    items = torch.arange(batch, device=y.device)
    z_best, res_search, scale = z.detach()[best, items], residual[best, items], scale[best, items]
    x, res = x_all[best, items], res_search  # (B, *in_shape), (B,)
    adapt_history: list[float] = []
    if adapt_steps:
        res, x, scale, adapt_history = _adapt(
            generator, op, y, z_best, steps=adapt_steps, lr=adapt_lr,
            z_lr=adapt_lr if adapt_z_lr is None else adapt_z_lr, z_penalty=z_penalty,
        )  # fmt: skip
    x = x.detach().to(like.dtype)
    prior, res_dc = x, res
    if data_consistency:
        with torch.no_grad():
            x = _data_consistency(op, x, y, dc_iterations)
            res_dc = (_sq_norm(op.forward(x) - y, n_out) / _sq_norm(y, n_out).clamp_min(1e-30)).sqrt()
    info = {
        "prior": prior,
        "residual": res,
        "residual_search": res_search,
        "residual_dc": res_dc,
        "scale": scale,
        "z": z_best,
        "restart": best,
        "objective": history,
        "adapt_objective": adapt_history,
        "seconds": time.perf_counter() - t0,
    }
    return x, info
