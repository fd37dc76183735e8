"""The method contract: how every compression method takes a budget, is applied and reports.

A method is a subpackage (``depth/`` behind :func:`fxcompress.optimize`, ``lowrank/``,
``collapse/``, ``fusion/``) layered like ``lowrank/``: tensor maths → pure choice (allocation,
schedule) → graph rewrite → ``pipeline.py`` (the entry point) → ``report.py``. Its entry point
follows four rules.

Budget
    The budget goes through :func:`fxcompress.budget.as_budget` with the method's ``bare`` kind:
    what a bare number means to it (``"fraction"`` of the latency for ``optimize``, ``"params"``
    for ``lowrank.decompose`` and ``fusion.fuse``). A :class:`~fxcompress.budget.Budget` or a
    one-entry mapping (``{"macs": 0.5}``) states any other kind; a kind the method cannot meet
    raises :class:`~fxcompress.errors.InvalidArgument` naming the kinds it takes. LayerCollapse
    has no budget: its ``tol`` on the learned slopes decides.
Application
    A function from the caller's model (or, for ``collapse.apply``, the graph ``prepare`` made)
    to a **new** ``torch.fx.GraphModule`` in eval mode. The caller's model is never modified
    (``capture`` copies it; ``collapse.apply`` clones the prepared graph). Graph surgery ends in
    :func:`fxcompress.graph.util.finalize`. Optional retraining is a callback
    (``finetune(gm)`` / ``retrain(gm)``) that trains the given module in place; the result is
    put back in eval mode after it.
Report
    The result carries its report under ``gm.meta[meta.<KEY>]`` (:mod:`fxcompress.meta`), and
    the report follows the report protocol, :class:`fxcompress.report.MethodReport`:
    ``to_dict()`` (JSON-able), ``from_dict(d)`` (a classmethod; rebuilds the report) and
    ``to_markdown()``. :func:`deliver` stores it and puts the result in eval mode (the last line
    of ``decompose``, ``apply`` and ``fuse``).
Errors
    Bad arguments raise :class:`~fxcompress.errors.InvalidArgument`, an unreachable budget
    :class:`~fxcompress.errors.InfeasibleBudget` (with ``minimum``), a rewrite that does not
    compute what it should :class:`~fxcompress.errors.RewriteError`.

:data:`CONTRACTS` lists how each method meets it; a new method is a new subpackage and a new row.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fxcompress import meta

__all__ = ["CONTRACTS", "Contract", "deliver"]


@dataclass(frozen=True)
class Contract:
    """How one method meets the contract (names, not objects: this module imports no method).

    Attributes
    ----------
    entry : str
        The entry point's qualified name.
    bare : str or None
        What a bare number means as its budget (``as_budget(..., bare=bare)``); ``None``: the
        method takes no budget.
    key : str
        The ``GraphModule.meta`` key of its report.
    report : str
        The report class's qualified name.
    """

    entry: str
    bare: str | None
    key: str
    report: str


#: every method's contract, by method name
CONTRACTS = {
    "depth": Contract("fxcompress.optimize", "fraction", meta.REPORT, "fxcompress.report.Report"),
    "lowrank": Contract(
        "fxcompress.lowrank.decompose", "params", meta.LOWRANK, "fxcompress.lowrank.LowRankReport"
    ),
    "collapse": Contract(
        "fxcompress.collapse.apply", None, meta.COLLAPSE, "fxcompress.collapse.CollapseReport"
    ),
    "fusion": Contract(
        "fxcompress.fusion.fuse", "params", meta.FUSION, "fxcompress.fusion.FusionReport"
    ),
}


def deliver(gm: fx.GraphModule, key: str, report: object) -> fx.GraphModule:
    """The last step of a method: ``gm`` in eval mode with ``report`` under ``gm.meta[key]``.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The method's result (a new module, never the caller's).
    key : str
        One of the keys of :mod:`fxcompress.meta`.
    report : MethodReport
        What the method did.

    Returns
    -------
    torch.fx.GraphModule
        ``gm`` itself.

    Examples
    --------
    >>> import torch
    >>> gm = fx.symbolic_trace(torch.nn.Linear(2, 2)).train()
    >>> deliver(gm, meta.LOWRANK, "a report").training, gm.meta[meta.LOWRANK]
    (False, 'a report')
    """
    gm.meta[key] = report
    return gm.eval()
