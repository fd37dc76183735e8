"""What an ``optimize`` call did: the plan, the latencies, the per-segment decisions."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

from torch import fx, nn

from fxcompress.budget import FIELDS, Budget
from fxcompress.graph.capture import Hooked

__all__ = ["MethodReport", "Report", "count_macs", "count_params", "known_fields"]

#: the ways a budget can be stated (the fields of :class:`fxcompress.Budget`)
TARGETS = FIELDS

#: why a part of the graph is left as it is (:attr:`fxcompress.Analysis.kept` reasons, explained)
_WHY_KEPT = {
    "not part of a mergeable chain": (
        "not a conv or linear layer, or not linear between layers (pooling, reshapes, "
        "concatenation, gates, attention, unknown ops): chains end there and it runs unchanged"
    ),
    "module called at several places": (
        "a module called more than once: rewriting one call would change the others"
    ),
    "shape unknown": "no shape was recorded for it, so its merged form cannot be sized",
}

#: how many names a list in the Markdown shows before "… and N more"
_SHOWN = 8


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@runtime_checkable
class MethodReport(Protocol):
    """The report protocol: what every method leaves under ``gm.meta[meta.<KEY>]``.

    :class:`Report` (``optimize``), :class:`~fxcompress.lowrank.LowRankReport`,
    :class:`~fxcompress.collapse.CollapseReport` and :class:`~fxcompress.fusion.FusionReport`
    follow it: ``to_dict()`` gives JSON-able data, ``from_dict(d)`` rebuilds the report from it
    (keys it does not know are ignored, so derived entries such as ``"ratio"`` may stay in ``d``)
    and ``to_markdown()`` renders it for people. See :mod:`fxcompress.method`.

    Examples
    --------
    >>> isinstance(Report(budget=0.5), MethodReport)
    True
    >>> Report.from_dict(Report(budget=0.5).to_dict()).budget
    0.5
    """

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodReport: ...

    def to_markdown(self) -> str: ...


def known_fields(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that name fields of the dataclass ``cls`` (for ``from_dict``).

    Examples
    --------
    >>> known_fields(Budget, {"params": 0.5, "ratio": 1.0})
    {'params': 0.5}
    """
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _target_of(budget: Any) -> dict[str, float]:
    """``{name: value}`` of a :class:`fxcompress.Budget`, its ``asdict`` or a plain fraction."""
    if isinstance(budget, Mapping):
        items = budget.items()
    elif isinstance(budget, Budget):
        items = ((name, getattr(budget, name)) for name in TARGETS)
    else:
        value = _finite(budget)
        return {} if value is None else {"fraction": value}
    return {k: float(v) for k, v in items if k in TARGETS and _finite(v) is not None}


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.3g} %"


def _names(names: Sequence[str], shown: int = _SHOWN) -> str:
    names = list(names)
    if len(names) <= shown:
        return ", ".join(names)
    return ", ".join(names[:shown]) + f", … and {len(names) - shown} more"


@dataclass
class Report:
    """Summary of a compression run (JSON-able through :meth:`to_dict`).

    ``budget`` is the latency budget as a fraction of the original latency (NaN when the budget
    was not a latency, or is an absolute latency whose original is not known yet); ``target``
    is the budget as it was asked, e.g. ``{"speedup": 2.0}`` or ``{"latency_ms": 12.0}``. A
    :class:`fxcompress.Budget` (or its ``asdict``) given as ``budget`` fills both.

    Examples
    --------
    >>> r = Report(budget=float("nan"), target={"speedup": 2.0}, original_ms=10.0)
    >>> r.budget_text()
    '2× speed-up (≤ 50 % of the original latency)'
    >>> Report(budget=0.6).budget_text()
    '≤ 60 % of the original latency'
    """

    budget: float
    original_ms: float | None = None
    final_ms: float | None = None
    predicted_ms: float | None = None
    latency_mode: str = "measure"
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    damage: float = 0.0
    decisions: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    kept: list[list[str]] = field(default_factory=list)
    replans: list[dict[str, Any]] = field(default_factory=list)
    max_rel_error: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: Pareto front of the plan: ``[predicted_ms, damage]`` pairs, fastest first.
    front: list[list[float]] = field(default_factory=list)
    #: with ``plan_candidates > 1``: every plan considered
    #: (see :class:`fxcompress.pipeline.selection.Trial`)
    trials: list[dict[str, Any]] = field(default_factory=list)
    #: the budget as it was asked: one of ``fraction``, ``latency_ms``, ``speedup``, ``params``,
    #: ``macs`` and its value
    target: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        asked = _target_of(self.target) if self.target else {}
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            asked = asked or _target_of(self.budget)  # a Budget or its dict
            self.budget = float("nan")
        else:
            self.budget = float(self.budget)
        if not asked and _finite(self.budget) is not None:
            asked = {"fraction": self.budget}
        self.target = asked
        if _finite(self.budget) is None:
            if "fraction" in asked:
                self.budget = asked["fraction"]
            elif "speedup" in asked:
                self.budget = 1.0 / asked["speedup"]

    @property
    def ratio(self) -> float | None:
        """Measured final / original latency."""
        if self.original_ms and self.final_ms is not None:
            return self.final_ms / self.original_ms
        return None

    @property
    def budget_fraction(self) -> float | None:
        """The latency budget as a fraction of the original latency (``None``: not a latency,
        or an absolute latency whose original is unknown)."""
        if _finite(self.budget) is not None:
            return float(self.budget)
        ms = self.target.get("latency_ms")
        if ms is not None and _finite(self.original_ms):
            return ms / float(self.original_ms)  # type: ignore[arg-type]
        return None

    def budget_text(self) -> str:
        """The budget the way it was asked, e.g. ``"latency ≤ 12.0 ms (≤ 60 % of the original
        latency)"``."""
        fraction = self.budget_fraction
        of_original = "" if fraction is None else f"≤ {_pct(fraction)} of the original latency"
        if "speedup" in self.target:
            text = f"{self.target['speedup']:g}× speed-up"
            return f"{text} ({of_original})" if of_original else text
        if "latency_ms" in self.target:
            text = f"latency ≤ {self.target['latency_ms']:.4g} ms"
            return f"{text} ({of_original})" if of_original else text
        if "params" in self.target:
            return f"≤ {_pct(self.target['params'])} of the parameters"
        if "macs" in self.target:
            return f"≤ {_pct(self.target['macs'])} of the MACs"
        return of_original or "not recorded"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        if _finite(d["budget"]) is None and self.budget_fraction is not None:
            d["budget"] = self.budget_fraction
        return json.loads(json.dumps(d, default=str))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        """A report from :meth:`to_dict` (or a saved ``.report.json``); unknown keys are ignored."""
        return cls(**known_fields(cls, d))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        """A human-readable summary."""

        def ms(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f} ms"

        kinds: dict[str, int] = {}
        for e in self.events:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        changed = [d for d in self.decisions if d.get("key") != "keep"]
        n_keep = len(self.decisions) - len(changed)
        lines = [
            "# fxcompress report",
            "",
            "| | before | after |",
            "|---|---|---|",
            f"| latency ({self.latency_mode}) | {ms(self.original_ms)} | {ms(self.final_ms)} |",
            f"| parameters | {self.params_before:,} | {self.params_after:,} |",
            f"| MACs | {self.macs_before:,} | {self.macs_after:,} |",
            "",
            f"- budget: {self.budget_text()}; predicted {ms(self.predicted_ms)}"
            + ("" if self.ratio is None else f"; measured ratio {self.ratio:.3f}"),
            "- rewrites: " + (", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items())) or "none"),
            f"- segments merged: {len(changed)}",
            f"- parts left as they are: {len(self.kept)}"
            + (f" (and {n_keep} mergeable segments the plan keeps)" if n_keep else ""),
        ]
        if self.max_rel_error is not None:
            lines.append(f"- max relative error of exact steps: {self.max_rel_error:.2e}")
        if self.replans:
            lines.append(f"- re-planned {len(self.replans)}× (measured latency missed the budget)")
        if self.trials:
            kept = next(t for t in self.trials if t["chosen"])
            tried = sum(t["score"] is not None for t in self.trials)
            lines.append(
                f"- plan kept after trial fine-tunes: rank {kept['rank']} of {len(self.trials)} "
                f"({tried} trained)"
            )
        if changed:
            lines += ["", "## Merged segments", "", *_decision_table(changed)]
        if self.replans:
            lines += ["", "## Re-plans", "", *_replan_table(self.replans, self.original_ms)]
        left = _kept_lines(self.kept, [d for d in self.decisions if d.get("key") == "keep"])
        if left:
            lines += ["", "## Parts left as they are", "", *left]
        return "\n".join(lines) + "\n"

    @staticmethod
    def decisions_of(
        gm: fx.GraphModule,
        segments: Iterable[tuple[str, int, int, str, Sequence[str]]],
        segment_ms: Iterable[tuple[float, float]],
    ) -> list[dict[str, Any]]:
        """The report's decision dicts for a plan's ``segments`` on the graph it was made for.

        Each dict holds ``chain``, ``start``, ``stop``, ``key``, ``pruned`` (node names) and the
        predicted ``ms_kept`` / ``ms_planned``, plus, when ``gm`` has the chain: ``first`` and
        ``last`` (module names of the segment's first and last layer), ``layers`` (how many),
        ``merged`` (the merged layer: ``kind``, ``kernel_size``, ``stride``, ``in_channels``,
        ``out_channels``, ``groups``; ``None`` when the segment is kept or dropped),
        ``activations_removed`` and ``pruned_layers`` (module names).
        """
        from fxcompress.depth.analysis import analyze

        analysis = analyze(gm)
        chains = {c.name: c for c in analysis.chains}
        out = []
        for (c, s, e, k, p), (before, after) in zip(segments, segment_ms):
            d: dict[str, Any] = {
                "chain": c,
                "start": s,
                "stop": e,
                "key": k,
                "pruned": list(p),
                "ms_kept": before,
                "ms_planned": after,
            }
            chain = chains.get(c)
            if chain is not None and 0 <= s < e <= len(chain.items):
                d.update(_describe(gm, chain.items[s:e], k, tuple(p)))
            out.append(d)
        return out


def _describe(
    gm: fx.GraphModule, items: tuple[Any, ...], key: str, pruned: tuple[str, ...]
) -> dict[str, Any]:
    """Names and merged shape of a segment of chain ``items`` (see :meth:`Report.decisions_of`)."""
    from fxcompress.depth.analysis import Residual, geometry
    from fxcompress.depth.segment import DROP

    nodes = {n.name: n for n in gm.graph.nodes}

    def name(node_name: str) -> str:
        node = nodes.get(node_name)
        if node is None:
            return node_name
        if node.op == "call_module":
            return str(node.target)
        return _origin(node)

    def units(item: Any) -> tuple[Any, ...]:
        return item.branch_units if isinstance(item, Residual) else (item,)

    layers = [u.layer for it in items for u in units(it)]
    shortcuts = [it.shortcut.layer for it in items if isinstance(it, Residual) and it.shortcut]
    removed: list[str] = []
    merged: dict[str, Any] | None = None
    if key == DROP:
        layers_gone = layers
        pruned_layers = [name(n) for n in layers_gone]
    else:
        pruned_layers = [name(n) for n in pruned]
        if key != "keep":
            last = len(items) - 1
            for i, it in enumerate(items):
                if isinstance(it, Residual):
                    removed += [u.act for u in it.branch_units if u.act is not None]
                if i < last and it.act is not None:
                    removed.append(it.act)
            geo = geometry(items, frozenset(pruned))
            if geo is not None:
                merged = {
                    "kind": geo.kind,
                    "kernel_size": list(geo.kernel_size),
                    "stride": list(geo.stride),
                    "in_channels": geo.in_channels,
                    "out_channels": geo.out_channels,
                    "groups": geo.groups,
                }
    return {
        "first": name(layers[0]) if layers else None,
        "last": name(layers[-1]) if layers else None,
        "layers": len(layers) + len(shortcuts),
        "merged": merged,
        "activations_removed": [name(n) for n in removed],
        "pruned_layers": pruned_layers,
    }


def _origin(node: fx.Node) -> str:
    """The module a function node came from: an activation module canonicalized into a function
    call is named by its module path; a function called in some module's ``forward`` reads
    ``"relu_3 (in layer1.0)"``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    entry = next(reversed(list(stack.values())))
    path, cls = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, None)
    if isinstance(cls, type) and cls.__module__ == "torch.nn.modules.activation":
        return str(path)
    return f"{node.name} (in {path})" if path else node.name


def _span(d: Mapping[str, Any]) -> str:
    first, last, n = d.get("first"), d.get("last"), d.get("layers")
    if not first:
        return f"items {d.get('start')}–{d.get('stop')}"
    text = first if last in (None, first) else f"{first} … {last}"
    return f"{text} ({n} layers)" if isinstance(n, int) and n > 1 else text


def _merged_text(d: Mapping[str, Any]) -> str:
    from fxcompress.depth.segment import DROP

    key = d.get("key", "")
    if key == DROP:
        return "branch dropped (the block becomes its shortcut)"
    m = d.get("merged")
    if not isinstance(m, Mapping):
        return str(key)
    if m.get("kind") == "linear":
        return f"one linear {m.get('in_channels')}→{m.get('out_channels')}"
    kernel = "×".join(str(k) for k in m.get("kernel_size", ()))
    text = f"one {kernel} conv {m.get('in_channels')}→{m.get('out_channels')}"
    stride = list(m.get("stride", ()))
    if any(s != 1 for s in stride):
        text += f", stride {'×'.join(map(str, stride))}"
    groups = m.get("groups", 1)
    if groups and groups > 1:
        text += ", depthwise" if groups == m.get("in_channels") else f", {groups} groups"
    return text


def _decision_table(decisions: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [
        "| segment | layers | becomes | activations removed | pruned |",
        "|---|---|---|---|---|",
    ]
    for d in decisions:
        removed = d.get("activations_removed")
        pruned = d.get("pruned_layers", d.get("pruned"))
        if d.get("key") == "drop":
            pruned = []
        rows.append(
            f"| {d.get('chain')} {d.get('start')}–{d.get('stop')} | {_span(d)} | "
            f"{_merged_text(d)} | {_names(removed) if removed else '—'} | "
            f"{_names(pruned) if pruned else '—'} |"
        )
    return rows


def _replan_table(replans: Sequence[Mapping[str, Any]], original_ms: float | None) -> list[str]:
    """One row per attempt that missed the budget: what it measured, and what was tried next."""

    def num(v: Any, fmt: str) -> str:
        x = _finite(v)
        return "n/a" if x is None else format(x, fmt)

    rows = [
        "| attempt | measured ratio | goal | re-planned for | predicted | direction | how chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(replans, start=1):
        target = _finite(r.get("new_budget_ms"))
        if target is None:
            next_target = "n/a"
        elif _finite(original_ms):
            next_target = f"{target:.3f} ms ({target / float(original_ms):.3f})"  # type: ignore[arg-type]
        else:
            next_target = f"{target:.3f} ms"
        predicted = r.get("new_predicted_ms", r.get("predicted_ms"))
        how = str(r.get("how", "n/a"))
        repeats = r.get("repeats")
        if isinstance(repeats, int) and repeats:
            how += f" (after {repeats} budget{'s' if repeats > 1 else ''} giving measured plans)"
        rows.append(
            f"| {i} | {num(r.get('measured_ratio'), '.3f')} | {num(r.get('goal_ratio'), '.3f')} "
            f"| {next_target} | {num(predicted, '.3f') + ' ms' if _finite(predicted) else 'n/a'} "
            f"| {r.get('direction', 'n/a')} | {how} |"
        )
    return rows


def _kept_lines(kept: Sequence[Sequence[str]], plan_kept: Sequence[Mapping[str, Any]]) -> list[str]:
    """The parts left as they are, grouped by why."""
    by_reason: dict[str, list[str]] = {}
    for entry in kept:
        if len(entry) >= 2:
            by_reason.setdefault(str(entry[1]), []).append(str(entry[0]))
    lines = [
        f"- {reason} ({len(names)}): {_names(names)}"
        + (f" — {_WHY_KEPT[reason]}" if reason in _WHY_KEPT else "")
        for reason, names in by_reason.items()
    ]
    if plan_kept:
        spans = [f"{d.get('chain')} {d.get('start')}–{d.get('stop')} {_span(d)}" for d in plan_kept]
        lines.append(
            f"- kept by the plan ({len(plan_kept)}): {_names(spans)} — mergeable, but the "
            "least-damage plan within the budget leaves them as they are"
        )
    return lines


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates of the conv and linear layers of ``gm`` (from recorded shapes)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, Hooked):  # a hooked layer still computes: count the layer inside
            mod = mod.module
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is None:
            continue
        if isinstance(mod, nn.modules.conv._ConvNd):
            per = mod.weight.shape[1] * math.prod(mod.kernel_size)
            total += math.prod(shape) * per  # batched (N, C, *spatial) or unbatched (C, *spatial)
        elif isinstance(mod, nn.Linear):
            total += math.prod(shape[:-1]) * mod.in_features * mod.out_features
    return int(total)
