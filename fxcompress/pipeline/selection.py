"""Choosing among near-equal plans by a trial fine-tune of each (``optimize(plan_candidates=k)``).

The planner ranks plans by damages measured on the untrained network, one segment relaxed at a time,
and adds them up. Once several segments are relaxed together the network can lose most of its
function, and what a plan is worth is then what fine-tuning recovers: plans of nearly equal planned
damage can end several points of accuracy apart. With ``plan_candidates=k`` the planner's best plan
and up to ``k - 1`` runners-up by planned damage (:func:`fxcompress.depth.planner.alternatives`;
plans that relax to the same trainable network count once) that also measure within the budget are
each trained by the caller's trial fine-tune, and the one whose trained relaxed network scores best
on the calibration batches is kept: the lowest mean ``loss_fn`` or, without it, the lowest relative
output error against the original network.

The calibration batches come from ``data``, which the fine-tune usually trains on as well: the score
is a training-set score, which ranks how well each plan trains rather than how it generalises. Ties
keep the plan the planner ranked first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from torch import nn

from fxcompress.errors import InvalidArgument
from fxcompress.progress import bar

__all__ = ["Trial", "choose"]

logger = logging.getLogger("fxcompress.selection")

P = TypeVar("P")


@dataclass(frozen=True)
class Trial:
    """One plan considered.

    Attributes
    ----------
    rank : int
        0 for the planner's best plan, then the runners-up by planned damage.
    damage, predicted_ms : float
        What the planner expected of it.
    measured_ratio : float or None
        Its measured latency ratio (None with an analytic latency model).
    score : float or None
        The trained network's calibration score (lower is better); None if it was not trained
        because it measured slower than the budget allows.
    chosen : bool
    """

    rank: int
    damage: float
    predicted_ms: float
    measured_ratio: float | None
    score: float | None
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Selected(Generic[P]):
    """The outcome of :func:`choose`: the kept plan, its trained relaxed network, all trials."""

    index: int
    plan: P
    trained: nn.Module
    trials: tuple[Trial, ...]


def choose(
    plans: Sequence[P],
    ratios: Sequence[float | None],
    *,
    limit: float,
    describe: Callable[[P], tuple[float, float]],
    relax: Callable[[P], nn.Module],
    trial: Callable[[nn.Module], None],
    score: Callable[[nn.Module], float],
    progress: bool | None = None,
) -> Selected[P]:
    """Train every plan measured within ``limit`` with ``trial`` and keep the best scoring.

    Parameters
    ----------
    plans : sequence
        Candidate plans, the planner's best first; ``plans[0]`` is always tried.
    ratios : sequence of float or None
        The measured latency ratio of each plan (None: not measured).
    limit : float
        Plans after the first measured above this ratio are not tried.
    describe : callable
        ``describe(plan) -> (damage, predicted_ms)``, for the record.
    relax : callable
        ``relax(plan)`` returns a fresh trainable network of the plan.
    trial : callable
        Trains that network in place (the caller's trial fine-tune) and returns None, or returns
        the trained network (an ``nn.Module``), which is then scored and kept instead.
    score : callable
        Scores a trained network in eval mode; lower is better.

    Returns
    -------
    Selected

    Examples
    --------
    Three plans, here weights of a one-parameter network; the third measured too slow:

    >>> import torch
    >>> def relax(w):
    ...     net = torch.nn.Linear(1, 1, bias=False)
    ...     torch.nn.init.constant_(net.weight, w)
    ...     return net
    >>> picked = choose(
    ...     [0.5, -0.25, 0.125], [0.5, 0.5, 0.7], limit=0.6,
    ...     describe=lambda w: (abs(w), 1.0),
    ...     relax=relax,
    ...     trial=lambda net: None,
    ...     score=lambda net: net.weight.detach().abs().item(),
    ... )
    >>> picked.plan, [t.score for t in picked.trials]
    (-0.25, [0.5, 0.25, None])
    """
    scores: dict[int, float] = {}
    best: tuple[float, int, nn.Module] | None = None  # only the best trained network is kept
    eligible = [i for i, r in enumerate(ratios) if i == 0 or r is None or r <= limit]
    with bar(total=len(eligible), desc="trial fine-tunes", enabled=progress) as pbar:
        for i in eligible:
            net = relax(plans[i])
            out = trial(net)
            if out is not None and not isinstance(out, nn.Module):
                raise InvalidArgument(
                    f"the trial fine-tune returned {type(out).__name__}; it must train the "
                    "network it is given in place and return None, or return the trained "
                    "network (an nn.Module)"
                )
            net = net if out is None else out
            net.eval()
            value = float(score(net))
            if not math.isfinite(value):
                value = math.inf
            logger.info("plan %d of %d: trial score %.6g", i, len(plans), value)
            scores[i] = value
            if best is None or value < best[0]:
                best = (value, i, net)
            pbar.update(1)
    assert best is not None, "plans[0] is always tried"
    _, index, trained = best
    trials = []
    for i, plan in enumerate(plans):
        damage, predicted = describe(plan)
        trials.append(Trial(i, damage, predicted, ratios[i], scores.get(i), chosen=i == index))
    return Selected(index, plans[index], trained, tuple(trials))
