"""DCGAN prior: network contracts, gradients, a tiny training run, and latent-search reconstruction.

Sizes are tiny (16x16 images, a few features) so that the file runs in seconds on one thread.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from models.gan import (
    DCGANConfig,
    DCGANDiscriminator,
    DCGANGenerator,
    gan_prior_reconstruct,
    normalise_slices,
    prior_objective,
    train_dcgan,
)
from operators.fft import fftc
from operators.linear import Diagonal
from operators.masks import make_mask
from operators.metrics import psnr
from operators.mri import CartesianMRI, birdcage_maps, sense

TINY = DCGANConfig(latent=8, image_size=16, features=4)


def _two_images() -> torch.Tensor:
    """Two fixed 16x16 images in [0, 1]: a bright disc and a dimmer square, on a zero background."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    disc = (((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 30).float()
    square = torch.zeros(16, 16)
    square[4:12, 3:13] = 0.6
    return torch.stack([disc, square])  # (2, 16, 16)


def _target_generator(seed: int = 0) -> DCGANGenerator:
    """A generator whose BatchNorm statistics are those of its own samples (as after training)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = DCGANGenerator(TINY)
        g.train()
        with torch.no_grad():
            for m in g.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = None
            g(torch.randn(64, TINY.latent))
    return g.eval()


# -- contracts -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "disc_norm", "minibatch_std"),
    [(16, "spectral", True), (32, "batch", True), (64, "spectral", False), (16, "batch", False)],
)
def test_shapes(size, disc_norm, minibatch_std):
    cfg = DCGANConfig(latent=5, image_size=size, features=2, disc_norm=disc_norm, minibatch_std=minibatch_std)
    g, d = DCGANGenerator(cfg), DCGANDiscriminator(cfg)
    x = g(torch.randn(3, 5))
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    logits = d(x)
    assert logits.shape == (3,) and logits.dtype == torch.float32
    assert g.config.stages == {16: 2, 32: 3, 64: 4}[size]
    assert d.eval()(x[:1]).shape == (1,)  # one image (the minibatch deviation is then 0)


def test_softplus_output_is_positive():
    g = DCGANGenerator(DCGANConfig(latent=4, image_size=16, features=2, output="softplus")).eval()
    assert bool((g(torch.randn(4, 4) * 10) > 0).all())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 24},
        {"image_size": 8},
        {"latent": 0},
        {"features": 0},
        {"output": "tanh"},
        {"disc_norm": "layer"},
    ],
)
def test_config_rejects(kwargs):
    with pytest.raises(ValueError, match="DCGANConfig"):
        DCGANConfig(**kwargs)


def test_bad_inputs_say_what_was_expected():
    g, d = DCGANGenerator(TINY), DCGANDiscriminator(TINY)
    with pytest.raises(ValueError, match="latent=8"):
        g(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"\(B, 16, 16\)"):
        d(torch.rand(2, 15, 16))
    with pytest.raises(ValueError, match="image_size matching"):
        gan_prior_reconstruct(
            g, CartesianMRI(torch.ones(32, 32)), torch.zeros(1, 32, 32, dtype=torch.complex64)
        )


def test_normalise_slices():
    images = torch.rand(3, 16, 16) * torch.tensor([1.0, 5.0, 100.0])[:, None, None]
    out, scale = normalise_slices(images)
    assert scale.shape == (3,)
    torch.testing.assert_close(out * scale[:, None, None], images)
    q = torch.quantile(out.flatten(1), 0.995, dim=1)
    torch.testing.assert_close(q, torch.ones(3))


def test_config_dict_rebuilds():
    g = DCGANGenerator(TINY)
    assert DCGANGenerator(DCGANConfig(**g.config_dict())).config == TINY


# -- gradients -------------------------------------------------------------------------------------
def test_gradients_reach_every_parameter():
    g, d = DCGANGenerator(TINY), DCGANDiscriminator(TINY)
    g.train()
    z = torch.randn(4, TINY.latent, requires_grad=True)
    loss = F.binary_cross_entropy_with_logits(d(g(z)), torch.ones(4))
    loss.backward()
    for name, module in (("G", g), ("D", d)):
        for pname, p in module.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0, f"{name}.{pname}"
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


def test_latent_objective_gradient_reaches_z():
    g = _target_generator()
    op = CartesianMRI(make_mask("random_1d", (16, 16), 2, 0.25, 0))
    y = op.forward(torch.rand(3, 16, 16).to(torch.complex64))
    z = torch.randn(2, 3, TINY.latent, requires_grad=True)  # (restarts, B, L)
    objective, residual, x, scale = prior_objective(g, op, y, z, z_penalty=1e-3)
    assert objective.shape == residual.shape == scale.shape == (2, 3)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.complex64
    objective.sum().backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())
    assert bool((z.grad.flatten(1).abs().sum(dim=1) > 0).all())  # every code of every item


def test_scale_is_the_least_squares_one():
    """``s(z) = <AG, y> / ||AG||²``: a measurement of ``c·G(z)`` gives residual 0 and scale ``c``."""
    g = _target_generator()
    op = CartesianMRI(make_mask("random_1d", (16, 16), 2, 0.25, 1))
    z = torch.randn(2, TINY.latent, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = op.forward((3.5 * g(z)).to(torch.complex64))
        _, residual, _, scale = prior_objective(g, op, y, z, z_penalty=0.0)
    torch.testing.assert_close(scale, torch.full((2,), 3.5 + 0j), rtol=1e-4, atol=1e-4)
    assert float(residual.max()) < 1e-4


# -- training --------------------------------------------------------------------------------------
def test_tiny_training_moves_towards_the_data():
    data = _two_images()
    probe = torch.randn(64, TINY.latent, generator=torch.Generator().manual_seed(7))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # train_dcgan's initial weights for seed 0
        g0 = DCGANGenerator(TINY)
    g, _, history = train_dcgan(data, TINY, steps=150, batch_size=8, lr=2e-3, seed=0)
    with torch.no_grad():
        before = g0.train()(probe).mean(dim=0)  # untrained: BatchNorm statistics of its own batch
        after = g(probe).mean(dim=0)
    target = data.mean(dim=0)
    err_before = float(((before - target) ** 2).mean())
    err_after = float(((after - target) ** 2).mean())
    assert err_after < 0.5 * err_before, (err_before, err_after)
    assert len(history["loss_d"]) == len(history["loss_g"]) == 150
    early, late = sum(history["loss_d"][:10]) / 10, sum(history["loss_d"][-10:]) / 10
    assert abs(late - early) > 0.05, (early, late)
    assert not g.training


def test_training_is_seeded_and_leaves_global_rng_alone():
    data = _two_images()
    state = torch.get_rng_state()
    g1, d1, h1 = train_dcgan(data, TINY, steps=5, batch_size=4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    g2, d2, h2 = train_dcgan(data, TINY, steps=5, batch_size=4, seed=3)
    g3, _, _ = train_dcgan(data, TINY, steps=5, batch_size=4, seed=4)
    assert h1["loss_d"] == h2["loss_d"]
    for (k, a), b in zip(g1.state_dict().items(), g2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(d1.state_dict().values(), d2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    z = torch.randn(2, TINY.latent)
    assert not torch.equal(g1(z), g3(z))


def test_on_step_and_validation():
    seen = []
    train_dcgan(_two_images(), TINY, steps=3, batch_size=2, seed=0, on_step=lambda i, e: seen.append((i, e)))
    assert [i for i, _ in seen] == [0, 1, 2]
    assert set(seen[0][1]) == {"loss_d", "loss_g", "d_real", "d_fake"}
    with pytest.raises(ValueError, match=r"\(N, 16, 16\)"):
        train_dcgan(torch.rand(2, 8, 8), TINY, steps=1)


# -- reconstruction ------------------------------------------------------------------------------
def _in_range_problem(seed: int = 0):
    """``y = A G(z*)`` (noiseless) at 2x, three items."""
    g = _target_generator()
    op = CartesianMRI(torch.stack([make_mask("random_1d", (16, 16), 2, 0.25, seed + i) for i in range(3)]))
    z_star = torch.randn(3, TINY.latent, generator=torch.Generator().manual_seed(seed + 11))
    with torch.no_grad():
        x_star = g(z_star)  # (3, 16, 16)
    return g, op, op.forward(x_star.to(torch.complex64)), x_star


def test_recon_beats_zero_filled_on_images_in_the_range():
    g, op, y, x_star = _in_range_problem()
    x, info = gan_prior_reconstruct(g, op, y, steps=300, lr=0.05, restarts=3, seed=0, z_penalty=0.0)
    zf = op.pseudo_inverse(y)
    assert x.shape == (3, 16, 16) and x.dtype == zf.dtype == torch.complex64

    # An untrained G's images have both signs: compare complex images (and real parts for PSNR).
    def err(a: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(a - x_star, dim=(-2, -1)) / torch.linalg.vector_norm(
            x_star, dim=(-2, -1)
        )

    # The data residual of zero filling is exactly 0 for a Cartesian mask (A Aᴴ y = M y = y), so
    # compare image errors: the prior's must be far below zero filling's, item by item.
    assert bool((err(x) < 0.3 * err(zf)).all()), (err(x), err(zf))
    assert float(info["residual"].max()) < 0.05, info["residual"]
    for i in range(3):
        rng = float(x_star[i].max() - x_star[i].min())
        assert psnr(x[i].real, x_star[i], rng) > psnr(zf[i].real, x_star[i], rng) + 6
    assert info["z"].shape == (3, TINY.latent) and info["restart"].shape == (3,)
    assert info["objective"][-1] < info["objective"][0]


def test_data_consistency_matches_the_measurements():
    g, op, _, _ = _in_range_problem(seed=5)
    y = op.forward(torch.rand(3, 16, 16).to(torch.complex64))  # not in the range of G
    x, info = gan_prior_reconstruct(g, op, y, steps=20, data_consistency=True)
    torch.testing.assert_close(op.forward(x), y, atol=1e-5, rtol=1e-5)
    assert float(info["residual_dc"].max()) < 1e-5 < float(info["residual"].min())
    x0, _ = gan_prior_reconstruct(g, op, y, steps=20, data_consistency=False)
    # DC changes only the measured k-space samples: the unmeasured ones stay those of the prior.
    k, k0 = fftc(x, 2), fftc(x0, 2)  # (3, 16, 16), centred like the mask
    unmeasured = op.mask == 0  # (3, 16, 16)
    torch.testing.assert_close(k[unmeasured], k0[unmeasured], atol=1e-5, rtol=1e-5)


def test_data_consistency_without_a_mask_reduces_the_residual():
    """SENSE has no samples to replace: a few CG steps on the data term instead."""
    g = _target_generator()
    op = sense(make_mask("random_1d", (16, 16), 2, 0.25, 0), birdcage_maps((16, 16), 4))
    y = op.forward(torch.rand(2, 16, 16).to(torch.complex64))
    x, info = gan_prior_reconstruct(g, op, y, steps=10, data_consistency=True, dc_iterations=10)
    assert x.shape == (2, 16, 16)
    assert bool((info["residual_dc"] < 0.5 * info["residual"]).all()), info


def test_real_operator():
    """A real operator (a diagonal stand-in for CT) gives real images."""
    g = _target_generator()
    op = Diagonal(torch.rand(16, 16) + 0.5)
    y = op.forward(torch.rand(2, 16, 16))
    x, info = gan_prior_reconstruct(g, op, y, steps=5, data_consistency=True, dc_iterations=3)
    assert x.dtype == torch.float32 and x.shape == (2, 16, 16)
    assert info["scale"].dtype == torch.float32


def test_recon_is_deterministic_and_leaves_the_generator_alone():
    g, op, y, _ = _in_range_problem()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    g.train()  # the caller's mode is restored afterwards
    state = torch.get_rng_state()
    x1, i1 = gan_prior_reconstruct(g, op, y, steps=15, seed=2)
    x2, i2 = gan_prior_reconstruct(g, op, y, steps=15, seed=2)
    x3, _ = gan_prior_reconstruct(g, op, y, steps=15, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(x1, x2) and i1["objective"] == i2["objective"]
    assert not torch.equal(x1, x3)
    assert g.training and all(p.requires_grad and p.grad is None for p in g.parameters())
    for k, v in g.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- image-adaptive refinement -------------------------------------------------------------------
def _out_of_range_problem():
    """``y`` of two fixed shapes (not images of ``G``) at 2x, with the search's residual far from 0."""
    g = _target_generator()
    op = CartesianMRI(torch.stack([make_mask("random_1d", (16, 16), 2, 0.25, i) for i in range(2)]))
    return g, op, op.forward(_two_images().to(torch.complex64))


def test_adaptation_fits_the_data_far_better_than_the_search_alone():
    g, op, y = _out_of_range_problem()
    common = {"steps": 50, "lr": 0.05, "restarts": 2, "seed": 0, "z_penalty": 1e-3}
    x0, i0 = gan_prior_reconstruct(g, op, y, **common)
    x, info = gan_prior_reconstruct(g, op, y, adapt_steps=60, adapt_lr=3e-3, **common)
    assert x.shape == x0.shape == (2, 16, 16) and x.dtype == torch.complex64
    assert info["scale"].shape == (2,) and info["z"].shape == (2, TINY.latent)
    # the adaptation starts from the search's result: the same code and residual
    torch.testing.assert_close(info["residual_search"], i0["residual"])
    torch.testing.assert_close(info["z"], i0["z"])
    assert len(info["adapt_objective"]) == 60 and i0["adapt_objective"] == []
    assert info["adapt_objective"][-1] < 0.5 * info["adapt_objective"][0]
    assert bool((info["residual"] < 0.5 * info["residual_search"]).all()), info
    # the residual reported is that of the image returned
    norm = torch.linalg.vector_norm
    direct = norm(op.forward(x) - y, dim=(-2, -1)) / norm(y, dim=(-2, -1))
    torch.testing.assert_close(info["residual"], direct, rtol=1e-4, atol=1e-5)


def test_adaptation_is_deterministic_and_leaves_the_generator_alone():
    g, op, y = _out_of_range_problem()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    state = torch.get_rng_state()
    run = {"steps": 10, "adapt_steps": 8, "adapt_lr": 1e-3, "data_consistency": True}
    x1, i1 = gan_prior_reconstruct(g, op, y, seed=1, **run)
    x2, i2 = gan_prior_reconstruct(g, op, y, seed=1, **run)
    x3, _ = gan_prior_reconstruct(g, op, y, seed=2, **run)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(x1, x2) and i1["adapt_objective"] == i2["adapt_objective"]
    assert not torch.equal(x1, x3)
    assert not g.training and all(p.requires_grad and p.grad is None for p in g.parameters())
    for k, v in g.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(op.forward(x1), y, atol=1e-5, rtol=1e-5)  # then data consistency


def test_adaptation_items_are_independent():
    """Each item adapts its own copy of G: an item's result does not depend on the others in the batch."""
    g, op, y = _out_of_range_problem()
    run = {"steps": 10, "adapt_steps": 8, "adapt_lr": 1e-3}
    other = torch.stack([y[0], 3 * y[1].flip(-1)])  # the same first item, another second one
    x, i = gan_prior_reconstruct(g, op, y, **run)
    x2, i2 = gan_prior_reconstruct(g, op, other, **run)
    torch.testing.assert_close(x[0], x2[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(x[1], x2[1])
    assert i["adapt_objective"] != i2["adapt_objective"]


def test_adaptation_steps_must_not_be_negative():
    g, op, y = _out_of_range_problem()
    with pytest.raises(ValueError, match="adapt_steps >= 0; found 2, 300, -1"):
        gan_prior_reconstruct(g, op, y, adapt_steps=-1)
