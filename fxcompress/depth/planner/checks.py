"""Validation of the planner's inputs: numbers, budgets, sequences and JSON mappings.

Every failure is an :class:`~fxcompress.errors.InvalidArgument` naming the value and what was
expected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any

import numpy as np

from fxcompress.errors import InvalidArgument

__all__ = ["check_budget", "expect_keys", "integer", "list_of", "number", "tuple_of"]


def number(value: object, what: str) -> float:
    """Return ``value`` as a float if it is a finite non-negative real, else raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise InvalidArgument(
            f"{what} must be a finite non-negative number, got {value!r} of type "
            f"{type(value).__name__}"
        )
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise InvalidArgument(f"{what} must be a finite non-negative number, got {value!r}")
    return number


def integer(value: object, what: str, *, minimum: int) -> int:
    """Return ``value`` as an int if it is an integer ``>= minimum``, else raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(
            f"{what} must be an integer, got {value!r} of type {type(value).__name__}"
        )
    if value < minimum:
        raise InvalidArgument(f"{what} must be >= {minimum}, got {value!r}")
    return int(value)


def tuple_of(value: object, kind: type, what: str) -> tuple[Any, ...]:
    """Return ``value`` (any non-string iterable) as a tuple whose items are all ``kind``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgument(
            f"{what} must be a sequence of {kind.__name__}, got {value!r} of type "
            f"{type(value).__name__}"
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, kind):
            raise InvalidArgument(
                f"{what} must hold {kind.__name__} items, got {item!r} of type "
                f"{type(item).__name__}"
            )
    return items


def check_budget(budget: object) -> float:
    """Return ``budget`` as a float; it may be ``inf`` but not nan, negative or a non-number."""
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, Real):
        raise InvalidArgument(
            f"budget must be a non-negative number of ms, got {budget!r} of type "
            f"{type(budget).__name__}"
        )
    value = float(budget)
    if math.isnan(value) or value < 0:
        raise InvalidArgument(
            f"budget must be a non-negative number of ms, got {budget!r} of type "
            f"{type(budget).__name__}"
        )
    return value


def expect_keys(data: object, required: set[str], optional: set[str], what: str) -> Mapping:
    """Check that ``data`` is a mapping with exactly the given keys."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{what} must be a mapping, got {type(data).__name__}")
    missing = required - data.keys()
    unknown = data.keys() - required - optional
    if missing or unknown:
        raise InvalidArgument(
            f"{what} has missing keys {sorted(missing)} and unknown keys {sorted(unknown)}"
        )
    return data


def list_of(data: object, what: str) -> list[Any]:
    """Return ``data`` as a list if it is a list or a tuple (as JSON decoding gives)."""
    if not isinstance(data, (list, tuple)):
        raise InvalidArgument(f"{what} must be a list, got {type(data).__name__}")
    return list(data)
