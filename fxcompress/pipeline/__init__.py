"""The pipeline behind :func:`fxcompress.optimize`, one module per stage.

``captured`` (capture once) → ``problem`` (analyze, ``pricing``, importance → the DP's problem;
:func:`solve`) → ``closed_loop`` (build with ``build``, measure with ``measure``, re-plan) →
``trials`` (``selection``) → ``finetune`` → ``reporting``; ``optimize`` lists the stages,
``lowrank`` routes ``methods=("lowrank",)``, ``checks`` validates, ``plan`` holds :class:`Plan`
and :func:`relax`.
"""

from fxcompress.pipeline.closed_loop import ClosedLoop
from fxcompress.pipeline.measure import Measure, PairedLatency
from fxcompress.pipeline.plan import Plan, relax
from fxcompress.pipeline.problem import Prepared, make_plan, prepare_problem, solve

__all__ = [
    "ClosedLoop",
    "Measure",
    "PairedLatency",
    "Plan",
    "Prepared",
    "make_plan",
    "prepare_problem",
    "relax",
    "solve",
]
