"""Number checks of the public API: Python and numpy scalars are accepted alike."""

from __future__ import annotations

import numbers

import numpy as np


def is_real(value) -> bool:
    """True for a Python or numpy real number, bools excluded.

    >>> is_real(0.8), is_real(np.float32(0.8)), is_real(np.int64(3)), is_real("0.8"), is_real(True)
    (True, True, True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_integer(value) -> bool:
    """True for a Python or numpy integer, bools excluded.

    >>> is_integer(5), is_integer(np.int64(5)), is_integer(5.0), is_integer(np.bool_(True))
    (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def to_float(value: numbers.Real) -> float:
    """``float(value)``; a numpy float16/float32 via its shortest decimal form.

    ``np.float32(0.8)`` is 0.800000011920929 as a Python float; a user writing it means
    0.8, and budgets ``round((1 − s) · size)`` of large tables depend on the difference.

    >>> to_float(np.float32(0.8)), to_float(np.int64(2)), to_float(0.25)
    (0.8, 2.0, 0.25)
    """
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return float(str(value))
    return float(value)
