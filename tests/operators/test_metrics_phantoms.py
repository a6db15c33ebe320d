"""Metrics against scikit-image, and phantom determinism."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from operators.errors import ParameterError, ShapeError
from operators.metrics import nmse, psnr, ssim, ssim3d
from operators.phantoms import random_ellipsoids, shepp_logan_3d


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    ref = random_ellipsoids((4, 40, 48), seed=1).image
    noisy = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)
    return noisy, ref


def test_psnr_matches_skimage(pair):
    x, ref = pair
    dr = float(ref.max() - ref.min())
    assert psnr(x, ref) == pytest.approx(peak_signal_noise_ratio(ref, x, data_range=dr), rel=1e-6)


def test_ssim_matches_skimage_per_slice(pair):
    x, ref = pair
    dr = float(ref.max() - ref.min())
    expected = np.mean([structural_similarity(ref[i], x[i], data_range=dr) for i in range(ref.shape[0])])
    assert ssim(x, ref, data_range=dr) == pytest.approx(expected, rel=1e-5)


def test_ssim3d_matches_skimage():
    rng = np.random.default_rng(1)
    ref = random_ellipsoids((12, 24, 24), seed=2).image
    x = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)
    dr = float(ref.max() - ref.min())
    expected = structural_similarity(ref, x, data_range=dr)
    assert ssim3d(x, ref, data_range=dr) == pytest.approx(expected, rel=1e-5)


def test_nmse_and_perfect_scores(pair):
    _, ref = pair
    assert nmse(ref, ref) == 0
    assert psnr(ref, ref) == float("inf")
    assert ssim(ref, ref) == pytest.approx(1.0)
    assert nmse(np.zeros_like(ref), ref) == pytest.approx(1.0)


def test_metric_shape_mismatch_names_both_shapes():
    with pytest.raises(ShapeError, match=r"\(4, 4\) and \(4, 5\)"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ShapeError, match="complex"):
        psnr(torch.zeros(8, 8, dtype=torch.complex64), torch.zeros(8, 8))


def test_random_ellipsoids_is_deterministic_and_seed_dependent():
    state = np.random.get_state()
    a = random_ellipsoids((6, 32, 32), seed=7)
    b = random_ellipsoids((6, 32, 32), seed=7)
    c = random_ellipsoids((6, 32, 32), seed=8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.float32 and a.labels.dtype == np.uint8
    assert a.image.min() >= 0 and 0.5 < a.image.max() < 1.6
    assert set(np.unique(a.labels)) >= {0, 1}
    # Labels agree with the image: background is zero, tissue is not.
    assert np.all(a.image[a.labels == 0] == 0) and np.all(a.image[a.labels == 1] > 0)
    assert np.array_equal(np.random.get_state()[1], state[1]), "the global numpy RNG was touched"


def test_shepp_logan_3d_has_expected_levels():
    p = shepp_logan_3d((16, 64, 64))
    assert p.image.shape == (16, 64, 64)
    assert p.image.max() == pytest.approx(1.0, abs=1e-6)
    centre = p.image[8, 32, 32]
    assert 0.15 < centre < 0.35  # brain tissue level of the modified phantom


def test_phantom_rejects_bad_shape():
    with pytest.raises(ParameterError, match=r"three positive sizes.*\(4, 4\)"):
        random_ellipsoids((4, 4), seed=0)
