"""Classical reconstructions by name on MRI, CT and low-resolution operators (operators/recon.py)."""

import math

import numpy as np
import pytest
import torch

from operators.ct import ParallelBeam, fbp, sparse_view_angles
from operators.errors import ParameterError
from operators.linear import Identity
from operators.masks import random_1d
from operators.mri import CartesianMRI, birdcage_maps, sense
from operators.recon import METHODS, ReconResult, reconstruct
from operators.resolution import Downsample, bicubic_upsample

N = 64  # image size of the integration problems


def _phantom(n: int, seed: int) -> np.ndarray:
    """A piecewise-constant ``(n, n)`` image in [0, 1]: a body ellipse and six random ellipses."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    img = np.zeros((n, n))
    img[(xx / 0.8) ** 2 + (yy / 0.9) ** 2 <= 1] = 0.5
    for _ in range(6):
        cx, cy = rng.uniform(-0.4, 0.4, 2)
        a, b = rng.uniform(0.08, 0.3, 2)
        th = rng.uniform(0, np.pi)
        xr = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        yr = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        img[(xr / a) ** 2 + (yr / b) ** 2 <= 1] = rng.uniform(0.1, 1.0)
    return img


def _psnr(x: torch.Tensor, truth: np.ndarray) -> float:
    """PSNR of ``|x|`` against ``truth`` with the truth's data range."""
    mse = float(np.mean((x.abs().numpy().astype(np.float64) - truth) ** 2))
    return 10 * math.log10(float(truth.max() - truth.min()) ** 2 / mse)


def _add_noise(y: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    """Gaussian noise of ``level`` times the RMS of the measured (nonzero) samples."""
    g = torch.Generator().manual_seed(seed)
    measured = y != 0
    rms = y[measured].abs().pow(2).mean().sqrt()
    e = torch.randn(y.shape, generator=g, dtype=y.real.dtype)
    if y.is_complex():
        e = torch.complex(e, torch.randn(y.shape, generator=g, dtype=y.real.dtype)) / math.sqrt(2)
    return y + level * rms * e * measured


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return np.stack([_phantom(N, seed) for seed in range(2)])  # (2, N, N)


@pytest.fixture(scope="module")
def single_coil(truth):
    op = CartesianMRI(random_1d((N, N), acceleration=4, center_fraction=0.08, seed=0))
    y = _add_noise(op.forward(torch.from_numpy(truth).to(torch.complex64)), 0.01, seed=1)  # (2, N, N)
    return op, y


# -- names and errors ------------------------------------------------------------------------------
def test_registry_names():
    assert set(METHODS) == {"zero_filled", "fbp", "nearest", "bicubic", "cg_sense", "cs_wavelet", "cs_tv"}
    assert all(METHODS[name].name == name for name in METHODS)


def test_unknown_method_lists_the_valid_names():
    names = r"\['bicubic', 'cg_sense', 'cs_tv', 'cs_wavelet', 'fbp', 'nearest', 'zero_filled'\]"
    with pytest.raises(ParameterError, match=rf"method must be one of {names}; found 'cs_tvv'"):
        reconstruct("cs_tvv", torch.ones(4, 4), Identity((4, 4)))


def test_fbp_needs_a_ct_operator(single_coil):
    op, y = single_coil
    with pytest.raises(ParameterError, match=r"'fbp' needs a CT operator.*found CartesianMRI.*zero_filled"):
        reconstruct("fbp", y, op)


def test_bad_options_are_refused():
    with pytest.raises(ParameterError, match=r"lam must be a finite number >= 0.*found -0.1"):
        reconstruct("cs_tv", torch.ones(4, 4), Identity((4, 4)), lam=-0.1)
    with pytest.raises(ParameterError, match=r"wavelet must be one of \('haar', 'db4'\); found 'sym8'"):
        reconstruct("cs_wavelet", torch.ones(4, 4), Identity((4, 4)), wavelet="sym8")  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"at least 2 x 2 pixels.*\(1, 6\).*'cs_tv'"):
        reconstruct(
            "cs_wavelet", torch.ones(1, 6), Identity((1, 6))
        )  # odd sizes are padded; 1 row is too few
    with pytest.raises(ParameterError, match=r"max_iter must be an int >= 0.*found -3"):
        reconstruct("cg_sense", torch.ones(4, 4), Identity((4, 4)), max_iter=-3)


# -- MRI -------------------------------------------------------------------------------------------
def test_zero_filled_is_the_adjoint_for_mri(single_coil):
    op, y = single_coil
    result = reconstruct("zero_filled", y, op)
    assert isinstance(result, ReconResult)
    assert torch.equal(result.image, op.adjoint(y))
    assert (result.method, result.iterations, result.converged) == ("zero_filled", 0, True)
    assert math.isnan(result.residual)


def test_cg_sense_converges_on_4x_8_coil_data(truth):
    maps = birdcage_maps((N, N), 8, dtype=torch.complex128)
    op = sense(random_1d((N, N), acceleration=4, center_fraction=0.08, seed=0), maps)
    y = op.forward(torch.from_numpy(truth).to(torch.complex128))  # (2, 8, N, N)
    tol = 1e-6
    result = reconstruct("cg_sense", y, op, tol=tol, max_iter=200)
    assert result.converged and result.residual <= tol and 0 < result.iterations < 200
    # Independently: the normal equations (AᴴA + λI) x = Aᴴy hold, λ = lam · ‖A‖².
    lam = METHODS["cg_sense"].lam * op.norm() ** 2
    aty = op.adjoint(y)
    lhs = op.normal(result.image) + lam * result.image
    rel = torch.linalg.vector_norm(lhs - aty, dim=(-2, -1)) / torch.linalg.vector_norm(aty, dim=(-2, -1))
    assert float(rel.max()) < 10 * tol
    zero_filled = reconstruct("zero_filled", y, op).image
    for i in range(2):
        assert _psnr(result.image[i], truth[i]) > _psnr(zero_filled[i], truth[i]) + 1.0


def test_cs_tv_beats_zero_filled_by_4db_at_4x(single_coil, truth):
    op, y = single_coil
    zf = reconstruct("zero_filled", y, op).image
    result = reconstruct("cs_tv", y, op)
    assert result.image.shape == (2, N, N) and result.image.dtype == torch.complex64
    gains = [_psnr(result.image[i], truth[i]) - _psnr(zf[i], truth[i]) for i in range(2)]
    assert min(gains) >= 4.0, gains


def test_cs_wavelet_beats_zero_filled_at_4x(single_coil, truth):
    op, y = single_coil
    zf = reconstruct("zero_filled", y, op).image
    result = reconstruct("cs_wavelet", y, op)
    gains = [_psnr(result.image[i], truth[i]) - _psnr(zf[i], truth[i]) for i in range(2)]
    assert min(gains) >= 1.0, gains


def test_cs_wavelet_db4_without_cycle_spinning_runs(single_coil, truth):
    op, y = single_coil
    result = reconstruct(
        "cs_wavelet", y[:1], op, wavelet="db4", wavelet_shifts=1, wavelet_levels=3, max_iter=30
    )
    assert result.image.shape == (1, N, N) and result.iterations <= 30
    assert math.isfinite(_psnr(result.image[0], truth[0]))


@pytest.mark.parametrize("method", ["cs_tv", "cs_wavelet"])
def test_relative_weight_makes_reconstruction_scale_equivariant(single_coil, method):
    op, y = single_coil
    a = reconstruct(method, y, op, max_iter=15, tol=0.0).image
    b = reconstruct(method, 10.0 * y, op, max_iter=15, tol=0.0).image
    assert torch.allclose(b, 10.0 * a, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_batch_items_are_reconstructed_independently(single_coil):
    op, y = single_coil
    both = reconstruct("cs_tv", y, op, max_iter=20, tol=0.0).image
    second = reconstruct("cs_tv", y[1], op, max_iter=20, tol=0.0).image
    assert torch.allclose(both[1], second, atol=1e-5 * float(second.abs().max()))


# -- CT --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sparse_view(truth):
    op = ParallelBeam((N, N), sparse_view_angles(30))
    return op, op.forward(torch.from_numpy(truth).float())  # (2, 30, N)


def test_ct_fbp_and_zero_filled_are_fbp(sparse_view):
    op, y = sparse_view
    assert torch.equal(reconstruct("fbp", y, op).image, fbp(y, op))
    assert torch.equal(reconstruct("zero_filled", y, op).image, fbp(y, op))
    assert torch.equal(reconstruct("fbp", y, op, fbp_filter="hann").image, fbp(y, op, "hann"))


def test_ct_cs_tv_beats_fbp_with_30_views(sparse_view, truth):
    op, y = sparse_view
    ref = reconstruct("fbp", y, op).image
    result = reconstruct("cs_tv", y, op)
    assert result.image.dtype == torch.float32 and result.image.shape == (2, N, N)
    gains = [_psnr(result.image[i], truth[i]) - _psnr(ref[i], truth[i]) for i in range(2)]
    assert min(gains) > 2.0, gains


@pytest.mark.parametrize("method", ["cg_sense", "cs_wavelet"])
def test_ct_iterative_methods_give_real_images_better_than_fbp(sparse_view, truth, method):
    op, y = sparse_view
    ref = reconstruct("fbp", y, op).image
    result = reconstruct(method, y, op)
    assert result.image.dtype == torch.float32
    assert all(_psnr(result.image[i], truth[i]) > _psnr(ref[i], truth[i]) for i in range(2))


# -- low resolution ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lowres(truth):
    op = Downsample((N, N), 2)
    return op, op.forward(torch.from_numpy(truth).float())  # (2, N/2, N/2)


def test_bicubic_and_nearest_are_the_up_samplers_of_the_operator(lowres, truth):
    op, y = lowres
    bicubic = reconstruct("bicubic", y, op)
    assert torch.equal(bicubic.image, bicubic_upsample(y, 2)) and bicubic.image.shape == (2, N, N)
    assert (bicubic.method, bicubic.iterations, bicubic.converged) == ("bicubic", 0, True)
    nearest = reconstruct("nearest", y, op).image
    assert torch.equal(nearest, op.pseudo_inverse(y)) and torch.allclose(op.forward(nearest), y)
    # on piecewise-constant images bicubic beats nearest-neighbour up-sampling
    assert all(_psnr(bicubic.image[i], truth[i]) > _psnr(nearest[i], truth[i]) for i in range(2))


@pytest.mark.parametrize("method", ["bicubic", "nearest"])
def test_up_samplers_need_a_low_resolution_operator(single_coil, method):
    op, y = single_coil
    with pytest.raises(
        ParameterError, match=rf"'{method}' needs a low-resolution operator.*found CartesianMRI"
    ):
        reconstruct(method, y, op)


def test_methods_declare_the_modalities_they_serve():
    serving = {
        m: [name for name, meth in METHODS.items() if m in meth.modalities] for m in ("mri", "ct", "lowres")
    }
    assert serving["lowres"] == ["nearest", "bicubic", "cg_sense", "cs_wavelet", "cs_tv"]
    assert "bicubic" not in serving["mri"] + serving["ct"] and "zero_filled" not in serving["lowres"]


@pytest.mark.parametrize("method", ["cg_sense", "cs_wavelet", "cs_tv"])
def test_iterative_methods_give_real_images_on_low_resolution(lowres, method):
    op, y = lowres
    result = reconstruct(method, y, op, max_iter=20)
    assert result.image.dtype == torch.float32 and result.image.shape == (2, N, N)
    assert torch.isfinite(result.image).all()


# -- side effects ----------------------------------------------------------------------------------
def test_reconstruct_leaves_the_global_rng_alone(single_coil, sparse_view):
    before = torch.get_rng_state()
    op, y = single_coil
    for method in ("zero_filled", "cg_sense", "cs_wavelet", "cs_tv"):
        reconstruct(method, y[:1], op, max_iter=3)
    ct_op, sino = sparse_view
    reconstruct("fbp", sino[:1], ct_op)
    assert torch.equal(torch.get_rng_state(), before)


def test_progress_callback_sees_every_iteration(single_coil):
    op, y = single_coil
    seen: list[int] = []
    result = reconstruct("cs_tv", y[:1], op, max_iter=7, tol=0.0, progress=lambda k, state: seen.append(k))
    assert seen == list(range(1, 8)) and result.iterations == 7 and not result.converged
