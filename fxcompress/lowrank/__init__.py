"""Low-rank decomposition of conv and linear layers with a global rank allocation (ALDS).

Each chosen layer becomes a grouped conv (``k`` groups of consecutive input channels, rank ``j``
per group, original kernel) followed by a 1x1 conv; :func:`decompose` picks ``(k, j)`` for every
layer so that the largest relative spectral error is as small as the budget allows. The
uniform-rank and SVD-energy baselines go through the same rewrite. See ``docs/lowrank.md``.

Modules: :mod:`.factorize` (tensor maths), :mod:`.allocation` (pure allocation),
:mod:`.rewrite` (graph surgery), :mod:`.pricing` (error tables and prices of the options),
:mod:`.pipeline` (``decompose``), :mod:`.report`. ``collapse/`` and ``fusion/`` are layered the
same way; every method follows the contract of :mod:`fxcompress.method`.
"""

from __future__ import annotations

from fxcompress.lowrank.allocation import Allocation, LayerOptions, Option, allocate
from fxcompress.lowrank.factorize import (
    factorize,
    max_rank,
    paying_rank,
    reconstruct,
    residual_energy,
    spectral_errors,
)
from fxcompress.lowrank.modules import GroupedLinear
from fxcompress.lowrank.pipeline import METHODS, decompose
from fxcompress.lowrank.pricing import ErrorCache, rank_grid
from fxcompress.lowrank.report import LayerDecision, LowRankReport
from fxcompress.lowrank.rewrite import Site, find_sites

__all__ = [
    "METHODS",
    "Allocation",
    "ErrorCache",
    "GroupedLinear",
    "LayerDecision",
    "LayerOptions",
    "LowRankReport",
    "Option",
    "Site",
    "allocate",
    "decompose",
    "factorize",
    "find_sites",
    "max_rank",
    "paying_rank",
    "rank_grid",
    "reconstruct",
    "residual_energy",
    "spectral_errors",
]
