"""LayerCollapse: linearise activations between two linear layers and merge them.

Modules, in pipeline order: :mod:`.maths` (tensor maths), :mod:`.sites` (which activations are
sites), :mod:`.rewrite` (graph surgery), :mod:`.training` (the penalty that pulls slopes to 1),
:mod:`.pipeline` (``prepare``, ``apply``), :mod:`.report`. See ``docs/collapse.md``.
"""

from __future__ import annotations

from fxcompress.collapse.maths import GATED, Blend
from fxcompress.collapse.pipeline import apply, prepare
from fxcompress.collapse.report import CollapseReport, SiteDecision
from fxcompress.collapse.sites import Site
from fxcompress.collapse.training import regularizer, slope_parameters, slopes

__all__ = [
    "GATED",
    "Blend",
    "CollapseReport",
    "Site",
    "SiteDecision",
    "apply",
    "prepare",
    "regularizer",
    "slope_parameters",
    "slopes",
]
