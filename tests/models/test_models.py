"""Neumann network, MoDL, U-Net post-processing and VarNet: contracts, gradients, training, persistence.

Every model takes ``(y, op)`` with ``y`` of shape ``(B, *op.out_shape)`` and returns
``(B, *op.in_shape)``: complex for MRI operators, real for CT. Sizes are tiny so that the
whole file runs in seconds on two cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import ModelError, build_model, load_model, save_model
from models.modl import MoDL, MoDLConfig, data_consistency
from models.unrolled import NORM_ITERATIONS
from models.varnet import VarNet, acs_window
from operators.ct import ParallelBeam, sparse_view_angles
from operators.linear import LinearOperator
from operators.masks import make_mask
from operators.mri import CartesianMRI, birdcage_maps, sense
from operators.phantoms import random_ellipsoids

#: Tiny configurations, one per registry name.
TINY: dict[str, dict] = {
    "neumann": {"n_blocks": 2, "features": 4},
    "modl": {"n_iter": 2, "cg_iter": 4, "features": 4},
    "unet_post": {"features": (4, 8, 16), "num_res_units": 1},
    "varnet": {"n_cascades": 2, "features": 4, "sens_features": 4},
}
NAMES = list(TINY)
SINGLE_OPERATOR_MODELS = ["neumann", "modl", "unet_post"]  # every operator; varnet takes SENSE only


def _line_mask(shape: tuple[int, ...], seed: int, acceleration: float = 2.0) -> torch.Tensor:
    """Random phase-encode lines along the last dimension with a fully sampled centre (ACS)."""
    return make_mask("random_1d", shape, acceleration, 0.25, seed)


def _operator(kind: str, shape: tuple[int, int] = (16, 16)) -> LinearOperator:
    """``mri``: single-coil Cartesian; ``ct``: parallel beam, 12 views; ``sense``: 4 birdcage coils."""
    if kind == "mri":
        return CartesianMRI(_line_mask(shape, 0))
    if kind == "ct":
        return ParallelBeam(shape, sparse_view_angles(12))
    if kind == "sense":
        return sense(_line_mask(shape, 0), birdcage_maps(shape, 4))
    raise AssertionError(kind)


def _measurements(op: LinearOperator, batch: int, seed: int) -> torch.Tensor:
    """``A x`` of random images ``x`` ``(batch, *op.in_shape)`` (complex for MRI), requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *op.in_shape, generator=g)
    if op.complex_in:
        x = torch.complex(x, 0.3 * torch.randn(batch, *op.in_shape, generator=g))
    return op.forward(x).detach().requires_grad_(True)


def _unzero(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill zero-initialised parameters (the last layers) with small random values, so all are in play."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def _real_objective(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A random linear functional of the output (of its real and imaginary parts for complex output)."""
    parts = torch.view_as_real(out) if out.is_complex() else out
    w = torch.randn(parts.shape, generator=torch.Generator().manual_seed(seed))
    return (parts * w).sum()


def _assert_gradients_everywhere(net: torch.nn.Module, y: torch.Tensor) -> None:
    assert y.grad is not None and torch.isfinite(y.grad.abs()).all()
    assert y.grad.abs().sum() > 0, "no gradient reached the measurements"
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"no finite gradient at {name}"
        assert p.grad.abs().sum() > 0, f"no gradient reached {name}"


# -- forward and backward on MRI and CT ------------------------------------------------------------
CASES = [(name, kind) for name in SINGLE_OPERATOR_MODELS for kind in ("mri", "ct")] + [("varnet", "sense")]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_forward_and_backward_on_mri_and_ct(name: str, kind: str) -> None:
    op = _operator(kind)
    net = _unzero(build_model(name, TINY[name]))
    y = _measurements(op, 2, seed=1)
    out = net(y, op)
    assert out.shape == (2, 16, 16)
    assert out.dtype == (torch.float32 if kind == "ct" else torch.complex64)
    _real_objective(out, seed=2).backward()
    _assert_gradients_everywhere(net, y)


@pytest.mark.parametrize("kind", ["mri", "ct"])
def test_varnet_refuses_operators_other_than_sense(kind: str) -> None:
    op = _operator(kind)
    net = build_model("varnet", TINY["varnet"])
    found = type(op).__name__
    with pytest.raises(TypeError, match=rf"VarNet needs a multi-coil operators.mri.SENSE .*found {found}"):
        net(op.forward(torch.zeros(1, *op.in_shape)), op)


# -- shapes and gradients at odd sizes -------------------------------------------------------------
ODD_CASES = [(name, kind) for name in SINGLE_OPERATOR_MODELS for kind in ("mri", "ct")] + [
    ("varnet", "sense")
]


@pytest.mark.parametrize(("name", "kind"), ODD_CASES)
def test_output_shape_dtype_and_gradients_at_odd_sizes(name: str, kind: str) -> None:
    op = _operator(kind, (15, 17))
    net = _unzero(build_model(name, TINY[name]), seed=3)
    y = _measurements(op, 2, seed=4)
    out = net(y, op)
    assert out.shape == (2, 15, 17)
    assert out.dtype == (torch.float32 if kind == "ct" else torch.complex64)
    _real_objective(out, seed=5).backward()
    _assert_gradients_everywhere(net, y)


def test_unet_post_takes_any_image_size() -> None:
    op = CartesianMRI(_line_mask((197, 233), 6))
    net = _unzero(build_model("unet_post", {"features": (4, 4, 4, 4), "num_res_units": 0}))
    with torch.no_grad():
        out = net(_measurements(op, 1, seed=7), op)
    assert out.shape == (1, 197, 233) and out.dtype == torch.complex64 and torch.isfinite(out.abs()).all()


# -- 3D --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["neumann", "unet_post"])
def test_spatial_dims_3_on_a_3d_cartesian_operator(name: str) -> None:
    g = torch.Generator().manual_seed(8)
    mask3d = torch.rand(8, 16, 16, generator=g) < 0.4
    mask3d[3:5, 6:10, 6:10] = True
    op = CartesianMRI(mask3d, ndim=3)
    kwargs = {**TINY[name], "spatial_dims": 3}
    net = _unzero(build_model(name, kwargs), seed=9)
    y = _measurements(op, 2, seed=10)
    out = net(y, op)
    assert out.shape == (2, 8, 16, 16) and out.dtype == torch.complex64
    _real_objective(out, seed=11).backward()
    _assert_gradients_everywhere(net, y)


@pytest.mark.parametrize("name", ["neumann", "modl", "unet_post"])
def test_spatial_dims_3_on_a_2d_operator_names_the_shape(name: str) -> None:
    net = build_model(name, {**TINY[name], "spatial_dims": 3})
    op = _operator("mri")
    with pytest.raises(
        ValueError, match=r"spatial_dims=3 needs images with at least 3 dimensions.*\(16, 16\)"
    ):
        net(_measurements(op, 1, seed=0), op)


def test_unet_post_says_when_an_image_is_too_small_for_its_levels() -> None:
    net = build_model("unet_post", {"features": (4, 4, 4, 4, 4)})  # 4 halvings: 16 -> 1
    op = _operator("mri")
    with pytest.raises(ValueError, match=r"too small for a U-Net of 4 levels.*shorter features tuple"):
        net(_measurements(op, 1, seed=0), op)


# -- untrained networks are their classical counterparts, and every network is scale invariant ------
def test_untrained_networks_reduce_to_classical_reconstructions() -> None:
    mri, ct = _operator("mri"), _operator("ct")
    y_mri, y_ct = _measurements(mri, 2, seed=12).detach(), _measurements(ct, 2, seed=13).detach()
    with torch.no_grad():
        # U-Net post-processing starts as the direct reconstruction: FBP, zero-filled.
        unet = build_model("unet_post", TINY["unet_post"])
        torch.testing.assert_close(unet(y_ct, ct), ct.pseudo_inverse(y_ct))
        torch.testing.assert_close(unet(y_mri, mri), mri.pseudo_inverse(y_mri))
        # With η‖A‖² = 1 and R = 0 the Neumann series for a Cartesian projector stops at Aᴴy.
        zero_filled = mri.adjoint(y_mri)
        torch.testing.assert_close(build_model("neumann", TINY["neumann"])(y_mri, mri), zero_filled)
        # MoDL's proximal steps keep Aᴴy, which already solves the normal equations.
        torch.testing.assert_close(build_model("modl", TINY["modl"])(y_mri, mri), zero_filled)
        # VarNet with hard data consistency keeps k = y: the coil combination with its estimated maps.
        op = _operator("sense")
        y = _measurements(op, 2, seed=14).detach()
        net = build_model("varnet", TINY["varnet"])
        expected = op.with_maps(net.estimate_maps(y, op)).adjoint(y)
        torch.testing.assert_close(net(y, op), expected)


def test_untrained_neumann_network_is_landweber_iteration_from_zero() -> None:
    """Σ_{k=0..K} (I − η AᴴA)^k η Aᴴy with η = 1/‖A‖² is K + 1 Landweber steps x ← x + η Aᴴ(y − A x)."""
    op = _operator("ct")
    y = _measurements(op, 2, seed=24).detach()
    eta = 1 / op.norm(n_iter=NORM_ITERATIONS) ** 2
    x = torch.zeros(2, *op.in_shape)
    for _ in range(TINY["neumann"]["n_blocks"] + 1):
        x = x + eta * op.adjoint(y - op.forward(x))
    with torch.no_grad():
        torch.testing.assert_close(build_model("neumann", TINY["neumann"])(y, op), x, rtol=1e-4, atol=1e-5)


def test_untrained_modl_lowers_the_ct_data_residual_below_fbp() -> None:
    op = ParallelBeam((24, 24), sparse_view_angles(18))
    x = torch.zeros(1, 24, 24)
    x[:, 6:18, 8:16] = 1.0
    y = op.forward(x)
    residual = lambda z: float(torch.linalg.vector_norm(op.forward(z) - y))  # noqa: E731
    with torch.no_grad():
        assert residual(build_model("modl", TINY["modl"])(y, op)) < 0.5 * residual(op.pseudo_inverse(y))


@pytest.mark.parametrize("name", NAMES)
def test_networks_are_scale_invariant(name: str) -> None:
    op = _operator("sense" if name == "varnet" else "mri")
    net = _unzero(build_model(name, TINY[name]), seed=15)
    y = _measurements(op, 2, seed=16).detach()
    with torch.no_grad():
        torch.testing.assert_close(net(1000 * y, op), 1000 * net(y, op), rtol=1e-4, atol=1e-3)


# -- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_tiny_training_run_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)  # parameter initialisation
    x = torch.from_numpy(random_ellipsoids((4, 16, 16), seed=0).image).to(torch.complex64)  # 4 slices
    mask = make_mask("random_1d", (16, 16), 4, 0.08, 3)
    op = sense(mask, birdcage_maps((16, 16), 4)) if name == "varnet" else CartesianMRI(mask)
    y = op.forward(x)
    net = build_model(name, TINY[name])
    loss_of = lambda: torch.mean(torch.abs(net(y, op) - x) ** 2)  # noqa: E731
    with torch.no_grad():
        before = float(loss_of())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = loss_of()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_of())
    assert after < 0.8 * before, f"{name}: loss {before:.4g} -> {after:.4g}"


# -- persistence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_registry_round_trip_through_safetensors(name: str, tmp_path) -> None:
    kwargs = TINY[name]
    net = build_model(name, kwargs)
    g = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_model(net, name, kwargs, tmp_path / "m")
    loaded, spec = load_model(tmp_path / "m")
    assert spec == {"name": name, "kwargs": json.loads(json.dumps(kwargs))}
    assert type(loaded) is type(net) and loaded.config == net.config
    original, restored = net.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for key, value in original.items():
        assert torch.equal(value, restored[key]), key
    op = _operator("sense" if name == "varnet" else "mri")
    y = _measurements(op, 1, seed=18).detach()
    with torch.no_grad():
        torch.testing.assert_close(loaded(y, op), net.eval()(y, op))


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_keyword_raises_model_error_naming_it(name: str) -> None:
    with pytest.raises(ModelError, match=rf"model '{name}': bad keyword arguments .*bogus"):
        build_model(name, {"bogus": 1})


@pytest.mark.parametrize("name", NAMES)
def test_config_dict_rebuilds_the_same_architecture(name: str) -> None:
    net = build_model(name, TINY[name])
    rebuilt = build_model(name, json.loads(json.dumps(net.config_dict())))
    assert rebuilt.config == net.config


# -- MoDL's data consistency -----------------------------------------------------------------------
def test_modl_data_consistency_matches_a_dense_solve_per_item() -> None:
    """Unrolled CG on (AᴴA + λ I) x = b equals np.linalg.solve, with one λ per batch item."""
    op = ParallelBeam((5, 6), sparse_view_angles(4))
    n = 30
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 5, 6)
    normal = op.normal(basis).reshape(n, n).T.numpy()  # column j = AᴴA e_j
    g = torch.Generator().manual_seed(19)
    b = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    lam = torch.tensor([0.5, 3.0], dtype=torch.float64)
    x = data_consistency(op, b, lam, n_iter=n)
    for i in range(2):
        expected = np.linalg.solve(normal + float(lam[i]) * np.eye(n), b[i].reshape(n).numpy())
        np.testing.assert_allclose(x[i].reshape(n).numpy(), expected, rtol=1e-8, atol=1e-10)


def test_modl_data_consistency_is_differentiable_in_lambda_and_rhs() -> None:
    op = _operator("mri")
    lam = torch.tensor(0.3, requires_grad=True)
    b = torch.randn(2, 16, 16, dtype=torch.complex64, generator=torch.Generator().manual_seed(20))
    b.requires_grad_(True)
    _real_objective(data_consistency(op, b, lam, n_iter=3), seed=21).backward()
    assert lam.grad is not None and lam.grad != 0 and b.grad is not None and b.grad.abs().sum() > 0


# -- VarNet's coil maps ----------------------------------------------------------------------------
def test_acs_window_is_the_contiguous_sampled_run_around_the_centre() -> None:
    mask = torch.zeros(2, 4, 16)
    mask[0][:, [2, 6, 7, 8, 9, 11]] = 1  # run 6..9 around centre 8
    mask[1][:, [0, 8, 9, 10, 15]] = 1  # run 8..10
    window = acs_window(mask)
    assert window.shape == (2, 16)
    assert torch.nonzero(window[0]).flatten().tolist() == [6, 7, 8, 9]
    assert torch.nonzero(window[1]).flatten().tolist() == [8, 9, 10]
    no_centre = torch.zeros(4, 16)
    no_centre[:, 7] = 1
    assert not acs_window(no_centre).any()


def test_varnet_needs_a_sampled_centre() -> None:
    mask = torch.zeros(16, 16)
    mask[:, ::3] = 1  # column 8 is not sampled
    op = sense(mask, birdcage_maps((16, 16), 4))
    with pytest.raises(ValueError, match=r"does not sample the centre column W // 2 = 8.*center_fraction"):
        build_model("varnet", TINY["varnet"])(_measurements(op, 1, seed=0), op)


def test_estimated_maps_have_unit_sum_of_squares_and_refuse_3d_sense() -> None:
    op = _operator("sense")
    net = _unzero(build_model("varnet", TINY["varnet"]), seed=22)
    y = _measurements(op, 2, seed=23).detach()
    with torch.no_grad():
        maps = net.estimate_maps(y, op)
    assert maps.shape == (2, 4, 16, 16) and maps.dtype == torch.complex64
    sos = (maps.abs() ** 2).sum(dim=1)  # (2, 16, 16)
    torch.testing.assert_close(sos, torch.ones_like(sos), rtol=0, atol=1e-4)
    op3 = sense(torch.ones(4, 8, 8), birdcage_maps((4, 8, 8), 2), ndim=3)
    with pytest.raises(TypeError, match="VarNet needs a 2D SENSE operator"):
        VarNet.check_operator(op3)


def test_modl_gradients_stay_finite_when_cg_converges_before_its_last_step() -> None:
    """Cartesian MRI: AᴴA + λI has two eigenvalues, so CG is exact after two steps; eight more must
    not divide rounding noise by rounding noise (that overflowed to NaN in float32 training)."""
    from operators.masks import make_mask
    from operators.mri import CartesianMRI
    from operators.phantoms import random_ellipsoids

    op = CartesianMRI(make_mask("random_1d", (32, 32), 4, 0.08, 3).to(torch.float32))
    x = torch.from_numpy(random_ellipsoids((4, 32, 32), seed=3).image)
    net = MoDL(MoDLConfig(n_iter=3, cg_iter=10, features=8))
    with torch.no_grad():
        net.denoiser.net[-1].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    (net(op.forward(x.to(torch.complex64)), op).abs() - x).abs().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters()), "a gradient is NaN or infinite"


# -- the preconditioned Neumann network --------------------------------------------------------------
def test_preconditioned_neumann_equals_the_plain_one_where_the_pseudo_inverse_is_the_adjoint() -> None:
    """Cartesian MRI: A⁺ = Aᴴ, so ρ(A⁺A) = ‖A‖² and both series are the same network."""
    op = _operator("mri")
    y = _measurements(op, 2, seed=31).detach()
    plain = _unzero(build_model("neumann", TINY["neumann"]))
    pre = build_model("neumann", {**TINY["neumann"], "precondition": True})
    pre.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pre(y, op), plain(y, op), rtol=1e-3, atol=1e-4)


def test_untrained_preconditioned_neumann_is_the_fbp_series_and_beats_landweber_on_sparse_view_ct() -> None:
    """Σ_{k=0..K} (I − η A⁺A)^k η A⁺y with η = 1/ρ(A⁺A), A⁺ = FBP; closer to the image than K + 1
    Landweber steps, which recover CT's high frequencies only after many more terms."""
    from models.neumann import pseudo_inverse_radius

    op = ParallelBeam((32, 32), sparse_view_angles(24))
    image = torch.from_numpy(random_ellipsoids((1, 32, 32), seed=3).image).float()  # (1, H, W)
    y = op.forward(image)
    eta = 1 / pseudo_inverse_radius(op)
    term = eta * op.pseudo_inverse(y)
    expected = term
    for _ in range(4):
        term = term - eta * op.pseudo_inverse(op.forward(term))
        expected = expected + term
    config = {"n_blocks": 4, "features": 4}
    with torch.no_grad():
        pre = build_model("neumann", {**config, "precondition": True})(y, op)
        plain = build_model("neumann", config)(y, op)
    torch.testing.assert_close(pre, expected, rtol=1e-4, atol=1e-5)
    error_pre, error_plain = float((pre - image).norm()), float((plain - image).norm())
    assert error_pre < 0.6 * error_plain, (error_pre, error_plain)  # measured: 1.74 against 3.44


def test_preconditioned_neumann_trains_end_to_end_on_ct() -> None:
    op = _operator("ct")
    net = _unzero(build_model("neumann", {**TINY["neumann"], "precondition": True}))
    y = _measurements(op, 2, seed=32)
    out = net(y, op)
    assert out.shape == (2, *op.in_shape) and not out.is_complex()
    _real_objective(out, seed=33).backward()
    _assert_gradients_everywhere(net, y)


@pytest.mark.parametrize("kind", ["mri", "ct"])
def test_neumann_with_a_unet_regulariser_starts_as_the_plain_series_and_trains_on_odd_sizes(kind: str):
    """The U-Net regulariser is zero at initialisation (same output as the CNN form), takes sizes
    that are not multiples of 2**levels, and every parameter gets a gradient, on complex and real images."""
    shape = (15, 17)
    op = CartesianMRI(_line_mask(shape, 0)) if kind == "mri" else ParallelBeam(shape, sparse_view_angles(12))
    y = _measurements(op, 2, seed=41)
    config = {"n_blocks": 2, "features": 4, "regularizer": "unet", "levels": 2}
    with torch.no_grad():
        torch.testing.assert_close(
            build_model("neumann", config)(y, op), build_model("neumann", TINY["neumann"])(y, op)
        )
    net = _unzero(build_model("neumann", config), seed=42)
    out = net(y, op)
    assert out.shape == (2, *op.in_shape) and out.is_complex() == op.complex_in
    _real_objective(out, seed=43).backward()
    _assert_gradients_everywhere(net, y)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("regularizer", "resnet", "'cnn' or 'unet'; found 'resnet'"),
        ("levels", 0, "levels must be >= 1; found 0"),
    ],
)
def test_neumann_config_names_a_bad_regulariser(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model("neumann", {field: value})
