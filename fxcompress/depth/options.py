"""Glue between the analysis, the latency table, the importance scores and the pure planner.

It enumerates the segment options of every chain, prices each with the latency table, and builds
the :class:`fxcompress.depth.planner.Problem` the DP solves. Choice keys are ``"keep"`` (a single
item as it is; for a residual, its branch is planned as a sub-chain) or an
:class:`~.analysis.MergeOption` key (``"merge"`` or ``"merge:prune=a,b"``), or ``"drop"`` (a
residual reduced to its shortcut and final activation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fxcompress.depth.analysis import (
    Analysis,
    Geometry,
    Item,
    Residual,
    Unit,
    segment_options,
)
from fxcompress.depth.planner import ChainSpec, Choice, Problem, Span
from fxcompress.depth.segment import DROP, KEEP, Segment
from fxcompress.latency.spec import OpSpec

__all__ = [
    "DROP",  # re-exported from fxcompress.depth.segment while the pipeline moves to it
    "SegmentOption",
    "baseline_latency",
    "build_problem",
    "enumerate_options",
    "item_latency",
    "option_latency",
]

LatencyFn = Callable[[OpSpec], float]


@dataclass(frozen=True)
class SegmentOption:
    """A :class:`~fxcompress.depth.segment.Segment` the planner may choose, with what pricing it
    needs: the merged layer's ``geometry`` (``None`` for ``"keep"`` and ``"drop"``) and ``act``,
    the activation at the segment's end.

    Examples
    --------
    >>> option = SegmentOption(Segment("body", 0, 1, "keep"), None, "relu")
    >>> option.id, option.needs_score, option.segment.chain
    ('body:0-1:keep', False, 'body')
    """

    segment: Segment
    geometry: Geometry | None
    act: str | None

    @property
    def id(self) -> str:
        """The segment's id (:attr:`Segment.id`), the key of its damage."""
        return self.segment.id

    @property
    def needs_score(self) -> bool:
        """Whether the option changes the network (so its damage must be measured)."""
        return self.segment.key != KEEP


def enumerate_options(
    analysis: Analysis, *, prune: bool, drop: bool = False
) -> list[SegmentOption]:
    """Every segment option of every chain, in a deterministic order.

    ``prune`` adds LayerMerge's pruned merges; ``drop`` adds, for every residual, the option of
    dropping its branch (key ``"drop"``: the block becomes its shortcut and final activation).
    """
    out: list[SegmentOption] = []
    for chain in analysis.chains:
        n = len(chain.items)
        for start in range(n):
            for stop in range(start + 1, n + 1):
                items = chain.items[start:stop]
                last_act = _act_kind(items[-1])
                if stop - start == 1:
                    keep = Segment(chain.name, start, stop, KEEP)
                    out.append(SegmentOption(keep, None, last_act))
                    if drop and isinstance(items[0], Residual):
                        dropped = Segment(chain.name, start, stop, DROP)
                        out.append(SegmentOption(dropped, None, last_act))
                    if isinstance(items[0], Unit):
                        continue  # a single unit merged is the unit itself
                options = segment_options(items)
                if not options:
                    if stop - start > 1:
                        break  # longer segments only grow
                    continue
                for opt in options:
                    if opt.pruned and not prune:
                        continue
                    merged = Segment(chain.name, start, stop, opt.key, opt.pruned)
                    out.append(SegmentOption(merged, opt.geometry, last_act))
    return out


def _act_kind(item: Item) -> str | None:
    return item.act_kind


def _unit_spec(u: Unit, dtype: str, act: str | None) -> OpSpec:
    if u.kind == "linear":
        return OpSpec(
            kind="linear",
            input_shape=u.input_shape,
            dtype=dtype,
            out_channels=u.out_channels,
            activation=act,
        )
    return OpSpec(
        kind="conv",
        input_shape=u.input_shape,
        dtype=dtype,
        out_channels=u.out_channels,
        kernel_size=u.kernel_size,
        stride=u.stride,
        padding=u.padding,
        dilation=u.dilation,
        groups=u.groups,
        activation=act,
    )


def _geometry_spec(g: Geometry, dtype: str, act: str | None) -> OpSpec:
    if g.kind == "linear":
        return OpSpec(
            kind="linear",
            input_shape=g.input_shape,
            dtype=dtype,
            out_channels=g.out_channels,
            activation=act,
        )
    nd = len(g.kernel_size)
    return OpSpec(
        kind="conv",
        input_shape=g.input_shape,
        dtype=dtype,
        out_channels=g.out_channels,
        kernel_size=g.kernel_size,
        stride=g.stride,
        padding=g.padding,
        dilation=(1,) * nd,
        groups=g.groups,
        activation=act,
    )


def item_latency(item: Item, latency: LatencyFn, dtype: str) -> float:
    """Latency of an item as it is in the original network."""
    if isinstance(item, Unit):
        return latency(_unit_spec(item, dtype, item.act_kind))
    return sum(latency(_unit_spec(u, dtype, u.act_kind)) for u in item.branch_units) + (
        _residual_overhead(item, latency, dtype)
    )


def _residual_overhead(res: Residual, latency: LatencyFn, dtype: str) -> float:
    """Everything of a residual but its branch: the add, the shortcut and the final activation."""
    add = latency(OpSpec(kind="add", input_shape=res.output_shape, dtype=dtype))
    return add + _dropped_latency(res, latency, dtype)


def _dropped_latency(res: Residual, latency: LatencyFn, dtype: str) -> float:
    """A residual without its branch: the shortcut (if a layer) and the final activation."""
    t = 0.0
    if res.act_kind is not None:
        t += latency(
            OpSpec(kind="act", input_shape=res.output_shape, dtype=dtype, activation=res.act_kind)
        )
    if res.shortcut is not None:
        t += latency(_unit_spec(res.shortcut, dtype, None))
    return t


def option_latency(opt: SegmentOption, analysis: Analysis, latency: LatencyFn, dtype: str) -> float:
    """Latency of the option's segment as the option implements it (for ``"keep"`` of a residual:
    everything but its branch, which is planned as a chain of its own)."""
    seg = opt.segment
    chain = analysis.chain(seg.chain)
    if seg.key == DROP:
        res = chain.items[seg.start]
        assert isinstance(res, Residual)
        return _dropped_latency(res, latency, dtype)
    if seg.key == KEEP:
        item = chain.items[seg.start]
        if isinstance(item, Residual):
            return _residual_overhead(item, latency, dtype)
        return item_latency(item, latency, dtype)
    assert opt.geometry is not None
    return latency(_geometry_spec(opt.geometry, dtype, opt.act))


def build_problem(
    analysis: Analysis,
    options: list[SegmentOption],
    damages: dict[str, float],
    latency: LatencyFn,
    *,
    dtype: str,
    fixed_latency: float,
) -> Problem:
    """The planner's problem: one planner chain per analysis chain."""
    by_chain: dict[str, dict[tuple[int, int], list[Choice]]] = {}
    for opt in options:
        seg = opt.segment
        chain = analysis.chain(seg.chain)
        sub: tuple[str, ...] = ()
        if seg.key == KEEP and isinstance(chain.items[seg.start], Residual):
            sub = (f"{chain.items[seg.start].add}.branch",)
        choice = Choice(
            key=seg.key,
            latency=option_latency(opt, analysis, latency, dtype),
            damage=0.0 if seg.key == KEEP else max(0.0, float(damages[opt.id])),
            sub=sub,
        )
        by_chain.setdefault(seg.chain, {}).setdefault((seg.start, seg.stop), []).append(choice)
    chains = []
    for chain in analysis.chains:
        segs = by_chain.get(chain.name, {})
        chains.append(
            ChainSpec(
                name=chain.name,
                length=len(chain.items),
                segments=tuple(Span(s, e, tuple(cs)) for (s, e), cs in sorted(segs.items())),
            )
        )
    return Problem(chains=tuple(chains), fixed_latency=fixed_latency)


def baseline_latency(analysis: Analysis, latency: LatencyFn, dtype: str) -> float:
    """Sum of the original items' latencies over the root chains."""
    return sum(item_latency(it, latency, dtype) for c in analysis.roots for it in c.items)
