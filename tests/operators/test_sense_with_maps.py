"""SENSE.with_maps: the same mask with other coil maps (e.g. maps a network estimated per item)."""

from __future__ import annotations

import pytest
import torch

from operators.errors import ShapeError
from operators.mri import SENSE, birdcage_maps, sense
from tests.operators.contract import check_linear_operator

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/operators/conftest.py


def _mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < 0.5
    mask[..., shape[-1] // 2] = True
    return mask


def test_with_maps_builds_a_new_operator_with_the_same_mask() -> None:
    mask = _mask((8, 10), 0)
    E = sense(mask, birdcage_maps((8, 10), 2))
    maps = birdcage_maps((8, 10), 3, radius=2.0)
    F = E.with_maps(maps)
    assert isinstance(F, SENSE) and F is not E
    assert torch.equal(F.mask, E.mask) and torch.equal(F.coil_maps, maps)
    assert F.out_shape == (3, 8, 10) and E.out_shape == (2, 8, 10)  # the coil count may change
    x = torch.randn(2, 8, 10, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(F.forward(x), sense(mask, maps).forward(x))


@pytest.mark.parametrize("shape", [(8, 10), (7, 9)])
def test_with_maps_passes_the_operator_contract(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(3, *shape, generator=g, dtype=torch.complex128)
    op = sense(_mask(shape, 3).double(), birdcage_maps(shape, 2, dtype=torch.complex128)).with_maps(maps)
    check_linear_operator(op, tol=1e-10)


@pytest.mark.parametrize("shape", [(8, 10), (7, 9)])
def test_per_item_maps_act_item_by_item(shape: tuple[int, int]) -> None:
    """Maps ``(B, C, H, W)``, as a sensitivity network estimates them, apply to item ``b`` of the batch."""
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(2, 3, *shape, generator=g, dtype=torch.complex128)
    op = sense(_mask(shape, 3).double(), birdcage_maps(shape, 3, dtype=torch.complex128)).with_maps(maps)
    x = torch.randn(2, *shape, generator=g, dtype=torch.complex128)
    y = torch.randn(2, 3, *shape, generator=g, dtype=torch.complex128)
    items = [sense(op.mask, maps[b]) for b in range(2)]
    torch.testing.assert_close(op.forward(x), torch.stack([items[b].forward(x[b]) for b in range(2)]))
    torch.testing.assert_close(op.adjoint(y), torch.stack([items[b].adjoint(y[b]) for b in range(2)]))
    torch.testing.assert_close(op.normal(x), torch.stack([items[b].normal(x[b]) for b in range(2)]))


def test_gradients_reach_the_maps() -> None:
    shape = (8, 8)
    maps = birdcage_maps(shape, 2).requires_grad_(True)
    op = sense(_mask(shape, 4), birdcage_maps(shape, 2)).with_maps(maps)
    x = torch.randn(1, *shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(5))
    op.adjoint(op.forward(x)).abs().sum().backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_with_maps_names_the_expected_shape() -> None:
    E = sense(_mask((8, 10), 0), birdcage_maps((8, 10), 2))
    with pytest.raises(
        ShapeError, match=r"with_maps: coil_maps of shape \(2, 8, 12\) must end with .*\(8, 10\)"
    ):
        E.with_maps(birdcage_maps((8, 12), 2))
