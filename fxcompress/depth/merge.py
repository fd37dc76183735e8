"""Exact merging passes: BatchNorm folding, conv∘conv / linear∘linear merging, skip folding.

:func:`merge` runs the passes to a fixed point: BatchNorm folds (:mod:`.fold_batchnorms`), chain
merges (:mod:`.merge_chains`, each linear run split as :mod:`.partition` says) and sum folds
(:mod:`.fold_sums`); each writes its result into the graph through :func:`.emission.emit`.

Every rewrite here is function-preserving in eval mode (up to floating-point rounding; the maths
runs in float64). Patterns and the reasons they are skipped:

- ``layer -> BN``: folded when the layer's output feeds only the BN (else others would see the
  folded values), the BN uses running statistics, and the BN's axis 1 is the layer's channel
  axis: a batched output (an unbatched conv output ``(C, L)`` puts a spatial axis there, and
  BatchNorm1d then normalises that). A BN is an ``nn.BatchNorm{1,2,3}d`` call or
  ``F.batch_norm(..., training=False)`` on attributes (timm's ``BatchNormAct2d`` traces to it).
- ``BN -> layer`` (a BN that could not be folded into its producer): folded into the layer that
  alone reads it when that layer does not zero-pad (event ``fold_bn_before``).
- linear runs ``conv1 -> conv2 -> ...`` (or of linear layers), each layer's output read only by
  the next: split into the parts of least total cost, each merged into one layer, by a DP over
  the run (:mod:`fxcompress.depth.partition`; cost: multiply-accumulates at the traced shape, or the
  ``cost`` given to :func:`merge`). Keeping every layer is a candidate, so the result is never
  costlier (a depthwise chain turned dense would be), yet a whole run may merge where no pair
  would (an inverted residual without activations is one dense conv). A zero-padded layer
  begins a part (padding of an intermediate map is not a convolution of the input, see
  :func:`~fxcompress.maths.compose`); layers that carry the same
  ``meta["fxcompress.segment"]`` chosen by a planner are merged regardless.
- sums of branches of one tensor ``x`` -- ``conv(x)`` (with its folded BN), ``conv(Pad(x))``,
  ``Pad(x)``, ``BN(x)`` (a per-channel affine map: a depthwise 1x1 conv) and ``x`` itself --
  in any association of nested adds (``(a + b) + c`` is two add nodes): the summands of one
  tensor that save the most are folded into one conv (projection shortcut, identity skip,
  cropped identity, RepVGG / MobileOne re-parameterisation), never costlier unless a planner
  put them in one segment; other summands stay in the sum (event ``fold_skip``).

A module called from several places is never modified: each rewritten call site gets a new module;
nor is a module overwritten while anything still calls it or reads one of its attributes.
In-place ops are respected: a chain's merged layer reads its input where the first layer did, and
a sum is not folded when its input (or a summand left in the sum) is written in place between
the branches' reads. Reads of a layer's rank only (``y.ndim`` in timm's shape assertions) are
moved to its input, which has the same rank, so they do not block a fold.
"""

from __future__ import annotations

from torch import fx

from fxcompress.depth.emission import Event, record_events
from fxcompress.depth.fold_batchnorms import (
    fold_bn_after_layer,
    fold_bn_into_next,
    fold_every_batchnorm,
)
from fxcompress.depth.fold_sums import try_fold_sum
from fxcompress.depth.merge_chains import try_merge_chain
from fxcompress.depth.partition import LayerCost
from fxcompress.errors import InvalidArgument
from fxcompress.graph.canonicalize import canonicalize
from fxcompress.graph.util import clone, eliminate_dead_code, finalize

__all__ = ["fold_batchnorm", "merge"]


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of ``gm`` with every foldable eval-mode BatchNorm folded into its layer.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from fxcompress.graph.capture import capture
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> folded = fold_batchnorm(capture(m, torch.randn(1, 3, 6, 6)))
    >>> [type(mod).__name__ for mod in folded.children()]
    ['Conv2d']
    """
    gm = clone(gm)
    events = fold_every_batchnorm(gm)
    record_events(gm, events)
    return finalize(gm)


def merge(
    gm: fx.GraphModule, *, only_if_cheaper: bool = True, cost: LayerCost | None = None
) -> fx.GraphModule:
    """Return a copy of ``gm`` with every exactly-mergeable run of layers merged into one layer.

    The graph is canonicalized first (see :func:`fxcompress.canonicalize`: eval-mode dropout and
    ``nn.Identity`` go, activations get one spelling), BatchNorms are folded, then conv chains,
    linear chains and foldable skip connections are merged until nothing changes.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        A captured, eval-mode module (see :func:`fxcompress.capture`); not modified.
    only_if_cheaper : bool
        Apply a merge only if the merged layer costs no more than the layers it replaces. Each
        linear run of layers (each reading only the previous one's output) is split into the
        parts of least total cost (see :mod:`fxcompress.depth.partition`); with False, into the
        fewest parts. Layers that a planner marked as one segment are merged regardless.
    cost : callable, optional
        ``cost(layer, input_shape, output_shape) -> float`` prices a layer of a linear run (see
        :data:`fxcompress.depth.partition.LayerCost`); default: its multiply-accumulates at the
        traced shape (:func:`fxcompress.depth.partition.layer_macs`). ``latency_cost(table)``
        prices it by a :class:`~fxcompress.latency.LatencyTable`.

    Returns
    -------
    torch.fx.GraphModule
        ``meta["fxcompress.events"]`` lists each fold and merge.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from fxcompress.graph.capture import capture
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)).eval()
    >>> x = torch.randn(1, 3, 9, 9)
    >>> merged = merge(capture(m, x))
    >>> [type(mod).__name__ for mod in merged.children()]
    ['Conv2d']
    >>> torch.allclose(merged(x), m(x), atol=1e-5)
    True
    """
    if cost is not None and not callable(cost):
        raise InvalidArgument(
            f"cost must be a callable cost(layer, input_shape, output_shape) -> float or None, "
            f"got {cost!r:.80} of type {type(cost).__name__}; e.g. "
            "fxcompress.depth.partition.latency_cost(table)"
        )
    # a canonical copy: no-op layers (eval dropout, nn.Identity) no longer sit between layers
    gm = canonicalize(gm).eval()  # folds use eval (running-statistics) semantics
    events: list[Event] = fold_every_batchnorm(gm)
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node not in gm.graph.nodes:
                continue  # erased earlier in this sweep
            event = (
                fold_bn_after_layer(gm, node)  # a sum folded into a conv may precede a BN
                or fold_bn_into_next(gm, node)
                or try_merge_chain(gm, node, only_if_cheaper, cost)
                or try_fold_sum(gm, node, only_if_cheaper, cost)
            )
            if event is not None:
                events.append(event)
                changed = True
                # drop what the rewrite left unread (e.g. a folded shortcut's Pad) right away,
                # so that single-user checks later in this sweep see the real readers
                eliminate_dead_code(gm)
    record_events(gm, events)
    return finalize(gm)
