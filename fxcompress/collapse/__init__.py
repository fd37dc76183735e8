"""LayerCollapse: linearise activations between two linear layers and merge them."""

from __future__ import annotations

from fxcompress.collapse.pipeline import (
    GATED,
    Blend,
    CollapseReport,
    Site,
    SiteDecision,
    apply,
    prepare,
    regularizer,
    slope_parameters,
    slopes,
)

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
