"""The linear-operator contract shared by every physics model.

A :class:`LinearOperator` ``A`` maps arrays whose trailing dimensions are
``in_shape`` to arrays whose trailing dimensions are ``out_shape``. Any leading
dimensions are batch dimensions and pass through unchanged, so one operator
applies to a slice ``(H, W)`` or a batch ``(B, H, W)`` alike.

Contract (checked for every operator by ``tests/operators/contract.py``):

* ``A.forward(x)`` computes ``A x``; ``A.adjoint(y)`` computes ``Aᴴ y`` exactly, so
  ``<A x, y> = <x, Aᴴ y>`` to rounding error;
* ``A.normal(x) == A.adjoint(A.forward(x))`` (subclasses may supply a faster one);
* ``A.H`` is the adjoint as an operator; ``A @ B``, ``a * A`` and ``A + B`` compose;
* operators are immutable: masks, coil maps and geometries are constructor
  arguments, and per-sample variation builds a new operator;
* forward and adjoint are differentiable through autograd;
* operators pickle, because Ray ships them to workers.

Subclasses implement ``_forward`` and ``_adjoint``; the public methods check shapes
and dtypes and add context to errors.

Example:
    >>> import torch
    >>> from operators.linear import Diagonal
    >>> A = Diagonal(torch.tensor([1.0, 2.0, 3.0]))
    >>> (2 * A.H @ A).forward(torch.ones(3))
    tensor([ 2.,  8., 18.])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from operators.errors import DTypeError, ShapeError

__all__ = [
    "LinearOperator",
    "Adjoint",
    "Composed",
    "Scaled",
    "Summed",
    "Identity",
    "Diagonal",
    "complex_dtype_for",
    "real_dtype_for",
    "inner",
]

_REAL_TO_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}
_COMPLEX_TO_REAL = {v: k for k, v in _REAL_TO_COMPLEX.items()}


def complex_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype of the same precision as ``dtype`` (float32 -> complex64)."""
    if dtype.is_complex:
        return dtype
    if dtype not in _REAL_TO_COMPLEX:
        raise DTypeError(f"expected float32, float64, complex64 or complex128; found {dtype}")
    return _REAL_TO_COMPLEX[dtype]


def real_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of the same precision as ``dtype`` (complex64 -> float32)."""
    if not dtype.is_complex:
        return dtype
    return _COMPLEX_TO_REAL[dtype]


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The inner product ``<a, b> = sum(conj(a) * b)`` over all elements (a scalar tensor)."""
    if a.is_complex() or b.is_complex():
        return torch.sum(torch.conj(a) * b)
    return torch.sum(a * b)


class _FreezeAfterInit(type):
    """Metaclass that marks an instance immutable once its ``__init__`` returns."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__call__(*args, **kwargs)
        object.__setattr__(obj, "_frozen", True)
        return obj


class LinearOperator(metaclass=_FreezeAfterInit):
    """A linear map ``A: X -> Y`` acting on the trailing dimensions of its input.

    Args:
        in_shape: trailing shape of inputs, e.g. ``(H, W)``.
        out_shape: trailing shape of outputs, e.g. ``(coils, H, W)``.
        complex_in: inputs are complex (real inputs are promoted to complex).
        complex_out: outputs are complex.
    """

    _frozen: bool = False

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        *,
        complex_in: bool = False,
        complex_out: bool = False,
    ) -> None:
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        self.complex_in = complex_in
        self.complex_out = complex_out

    # -- immutability --------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError(
                f"{type(self).__name__} is immutable: cannot set '{name}'. "
                "Build a new operator instead (for example op.with_mask(m))."
            )
        object.__setattr__(self, name, value)

    # -- subclass hooks ------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        return self._adjoint(self._forward(x))

    # -- public API ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for ``x`` of shape ``(..., *in_shape)``; returns ``(..., *out_shape)``."""
        x = self._check(x, self.in_shape, self.complex_in, "input of forward")
        return self._forward(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Aᴴ y`` for ``y`` of shape ``(..., *out_shape)``; returns ``(..., *in_shape)``."""
        y = self._check(y, self.out_shape, self.complex_out, "input of adjoint")
        return self._adjoint(y)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``Aᴴ A x`` for ``x`` of shape ``(..., *in_shape)``."""
        x = self._check(x, self.in_shape, self.complex_in, "input of normal")
        return self._normal(x)

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """A direct approximate inverse (zero-filled for MRI, FBP for CT), where one exists."""
        raise NotImplementedError(
            f"{type(self).__name__} has no direct approximate inverse; "
            "use operators.solvers.ConjugateGradient "
            "on the normal equations instead"
        )

    __call__ = forward

    @property
    def H(self) -> LinearOperator:
        """The adjoint ``Aᴴ`` as an operator."""
        return Adjoint(self)

    def __matmul__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return Composed(self, other)

    def __mul__(self, scale: float | complex) -> LinearOperator:
        if not isinstance(scale, (int, float, complex)):
            return NotImplemented
        return Scaled(self, scale)

    __rmul__ = __mul__

    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return Summed(self, other)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LinearOperator:
        """A copy with every tensor attribute moved to ``device`` and/or cast to precision ``dtype``.

        ``dtype`` is a real dtype (float32 or float64); complex attributes take the complex
        dtype of the same precision, integer and boolean attributes keep theirs.
        """
        new = object.__new__(type(self))
        for name, value in self.__dict__.items():
            if name in ("_frozen", "_norm_cache"):
                continue
            object.__setattr__(new, name, _move(value, device, dtype))
        object.__setattr__(new, "_frozen", True)
        return new

    def norm(self, n_iter: int = 30, seed: int = 0, dtype: torch.dtype = torch.float64) -> float:
        """Estimate the spectral norm ``‖A‖₂`` by power iteration on ``AᴴA``.

        An operator whose parameters carry batch dimensions (a stack of masks, say) is
        block-diagonal over its items; its norm is the largest of the items' norms, and each
        item is iterated on its own. The result is remembered per operator and arguments
        (operators are immutable, so it cannot go stale).

        Args:
            n_iter: number of power iterations.
            seed: seed of the random start vector (global RNG state is untouched).
            dtype: real precision of the start vector.
        """
        cache: dict[tuple[int, int, torch.dtype], float] = self.__dict__.setdefault("_norm_cache", {})
        key = (n_iter, seed, dtype)
        if key not in cache:
            cache[key] = self._power_iteration(n_iter, seed, dtype)
        return cache[key]

    def _power_iteration(self, n_iter: int, seed: int, dtype: torch.dtype) -> float:
        device = self._device()
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(self.in_shape, generator=g, dtype=dtype)
        if self.complex_in:
            x = torch.complex(x, torch.randn(self.in_shape, generator=g, dtype=dtype))
        x = x.to(device)
        op = self.to(dtype=dtype) if self._tensor_dtypes() else self
        event = tuple(range(-len(self.in_shape), 0)) if self.in_shape else None
        lam = torch.zeros(())
        with torch.no_grad():
            for _ in range(n_iter):
                # Per item: a batched operator broadcasts x to (*batch, *in_shape) on the first step.
                x = x / torch.linalg.vector_norm(x, dim=event, keepdim=True).clamp_min(1e-300)
                z = op.normal(x)
                lam = torch.linalg.vector_norm(z, dim=event)  # (*batch)
                x = z
        return math.sqrt(float(lam.max()))

    # -- helpers -------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        for value in self.__dict__.values():
            t = _first_tensor(value)
            if t is not None:
                return t.device
        return torch.device("cpu")

    def _tensor_dtypes(self) -> bool:
        return any(_first_tensor(v) is not None for v in self.__dict__.values())

    def _check(self, x: torch.Tensor, shape: tuple[int, ...], is_complex: bool, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise DTypeError(
                f"{type(self).__name__}: {what} must be a torch.Tensor; found {type(x).__name__}"
            )
        n = len(shape)
        if x.ndim < n or tuple(x.shape[x.ndim - n :]) != shape:
            raise ShapeError(
                f"{type(self).__name__}: {what} must have trailing shape {shape} "
                f"(any leading batch dimensions); found shape {tuple(x.shape)}"
            )
        if x.dtype not in _REAL_TO_COMPLEX and x.dtype not in _COMPLEX_TO_REAL:
            raise DTypeError(
                f"{type(self).__name__}: {what} must be float32/64 or complex64/128; found {x.dtype}"
            )
        if is_complex and not x.is_complex():
            x = x.to(complex_dtype_for(x.dtype))
        elif not is_complex and x.is_complex():
            raise DTypeError(
                f"{type(self).__name__}: {what} must be real; found {x.dtype}. "
                "Take .real or .abs() first if that is what you mean."
            )
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_shape={self.in_shape}, out_shape={self.out_shape})"


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, LinearOperator):
        for v in value.__dict__.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _move(value: Any, device: torch.device | str | None, dtype: torch.dtype | None) -> Any:
    if isinstance(value, torch.Tensor):
        target = None
        if dtype is not None:
            if value.is_complex():
                target = complex_dtype_for(dtype)
            elif value.is_floating_point():
                target = real_dtype_for(dtype)
        return value.to(device=device if device is not None else value.device, dtype=target or value.dtype)
    if isinstance(value, LinearOperator):
        return value.to(device, dtype)
    if isinstance(value, tuple):
        return tuple(_move(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [_move(v, device, dtype) for v in value]
    return value


class Adjoint(LinearOperator):
    """``Aᴴ`` as an operator: forward is ``A.adjoint`` and adjoint is ``A.forward``."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.out_shape, op.in_shape, complex_in=op.complex_out, complex_out=op.complex_in)
        self.op = op

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op._adjoint(x)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.op._forward(y)

    @property
    def H(self) -> LinearOperator:
        return self.op


class Composed(LinearOperator):
    """``A @ B``: apply ``B`` first, then ``A``."""

    def __init__(self, outer: LinearOperator, inner_op: LinearOperator) -> None:
        if outer.in_shape != inner_op.out_shape:
            raise ShapeError(
                f"cannot compose {outer!r} @ {inner_op!r}: the right operator's out_shape "
                f"{inner_op.out_shape} must equal the left operator's in_shape {outer.in_shape}"
            )
        super().__init__(
            inner_op.in_shape,
            outer.out_shape,
            complex_in=inner_op.complex_in,
            complex_out=outer.complex_out,
        )
        self.outer = outer
        self.inner_op = inner_op

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer.forward(self.inner_op._forward(x))

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.inner_op.adjoint(self.outer._adjoint(y))


class Scaled(LinearOperator):
    """``a * A`` for a scalar ``a``; its adjoint is ``conj(a) * Aᴴ``."""

    def __init__(self, op: LinearOperator, scale: float | complex) -> None:
        is_complex = isinstance(scale, complex)
        super().__init__(
            op.in_shape, op.out_shape, complex_in=op.complex_in, complex_out=op.complex_out or is_complex
        )
        self.op = op
        self.scale = scale

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.op._forward(x)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        s = self.scale.conjugate() if isinstance(self.scale, complex) else self.scale
        if self.op.complex_out is False and y.is_complex():
            # A real operator scaled by a complex number: Aᴴ(conj(a) y) = Aᴴ applied to real parts.
            z = s * y
            return self.op._adjoint(z.real) + 1j * self.op._adjoint(z.imag)
        return s * self.op._adjoint(y)


class Summed(LinearOperator):
    """``A + B`` for operators of equal input and output shapes."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.in_shape != b.in_shape or a.out_shape != b.out_shape:
            raise ShapeError(
                f"cannot add {a!r} and {b!r}: in_shape and out_shape must match "
                f"({a.in_shape}->{a.out_shape} vs {b.in_shape}->{b.out_shape})"
            )
        super().__init__(
            a.in_shape,
            a.out_shape,
            complex_in=a.complex_in or b.complex_in,
            complex_out=a.complex_out or b.complex_out,
        )
        self.a = a
        self.b = b

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a.forward(x) + self.b.forward(x)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.a.adjoint(y) + self.b.adjoint(y)


class Identity(LinearOperator):
    """The identity on arrays of trailing shape ``shape``."""

    def __init__(self, shape: tuple[int, ...], *, complex_data: bool = False) -> None:
        super().__init__(shape, shape, complex_in=complex_data, complex_out=complex_data)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.adjoint(y)


class Diagonal(LinearOperator):
    """Elementwise multiplication by ``weights``: ``A x = w ⊙ x``, ``Aᴴ y = conj(w) ⊙ y``.

    ``weights`` may carry leading batch dimensions; ``in_shape`` is its full shape
    unless ``ndim`` says how many trailing dimensions the operator acts on.
    """

    def __init__(self, weights: torch.Tensor, ndim: int | None = None) -> None:
        shape = tuple(weights.shape) if ndim is None else tuple(weights.shape[weights.ndim - ndim :])
        c = weights.is_complex()
        super().__init__(shape, shape, complex_in=c, complex_out=c)
        self.weights = weights

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights * x

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return torch.conj(self.weights) * y if self.weights.is_complex() else self.weights * y


def as_function(op: LinearOperator) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward map of ``op`` as a plain function (for solvers written against callables)."""
    return op.forward
