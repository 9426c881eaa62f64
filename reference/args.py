"""Argument checks shared by the public entry points: one rule, one message format.

``int`` arguments accept Python/NumPy/torch integers (anything with ``__index__``) but never ``bool``
or ``float``; ``bool`` flags accept only ``True``/``False``; real numbers accept ints and floats (not
``bool``) and must be finite. Every error names the argument, the value and what was expected.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

__all__ = ["ArgumentError", "as_int", "as_flag", "as_real"]


class ArgumentError(TypeError, ValueError):
    """A wrong-typed or out-of-range argument (both a TypeError and a ValueError, so either can be caught)."""


def as_int(name: str, value: object, minimum: Optional[int] = None) -> int:
    """``value`` as a Python int (``>= minimum`` when given); `ArgumentError` naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ArgumentError(f"{name}: expected an int, got the bool {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{name}: expected an int, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and result < minimum:
        raise ArgumentError(f"{name}: expected an int >= {minimum}, got {result}")
    return result


def as_flag(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False`` (NumPy bool scalars included); else `ArgumentError`."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ in ("bool_", "bool") and hasattr(value, "item"):  # numpy.bool_
        return bool(value)
    raise ArgumentError(f"{name}: expected True or False, got {value!r} ({type(value).__name__})")


def as_real(name: str, value: object) -> float:
    """``value`` as a finite float (ints and floats, not bool); `ArgumentError` naming ``name`` otherwise."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise ArgumentError(f"{name}: expected a finite real number, got {value!r} ({type(value).__name__})")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name}: expected a finite real number, got {value!r} ({type(value).__name__})") from None
    if not math.isfinite(result):
        raise ArgumentError(f"{name}: expected a finite real number, got {result}")
    return result
