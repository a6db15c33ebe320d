"""Errors raised by ``operators``.

Hierarchy::

    OperatorError                 base of everything raised on purpose here
    ├── ShapeError (ValueError)   an array's shape does not match what the operator expects
    ├── DTypeError (TypeError)    an array's dtype is not one the operator accepts
    ├── ParameterError (ValueError)  a constructor or function argument is out of range
    └── NonFiniteError (ValueError)  NaN or Inf in an input volume

Every message names the argument, the value expected, the value found and, where
there is one, the fix.
"""

from __future__ import annotations

__all__ = ["OperatorError", "ShapeError", "DTypeError", "ParameterError", "NonFiniteError"]


class OperatorError(Exception):
    """Base class of the errors raised on purpose by ``operators``."""


class ShapeError(OperatorError, ValueError):
    """An array's shape does not match the operator's input or output shape."""


class DTypeError(OperatorError, TypeError):
    """An array's dtype is not one the operator accepts."""


class ParameterError(OperatorError, ValueError):
    """A constructor or function argument is out of its valid range."""


class NonFiniteError(OperatorError, ValueError):
    """An input contains NaN or Inf."""
