"""Checks of engine options: every value finite, in range and of the right type, or an ``InputError``.

Engines call these at the top, before any work, so a bad value never reaches torch (where a NaN
learning rate or grid can crash the process) and the message names the option and its valid range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Any

from .errors import InputError


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; bools and non-integral numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        if isinstance(value, Real) and not isinstance(value, bool) and float(value).is_integer():
            value = int(value)
        else:
            raise InputError(f"Option {name} must be a whole number, got {value!r}.")
    value = int(value)
    _check_range(name, value, low, high)
    return value


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"Option {name} must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"Option {name} must be a finite number, got {value!r}.")
    if low_open and low is not None and value <= low:
        raise InputError(f"Option {name} must be greater than {low}, got {value!r}.")
    _check_range(name, value, low, high)
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise InputError(f"Option {name} must be one of {shown}, got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"Option {name} must be true or false, got {value!r}.")
    return value


def check_int_list(
    name: str, value: Any, length: int | None = None, low: int | None = None, high: int | None = None
) -> list[int]:
    """One whole number or a sequence of them (checked each); ``length`` when given."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError(f"Option {name} must be a list of whole numbers, got {value!r}.")
    out = [check_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(value)]
    if length is not None and len(out) != length:
        raise InputError(f"Option {name} needs {length} values, got {len(out)}.")
    return out


def check_known(method: str, options: dict, valid: Iterable[str]) -> None:
    """Raise when ``options`` holds a name the engine does not take, listing the valid names."""
    valid = sorted(valid)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, valid, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise InputError(
            f"Unknown option{'s' if len(unknown) > 1 else ''} for method {method!r}: {', '.join(hints)}. "
            f"Valid options: {', '.join(valid)}."
        )


def _check_range(name: str, value: float, low, high) -> None:
    if low is not None and value < low:
        raise InputError(f"Option {name} must be at least {low}, got {value!r}.")
    if high is not None and value > high:
        raise InputError(f"Option {name} must be at most {high}, got {value!r}.")
