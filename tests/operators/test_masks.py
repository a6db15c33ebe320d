"""Undersampling masks: shapes, reproducibility, centre, acceleration, errors, no global RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.errors import ParameterError
from operators.masks import (
    MASK_KINDS,
    center_slice,
    equispaced_1d,
    make_mask,
    poisson_disc,
    random_1d,
    variable_density_2d,
)

ONE_D = ("random_1d", "equispaced_1d")
TWO_D = ("variable_density_2d", "poisson_disc")


def test_mask_kinds_lists_every_sampler() -> None:
    assert set(MASK_KINDS) == {"random_1d", "equispaced_1d", "variable_density_2d", "poisson_disc"}


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shape", [(32, 40), (3, 24, 30)])
def test_shape_dtype_and_reproducibility(kind: str, shape: tuple[int, ...]) -> None:
    a = make_mask(kind, shape, 4, 0.1, seed=3)
    assert a.shape == shape and a.dtype == torch.bool
    assert torch.equal(a, make_mask(kind, shape, 4, 0.1, seed=3))
    assert torch.equal(a, make_mask(kind, shape, 4, 0.1, seed=np.random.default_rng(3)))
    others = [make_mask(kind, shape, 4, 0.1, seed=s) for s in (4, 5, 6)]
    assert any(not torch.equal(a, b) for b in others), "different seeds gave the same mask"


@pytest.mark.parametrize("kind", ONE_D)
def test_line_masks_are_constant_along_all_but_the_last_dim(kind: str) -> None:
    m = make_mask(kind, (3, 20, 50), 4, 0.08, seed=0)
    assert torch.equal(m, m[:1, :1].expand_as(m))


@pytest.mark.parametrize("kind", TWO_D)
def test_point_masks_are_constant_along_depth(kind: str) -> None:
    m = make_mask(kind, (3, 20, 50), 4, 0.08, seed=0)
    assert torch.equal(m, m[:1].expand_as(m))
    assert not torch.equal(m[0], m[0, :1].expand_as(m[0])), "a 2D mask should vary along H too"


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("acceleration", [2, 4, 8])
def test_centre_fully_sampled_and_acceleration_achieved(kind: str, acceleration: int) -> None:
    h, w = 96, 128
    m = make_mask(kind, (h, w), acceleration, 0.08, seed=1)
    cols = center_slice(w, 0.08)
    if kind in ONE_D:
        assert m[:, cols].all()
    else:
        assert m[center_slice(h, 0.08), cols].all()
    fraction = m.float().mean().item()
    if kind == "random_1d":  # binomial: allow 3 standard deviations of the line count
        p = 1 / acceleration
        assert abs(fraction - p) * w <= 3 * np.sqrt(w * p * (1 - p)) + 1
    else:
        assert abs(fraction * acceleration - 1) < 0.12, f"{kind} R={acceleration}: fraction {fraction:.3f}"


@settings(max_examples=30, deadline=None)
@given(
    w=st.integers(16, 300),
    acceleration=st.floats(1.0, 12.0),
    center_fraction=st.floats(0.0, 0.2),
    seed=st.integers(0, 2**31),
)
def test_equispaced_lines_hit_the_budget(
    w: int, acceleration: float, center_fraction: float, seed: int
) -> None:
    m = equispaced_1d((2, w), acceleration, center_fraction, seed)[0]
    n_low = center_slice(w, center_fraction).stop - center_slice(w, center_fraction).start
    budget = max(w / acceleration, n_low)
    assert m[center_slice(w, center_fraction)].all()
    assert abs(int(m.sum()) - budget) <= 2 + 0.05 * budget


def test_equispaced_lines_are_evenly_spaced_outside_the_centre() -> None:
    m = equispaced_1d((1, 200), 5, 0.0, seed=0)[0].numpy()
    gaps = np.diff(np.flatnonzero(m))
    assert set(gaps.tolist()) <= {5}


def test_random_1d_expected_fraction_over_seeds() -> None:
    fractions = [random_1d((1, 256), 4, 0.08, seed=s).float().mean().item() for s in range(40)]
    assert abs(np.mean(fractions) - 0.25) < 0.01


def test_only_the_centre_when_it_exceeds_the_budget() -> None:
    m = random_1d((4, 40), 10, 0.5, seed=0)
    assert torch.equal(m[0], torch.arange(40).ge(10) & torch.arange(40).lt(30))


def test_acceleration_one_samples_everything() -> None:
    for kind in MASK_KINDS:
        assert make_mask(kind, (12, 16), 1, 0.0, seed=0).all(), kind


def test_variable_density_is_denser_at_the_centre() -> None:
    m = variable_density_2d((128, 128), 6, 0.0, seed=0).float()
    assert m[48:80, 48:80].mean() > 2 * m[:32].mean()


def test_poisson_disc_keeps_points_apart_and_is_variable_density() -> None:
    m = poisson_disc((96, 96), 5, 0.0, seed=2).numpy()
    pts = np.argwhere(m)
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, 10**9)
    assert d2.min() >= 1, "two samples on one grid point"
    near_centre = np.abs(pts - 48).max(axis=1) < 16
    assert m[32:64, 32:64].mean() > m[:16].mean()
    # Nearest-neighbour distances grow outward (Poisson disc, variable density).
    nn = np.sqrt(d2.min(axis=1))
    assert nn[near_centre].mean() < nn[~near_centre].mean()


def test_poisson_disc_256() -> None:
    m = poisson_disc((256, 256), 4, 0.08, seed=0)
    assert abs(m.float().mean().item() * 4 - 1) < 0.05


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_global_rng_state_is_untouched(kind: str) -> None:
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    make_mask(kind, (16, 24), 3, 0.1, seed=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_errors_name_the_parameter_and_the_value(kind: str) -> None:
    with pytest.raises(ParameterError, match=r"acceleration must be >= 1.*found 0\.5"):
        make_mask(kind, (16, 16), 0.5, 0.08, seed=0)
    with pytest.raises(ParameterError, match=r"center_fraction must be in \[0, 1\).*found 1\.0"):
        make_mask(kind, (16, 16), 4, 1.0, seed=0)
    with pytest.raises(ParameterError, match=r"center_fraction must be in \[0, 1\).*found -0\.1"):
        make_mask(kind, (16, 16), 4, -0.1, seed=0)
    with pytest.raises(ParameterError, match=r"shape must be \(H, W\) or \(D, H, W\).*found \(16,\)"):
        make_mask(kind, (16,), 4, 0.08, seed=0)
    with pytest.raises(ParameterError, match=r"seed must be an int or a numpy Generator; found 1\.5"):
        make_mask(kind, (16, 16), 4, 0.08, seed=1.5)  # type: ignore[arg-type]


def test_unknown_kind() -> None:
    with pytest.raises(ParameterError, match=r"kind must be one of .*'random_1d'.*found 'radial'"):
        make_mask("radial", (16, 16), 4, 0.08, seed=0)  # type: ignore[arg-type]
