"""fxcompress: make trained PyTorch models shallower and faster under a latency budget.

>>> import fxcompress
>>> sorted(["optimize", "merge", "capture"]) == sorted(n for n in ["optimize", "merge", "capture"]
...                                                    if hasattr(fxcompress, n))
True
"""

from __future__ import annotations

import logging

from . import collapse, fusion, lowrank
from .analysis import Analysis, analyze
from .api import Budget, Plan, make_plan, optimize, relax
from .canonicalize import canonicalize
from .capture import capture
from .distill import Distill
from .errors import (
    CaptureError,
    FxCompressError,
    InfeasibleBudget,
    InvalidArgument,
    RewriteError,
)
from .io import load, load_plan, save, save_plan
from .latency import LatencyTable, OpSpec
from .merge import fold_batchnorm, merge
from .report import Report

plan = make_plan

__all__ = [
    "Analysis",
    "Budget",
    "CaptureError",
    "Distill",
    "FxCompressError",
    "InfeasibleBudget",
    "InvalidArgument",
    "LatencyTable",
    "OpSpec",
    "Plan",
    "Report",
    "RewriteError",
    "analyze",
    "canonicalize",
    "capture",
    "collapse",
    "fold_batchnorm",
    "fusion",
    "load",
    "load_plan",
    "lowrank",
    "make_plan",
    "merge",
    "optimize",
    "plan",
    "relax",
    "save",
    "save_plan",
]

__version__ = "0.1.0"

logging.getLogger("fxcompress").addHandler(logging.NullHandler())
