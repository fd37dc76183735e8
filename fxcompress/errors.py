"""Exception hierarchy of fxcompress.

Every error the library raises on purpose derives from :class:`FxCompressError`, so a caller can
catch them all at once. :class:`InvalidArgument` is also a :class:`ValueError`, because a bad
argument is one.
"""

from __future__ import annotations

__all__ = [
    "CaptureError",
    "FxCompressError",
    "InfeasibleBudget",
    "InvalidArgument",
    "RewriteError",
]


class FxCompressError(Exception):
    """Base class of all fxcompress errors."""


class InvalidArgument(FxCompressError, ValueError):
    """An argument of a public function has a bad value or type; the message shows it."""


class CaptureError(FxCompressError):
    """``torch.fx`` could not trace the model; the message names where and suggests a fix."""


class InfeasibleBudget(FxCompressError):
    """No plan fits the budget.

    Attributes
    ----------
    minimum : float
        The lowest reachable cost as a fraction of the original model's: of its latency for
        latency budgets (also ``Budget(latency_ms=...)`` and ``Budget(speedup=...)``), of its
        parameters for ``Budget(params=...)``.
    result : object or None
        When the budget was missed only on measurement (the plan predicted it would fit), the
        fastest model that was built, so the work is not lost; otherwise None.
    """

    def __init__(self, message: str, *, minimum: float, result: object = None) -> None:
        super().__init__(message)
        self.minimum = minimum
        self.result = result


class RewriteError(FxCompressError):
    """A rewrite broke graph lint or numerical equivalence: always a bug in fxcompress."""
