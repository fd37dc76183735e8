"""fxcompress: make trained PyTorch models shallower and faster under a latency budget.

>>> import fxcompress
>>> sorted(["optimize", "merge", "capture"]) == sorted(n for n in ["optimize", "merge", "capture"]
...                                                    if hasattr(fxcompress, n))
True
"""

from __future__ import annotations

import logging

from fxcompress import collapse, fusion, lowrank
from fxcompress.budget import Budget
from fxcompress.depth.analysis import Analysis, analyze
from fxcompress.depth.merge import fold_batchnorm, merge
from fxcompress.distill import Distill
from fxcompress.errors import (
    CaptureError,
    FxCompressError,
    InfeasibleBudget,
    InvalidArgument,
    RewriteError,
)
from fxcompress.graph.canonicalize import canonicalize
from fxcompress.graph.capture import capture
from fxcompress.io import load, load_plan, save, save_plan
from fxcompress.latency import LatencyTable, OpSpec
from fxcompress.pipeline.optimize import optimize
from fxcompress.pipeline.plan import Plan, relax
from fxcompress.pipeline.problem import make_plan
from fxcompress.report import Report

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
