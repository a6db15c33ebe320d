"""The LinearOperator contract on the generic operators of operators/linear.py."""

import pickle

import pytest
import torch

from operators.errors import DTypeError, ShapeError
from operators.linear import Diagonal, Identity
from tests.operators.contract import check_linear_operator


def test_diagonal_real_and_complex_pass_contract():
    g = torch.Generator().manual_seed(3)
    check_linear_operator(Diagonal(torch.randn(4, 5, generator=g, dtype=torch.float64)))
    w = torch.randn(3, 6, generator=g, dtype=torch.complex128)
    check_linear_operator(Diagonal(w))


def test_compositions_pass_contract():
    g = torch.Generator().manual_seed(4)
    a = Diagonal(torch.randn(7, generator=g, dtype=torch.complex128))
    b = Diagonal(torch.randn(7, generator=g, dtype=torch.complex128))
    check_linear_operator(a @ b)
    check_linear_operator((2.5 - 1j) * a)
    check_linear_operator(a + b.H)
    check_linear_operator(a.H @ a + 0.1 * Identity((7,), complex_data=True))


def test_norm_of_diagonal_is_its_largest_entry():
    op = Diagonal(torch.tensor([0.5, -4.0, 2.0], dtype=torch.float64))
    assert op.norm(n_iter=50) == pytest.approx(4.0, rel=1e-6)


def test_wrong_shape_names_expected_and_found():
    op = Diagonal(torch.ones(4, 5))
    with pytest.raises(ShapeError, match=r"trailing shape \(4, 5\).*found shape \(4, 6\)"):
        op.forward(torch.ones(4, 6))


def test_complex_input_to_real_operator_is_refused():
    with pytest.raises(DTypeError, match="must be real; found torch.complex64"):
        Diagonal(torch.ones(3)).forward(torch.ones(3, dtype=torch.complex64))


def test_composition_of_mismatched_shapes_is_refused():
    with pytest.raises(ShapeError, match="out_shape"):
        Diagonal(torch.ones(3)) @ Diagonal(torch.ones(4))


def test_operators_are_immutable_and_pickle():
    op = Diagonal(torch.ones(3))
    with pytest.raises(AttributeError, match="immutable"):
        op.weights = torch.zeros(3)
    clone = pickle.loads(pickle.dumps(op))
    with pytest.raises(AttributeError):
        clone.weights = torch.zeros(3)


def test_the_norm_of_a_batched_operator_is_its_largest_items():
    import torch

    from operators.linear import Diagonal

    weights = torch.tensor([[1.0, 2.0, 0.5], [3.0, 0.1, 0.2]], dtype=torch.float64)  # two items of 3
    op = Diagonal(weights, ndim=1)
    assert op.in_shape == (3,)
    # One power iteration over the whole batch would mix the items (sqrt(3² + 2²) = 3.6); per item: 3.
    assert op.norm(n_iter=60) == pytest.approx(3.0, rel=1e-6)
    assert Diagonal(weights[:1], ndim=1).norm(n_iter=60) == pytest.approx(2.0, rel=1e-6)
    assert op._norm_cache, "the norm of an immutable operator is remembered"
