"""The keys fxcompress writes into ``GraphModule.meta``, in one place.

Every method leaves its report under ``fxcompress.<method>`` except :func:`fxcompress.optimize`,
whose :class:`~fxcompress.report.Report` is the package's own key ``"fxcompress"``. The values are
part of the public contract (docs/api.md); a test checks that each key is written where it says.
"""

from __future__ import annotations

#: :func:`fxcompress.optimize`'s :class:`~fxcompress.report.Report`
REPORT = "fxcompress"
#: :func:`fxcompress.lowrank.decompose`'s :class:`~fxcompress.lowrank.LowRankReport`
LOWRANK = "fxcompress.lowrank"
#: :func:`fxcompress.collapse.apply`'s :class:`~fxcompress.collapse.CollapseReport`
COLLAPSE = "fxcompress.collapse"
#: :func:`fxcompress.fusion.fuse`'s :class:`~fxcompress.fusion.FusionReport`
FUSION = "fxcompress.fusion"
#: the :class:`~fxcompress.collapse.Site` s of a module made by :func:`fxcompress.collapse.prepare`
COLLAPSE_SITES = "fxcompress.collapse.sites"
#: the example inputs :func:`fxcompress.collapse.prepare` keeps for the check in ``apply``
COLLAPSE_EXAMPLES = "fxcompress.collapse.example_inputs"
#: the plan (as a dict) a relaxed module was made from (:func:`fxcompress.relax`)
PLAN = "fxcompress.plan"
#: what canonicalize and merge changed: a list of ``{"kind": ..., ...}`` events
EVENTS = "fxcompress.events"
#: submodules called at several places (never folded into one of them)
SHARED = "fxcompress.shared"
#: submodules with forward hooks, kept as opaque leaves: name -> hook descriptions
HOOKED = "fxcompress.hooked"
#: node meta: the planned segment a node belongs to (set by relax, read by merge)
SEGMENT = "fxcompress.segment"

__all__ = [
    "COLLAPSE",
    "COLLAPSE_EXAMPLES",
    "COLLAPSE_SITES",
    "EVENTS",
    "FUSION",
    "HOOKED",
    "LOWRANK",
    "PLAN",
    "REPORT",
    "SEGMENT",
    "SHARED",
]
