"""The procedural brain phantom: determinism, contract, anatomy, appearance and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.brain import BRAIN_CLASSES, brain_phantom
from operators.errors import ParameterError, ShapeError
from operators.phantoms import Phantom

LABEL = {name: i for i, name in enumerate(BRAIN_CLASSES)}
PARENCHYMA = [LABEL[c] for c in ("grey_matter", "white_matter", "ventricles", "deep_grey", "lesions")]


@pytest.fixture(scope="module")
def volume() -> Phantom:
    return brain_phantom((32, 128, 128), seed=0)


@pytest.fixture(scope="module")
def flat() -> Phantom:
    """No texture, no bias field: every voxel that one tissue fills has exactly that tissue's value."""
    return brain_phantom((16, 128, 128), seed=1, texture=0.0, bias_strength=0.0)


def _mean(p: Phantom, name: str) -> float:
    return float(p.image[p.labels == LABEL[name]].mean())


def test_brain_classes_name_the_ten_labels_in_order() -> None:
    assert BRAIN_CLASSES[0] == "background" and len(BRAIN_CLASSES) == 10
    tissues = ["scalp", "skull", "csf", "grey_matter", "white_matter", "ventricles", "deep_grey", "vessels"]
    assert list(BRAIN_CLASSES[1:]) == tissues + ["lesions"]


def test_same_seed_gives_the_same_phantom_and_leaves_global_rng_alone() -> None:
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    a = brain_phantom((12, 48, 40), seed=5)
    b = brain_phantom((12, 48, 40), seed=5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(np.random.get_state()[1], np_state[1]), "the global numpy RNG was touched"
    assert torch.equal(torch.get_rng_state(), torch_state), "the global torch RNG was touched"


def test_different_seeds_give_different_subjects() -> None:
    a, b = brain_phantom((12, 48, 40), seed=5), brain_phantom((12, 48, 40), seed=6)
    assert not np.array_equal(a.image, b.image)
    assert np.mean(a.labels != b.labels) > 0.05, "two subjects should differ in anatomy, not only texture"


@pytest.mark.parametrize("shape", [(9, 33, 47), (8, 8, 8), (13, 40, 24)])
def test_shapes_dtypes_and_range_at_odd_sizes(shape: tuple[int, int, int]) -> None:
    p = brain_phantom(shape, seed=2)
    assert p.image.shape == shape and p.labels.shape == shape
    assert p.image.dtype == np.float32 and p.labels.dtype == np.uint8
    assert np.isfinite(p.image).all()
    assert p.image.min() >= 0 and p.image.max() <= 1.2
    assert p.labels.max() < len(BRAIN_CLASSES)
    corners = p.image[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (D, 4)
    assert np.all(corners == 0) and np.all(p.labels[:, [0, 0, -1, -1], [0, -1, 0, -1]] == 0)


def test_head_is_centred_and_fills_most_of_the_field_of_view(volume: Phantom) -> None:
    head = volume.labels[16] > 0  # (H, W), a middle slice
    rows, cols = np.nonzero(head)
    assert 0.75 < (rows.max() - rows.min()) / head.shape[0] < 0.98
    assert 0.6 < (cols.max() - cols.min()) / head.shape[1] < 0.95
    assert abs(rows.mean() / head.shape[0] - 0.5) < 0.05 and abs(cols.mean() / head.shape[1] - 0.5) < 0.05


def test_every_tissue_class_is_present(volume: Phantom) -> None:
    present = set(np.unique(volume.labels).tolist())
    assert present >= set(range(9)), f"missing classes {set(range(9)) - present}"


def test_lesions_option_removes_only_the_lesions() -> None:
    with_lesions = brain_phantom((16, 96, 96), seed=0)
    without = brain_phantom((16, 96, 96), seed=0, lesions=False)
    lesion = with_lesions.labels == LABEL["lesions"]
    assert lesion.any(), "seed 0 has lesions"
    assert not (without.labels == LABEL["lesions"]).any()
    assert np.array_equal(with_lesions.labels[~lesion], without.labels[~lesion])


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_class_volume_fractions_are_plausible(seed: int) -> None:
    labels = brain_phantom((32, 128, 128), seed=seed).labels
    counts = np.bincount(labels.ravel(), minlength=len(BRAIN_CLASSES))
    brain = counts[PARENCHYMA].sum()
    for name in ("grey_matter", "white_matter"):
        assert 0.10 < counts[LABEL[name]] / brain < 0.65, (name, counts[LABEL[name]] / brain)
    assert 0.002 < counts[LABEL["ventricles"]] / brain < 0.08
    assert counts[LABEL["csf"]] / counts[3:].sum() < 0.3  # CSF is a minority of the intracranial volume


@pytest.mark.parametrize("seed", [0, 4, 9])
def test_t1_contrast_ordering(seed: int) -> None:
    p = brain_phantom((16, 96, 96), seed=seed)
    wm, gm, csf = _mean(p, "white_matter"), _mean(p, "grey_matter"), _mean(p, "csf")
    assert wm > gm + 0.1 and gm > csf + 0.15, (wm, gm, csf)
    assert _mean(p, "scalp") > _mean(p, "skull") + 0.2
    assert _mean(p, "ventricles") < gm


def _interior(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` whose four in-plane neighbours are in ``mask`` too."""
    inner = mask.copy()
    inner[:, 1:-1, 1:-1] &= mask[:, :-2, 1:-1] & mask[:, 2:, 1:-1] & mask[:, 1:-1, :-2] & mask[:, 1:-1, 2:]
    inner[:, [0, -1], :] = False
    inner[:, :, [0, -1]] = False
    return inner


def test_texture_is_spatially_correlated_unlike_white_noise() -> None:
    p = brain_phantom((32, 128, 128), seed=0, bias_strength=0.0)
    wm = _interior(p.labels == LABEL["white_matter"])
    residual = p.image - _mean(p, "white_matter")
    pairs = wm[:, :, :-1] & wm[:, :, 1:]  # horizontal neighbours both inside white matter
    a, b = residual[:, :, :-1][pairs], residual[:, :, 1:][pairs]
    lag1 = float(np.corrcoef(a, b)[0, 1])
    assert lag1 > 0.3, lag1
    assert 0.005 < residual[wm].std() / _mean(p, "white_matter") < 0.1  # a few percent
    # The statistic is near 0 for white noise of the same amplitude: it measures correlation.
    noise = np.random.default_rng(0).standard_normal(residual.shape)
    assert abs(np.corrcoef(noise[:, :, :-1][pairs], noise[:, :, 1:][pairs])[0, 1]) < 0.05


def test_without_texture_pure_white_matter_takes_one_value(flat: Phantom) -> None:
    textured = brain_phantom((16, 128, 128), seed=1, bias_strength=0.0)
    for p, expected in ((flat, True), (textured, False)):
        values = p.image[p.labels == LABEL["white_matter"]]
        share = np.mean(np.abs(values - np.median(values)) < 1e-5)  # the rest: partial volume, lesions
        assert (share > 0.6) == expected, share


def test_partial_volume_gives_intermediate_values_on_the_grey_white_boundary(flat: Phantom) -> None:
    wm_level = float(np.median(flat.image[flat.labels == LABEL["white_matter"]]))
    gm_level = float(np.median(flat.image[flat.labels == LABEL["grey_matter"]]))
    wm, gm = flat.labels == LABEL["white_matter"], flat.labels == LABEL["grey_matter"]
    boundary = np.zeros_like(wm)  # white matter voxels with a grey matter neighbour along W
    boundary[:, :, :-1] |= wm[:, :, :-1] & gm[:, :, 1:]
    boundary[:, :, 1:] |= wm[:, :, 1:] & gm[:, :, :-1]
    values = flat.image[boundary]
    margin = 0.05 * (wm_level - gm_level)
    intermediate = (values > gm_level + margin) & (values < wm_level - margin)
    assert boundary.sum() > 100 and intermediate.mean() > 0.5, intermediate.mean()


def test_bias_field_is_smooth_multiplicative_and_bounded() -> None:
    plain = brain_phantom((12, 64, 64), seed=3, bias_strength=0.0)
    biased = brain_phantom((12, 64, 64), seed=3, bias_strength=0.2)
    assert np.array_equal(plain.labels, biased.labels)
    head = plain.image > 0.05
    ratio = biased.image[head] / plain.image[head]
    assert ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.2 + 1e-5 and ratio.std() > 0.02


def test_anatomy_does_not_depend_on_the_resolution() -> None:
    coarse = brain_phantom((16, 64, 64), seed=4, texture=0.0).labels
    fine = brain_phantom((16, 128, 128), seed=4, texture=0.0).labels
    for name in ("scalp", "white_matter", "grey_matter", "ventricles"):
        a, b = (np.mean(x == LABEL[name]) for x in (coarse, fine))
        assert abs(a - b) < 0.2 * b + 0.002, (name, a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shape": (4, 4)}, ShapeError, r"shape must be three sizes.*>= 8; found \(4, 4\)"),
        ({"shape": (8, 7, 8)}, ShapeError, r"shape .*>= 8; found \(8, 7, 8\)"),
        ({"shape": "big"}, ShapeError, r"shape must be three sizes"),
        ({"seed": 1.5}, ParameterError, r"seed must be an int; found 1.5"),
        ({"seed": True}, ParameterError, r"seed must be an int; found True"),
        ({"bias_strength": 0.7}, ParameterError, r"bias_strength must be a number in \[0, 0.5\).*found 0.7"),
        ({"texture": -1.0}, ParameterError, r"texture must be a number in \[0, 3\].*found -1.0"),
        ({"texture": "high"}, ParameterError, r"texture must be a number .*found 'high'"),
        ({"z_extent": 0.0}, ParameterError, r"z_extent must be a number in \(0, 1\].*found 0.0"),
    ],
)
def test_errors_name_the_argument_the_expected_and_the_found_value(kwargs, error, match) -> None:
    args = {"shape": (8, 16, 16), "seed": 0} | kwargs
    with pytest.raises(error, match=match):
        brain_phantom(args.pop("shape"), args.pop("seed"), **args)
