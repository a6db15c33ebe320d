"""The property tests every LinearOperator must pass (the operator contract in operators/linear.py).

Call :func:`check_linear_operator` from a test with an operator in float64 (or
complex128). It checks, on random inputs drawn from a seeded generator:

* the dot-product test ``|<Ax,y> - <x,Aᴴy>| / (‖A‖‖x‖‖y‖) < tol``;
* linearity ``A(a x1 + x2) = a A x1 + A x2``;
* ``normal(x) == adjoint(forward(x))``;
* the hand-written adjoint equals autograd's vector-Jacobian product of forward;
* a pickle round trip gives the same forward;
* the global torch RNG state is untouched.
"""

from __future__ import annotations

import pickle

import torch

from operators.linear import LinearOperator, complex_dtype_for, inner

__all__ = ["check_linear_operator", "random_input", "adjoint_error"]


def random_input(
    shape: tuple[int, ...], is_complex: bool, dtype: torch.dtype, g: torch.Generator
) -> torch.Tensor:
    """A standard-normal tensor of ``shape``, complex when ``is_complex``."""
    x = torch.randn(shape, generator=g, dtype=dtype)
    if is_complex:
        x = torch.complex(x, torch.randn(shape, generator=g, dtype=dtype))
    return x


def adjoint_error(
    op: LinearOperator, seed: int = 0, dtype: torch.dtype = torch.float64, batch: tuple[int, ...] = ()
) -> float:
    """The normalised dot-product error ``|<Ax,y> - <x,Aᴴy>| / (‖A‖‖x‖‖y‖)``."""
    g = torch.Generator().manual_seed(seed)
    x = random_input(batch + op.in_shape, op.complex_in, dtype, g)
    y = random_input(batch + op.out_shape, op.complex_out, dtype, g)
    lhs = inner(op.forward(x), y)
    rhs = inner(x, op.adjoint(y))
    scale = op.norm(n_iter=20, seed=seed) * torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)
    return float(torch.abs(lhs - rhs) / scale)


def check_linear_operator(
    op: LinearOperator, *, seed: int = 0, tol: float = 1e-5, dtype: torch.dtype = torch.float64
) -> None:
    """Assert the operator contract for ``op`` (which must already hold ``dtype`` tensors)."""
    rng_before = torch.get_rng_state()
    g = torch.Generator().manual_seed(seed)

    # Dot-product test, unbatched and with a batch dimension.
    assert adjoint_error(op, seed, dtype) < tol, f"{op!r}: adjoint error {adjoint_error(op, seed, dtype):.3e}"
    assert adjoint_error(op, seed + 1, dtype, batch=(2,)) < tol

    # Linearity.
    x1 = random_input(op.in_shape, op.complex_in, dtype, g)
    x2 = random_input(op.in_shape, op.complex_in, dtype, g)
    a = 1.7 - 0.3j if op.complex_in else 1.7
    lhs = op.forward(a * x1 + x2)
    rhs = a * op.forward(x1) + op.forward(x2)
    assert torch.allclose(lhs, rhs, rtol=1e-8, atol=1e-8 * float(rhs.abs().max())), f"{op!r} is not linear"

    # Normal operator.
    n1 = op.normal(x1)
    n2 = op.adjoint(op.forward(x1))
    assert torch.allclose(n1, n2, rtol=1e-7, atol=1e-7 * float(n2.abs().max())), f"{op!r}: normal != AᴴA"

    # Hand-written adjoint == autograd VJP of forward.
    x = x1.clone().requires_grad_(True)
    y = random_input(op.out_shape, op.complex_out, dtype, g)
    out = op.forward(x)
    # For complex maps, the VJP of the real-valued Re<Ax, y> gives Aᴴy
    # (PyTorch's conjugate-Wirtinger convention).
    objective = inner(out, y).real if (op.complex_out or op.complex_in) else inner(out, y)
    (grad,) = torch.autograd.grad(objective, x)
    expected = op.adjoint(y)
    if not op.complex_in and expected.is_complex():
        expected = expected.real
    assert torch.allclose(grad, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())), (
        f"{op!r}: adjoint differs from autograd's vector-Jacobian product"
    )

    # Pickle round trip (Ray ships operators to workers).
    clone = pickle.loads(pickle.dumps(op))
    assert torch.allclose(clone.forward(x1), op.forward(x1))

    assert torch.equal(torch.get_rng_state(), rng_before), f"{op!r} touched the global RNG state"


def as_precision(op: LinearOperator, dtype: torch.dtype) -> LinearOperator:
    """``op`` with its tensors in the precision of ``dtype`` (complex dtypes map to their real part)."""
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    return op.to(dtype=real)


_ = complex_dtype_for  # re-exported for callers that build complex inputs
