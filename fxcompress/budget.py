"""What a caller asks for: :class:`Budget` and its one parser, :func:`as_budget`.

Every method takes its budget through :func:`as_budget`: a :class:`Budget`, a mapping of one of its
fields (``{"params": 0.5}``), or a bare number, which each method reads as its natural kind
(``bare``): a latency fraction for :func:`fxcompress.optimize`, a fraction of the parameters for
:func:`fxcompress.lowrank.decompose` and :func:`fxcompress.fusion.fuse`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fxcompress.errors import InvalidArgument

__all__ = ["FIELDS", "Budget", "as_budget"]

#: the fields of a :class:`Budget`, exactly one of which is given
FIELDS = ("fraction", "latency_ms", "speedup", "params", "macs")
#: how each kind of bare number is described in an error
_BARE = {
    "fraction": "a fraction of the original latency; 0.6 means at most 60 %",
    "params": "a fraction of the parameters to keep",
    "macs": "a fraction of the multiply-accumulates to keep",
}


@dataclass(frozen=True)
class Budget:
    """An explicit target: exactly one of ``fraction``, ``latency_ms``, ``speedup``, ``params``
    or ``macs``.

    ``fraction``, ``latency_ms`` and ``speedup`` are latency targets (every method);
    ``params`` and ``macs`` are fractions of the model's parameters or multiply-accumulates
    to keep, understood by ``methods=("lowrank",)`` (:func:`fxcompress.lowrank.decompose`).

    Examples
    --------
    >>> Budget(speedup=2.0).fraction_of(10.0)
    0.5
    >>> Budget(params=0.5).params
    0.5
    """

    fraction: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    params: float | None = None
    macs: float | None = None

    def __post_init__(self) -> None:
        given = {
            k: v
            for k, v in (
                ("fraction", self.fraction),
                ("latency_ms", self.latency_ms),
                ("speedup", self.speedup),
                ("params", self.params),
                ("macs", self.macs),
            )
            if v is not None
        }
        if len(given) != 1:
            raise InvalidArgument(
                "Budget takes exactly one of fraction, latency_ms, speedup, params, macs; got "
                f"{given or 'none'}"
            )
        ((name, value),) = given.items()
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value > 0)
        ):
            raise InvalidArgument(
                f"Budget {name} must be a positive finite number, got "
                f"{name}={value!r} (type={type(value).__name__})"
            )
        if name in ("fraction", "params", "macs") and value > 1:
            raise InvalidArgument(f"Budget {name} must be in (0, 1], got {name}={value!r}")
        if name == "speedup" and value < 1:
            raise InvalidArgument(f"Budget speedup must be >= 1, got speedup={value!r}")

    @property
    def is_latency(self) -> bool:
        """Whether this is a latency target (not a parameter or MAC budget)."""
        return self.params is None and self.macs is None

    def fraction_of(self, original_ms: float) -> float:
        """The budget as a fraction of ``original_ms``."""
        if not self.is_latency:
            raise InvalidArgument(
                f"{self!r} is not a latency target; parameter and MAC budgets work with "
                "methods=('lowrank',) only"
            )
        if self.fraction is not None:
            return float(self.fraction)
        if self.speedup is not None:
            return 1.0 / float(self.speedup)
        assert self.latency_ms is not None
        return float(self.latency_ms) / original_ms


def as_budget(budget: Any, *, bare: str = "fraction", what: str | None = None) -> Budget:
    """``budget`` as a :class:`Budget`: itself, a mapping of one field, or a bare number.

    Parameters
    ----------
    budget : Budget, mapping or float
        A bare number in (0, 1] means ``Budget(**{bare: budget})``; a mapping such as
        ``{"macs": 0.5}`` means ``Budget(macs=0.5)`` (``"latency"`` is an alias of ``"fraction"``).
    bare : {"fraction", "params", "macs"}
        What a bare number means to the caller's method.
    what : str, optional
        How errors describe a bare number (default: from ``bare``, e.g. "a fraction of the
        parameters to keep").

    Raises
    ------
    InvalidArgument
        For anything else, naming the value and the forms that work.

    Examples
    --------
    >>> as_budget(0.6)
    Budget(fraction=0.6, latency_ms=None, speedup=None, params=None, macs=None)
    >>> as_budget(0.5, bare="params").params
    0.5
    >>> as_budget({"latency": 0.5}).fraction
    0.5
    """
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, Mapping):
        items = {("fraction" if k == "latency" else k): v for k, v in budget.items()}
        unknown = sorted(set(map(str, items)) - set(FIELDS))
        if unknown or len(items) != 1:
            raise InvalidArgument(
                f"a budget mapping gives exactly one of {FIELDS}, got {dict(budget)!r:.80}"
            )
        return Budget(**items)
    what = what or _BARE[bare]
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise InvalidArgument(
            f"budget must be a number in (0, 1] ({what}), a mapping like {{'macs': 0.5}} or a "
            f"fxcompress.Budget, got budget={budget!r:.80} (type={type(budget).__name__})"
        )
    if not (math.isfinite(budget) and 0 < budget <= 1):
        raise InvalidArgument(
            f"budget must be in (0, 1] ({what}), got budget={budget!r} "
            f"(type={type(budget).__name__})"
        )
    return Budget(**{bare: float(budget)})
