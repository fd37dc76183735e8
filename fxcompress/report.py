"""What an ``optimize`` call did: the plan, the latencies, the per-segment decisions."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import fx, nn

__all__ = ["Report", "count_macs", "count_params"]


@dataclass
class Report:
    """Summary of a compression run (JSON-able through :meth:`to_dict`)."""

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
    #: with ``plan_candidates > 1``: every plan considered (see :class:`fxcompress.selection.Trial`)
    trials: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """Measured final / original latency."""
        if self.original_ms and self.final_ms is not None:
            return self.final_ms / self.original_ms
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return json.loads(json.dumps(d, default=str))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        """A human-readable summary."""

        def ms(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f} ms"

        kinds: dict[str, int] = {}
        for e in self.events:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        lines = [
            "# fxcompress report",
            "",
            "| | before | after |",
            "|---|---|---|",
            f"| latency ({self.latency_mode}) | {ms(self.original_ms)} | {ms(self.final_ms)} |",
            f"| parameters | {self.params_before:,} | {self.params_after:,} |",
            f"| MACs | {self.macs_before:,} | {self.macs_after:,} |",
            "",
            f"- budget: {self.budget:g} of the original latency; predicted {ms(self.predicted_ms)}"
            + ("" if self.ratio is None else f"; measured ratio {self.ratio:.3f}"),
            "- rewrites: " + (", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items())) or "none"),
            f"- segments merged: {sum(1 for d in self.decisions if d.get('key') != 'keep')}",
            f"- parts left as they are: {len(self.kept)}",
        ]
        if self.max_rel_error is not None:
            lines.append(f"- max relative error of exact steps: {self.max_rel_error:.2e}")
        for r in self.replans:
            lines.append(f"- re-planned: {r}")
        if self.trials:
            kept = next(t for t in self.trials if t["chosen"])
            tried = sum(t["score"] is not None for t in self.trials)
            lines.append(
                f"- plan kept after trial fine-tunes: rank {kept['rank']} of {len(self.trials)} "
                f"({tried} trained)"
            )
        merged = [d for d in self.decisions if d.get("key") != "keep"]
        if merged:
            lines += ["", "| chain | items | option |", "|---|---|---|"]
            lines += [f"| {d['chain']} | {d['start']}–{d['stop']} | {d['key']} |" for d in merged]
        return "\n".join(lines) + "\n"


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates of the conv and linear layers of ``gm`` (from recorded shapes)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is None:
            continue
        if isinstance(mod, nn.modules.conv._ConvNd):
            per = mod.weight.shape[1] * math.prod(mod.kernel_size)
            total += shape[0] * shape[1] * math.prod(shape[2:]) * per
        elif isinstance(mod, nn.Linear):
            total += math.prod(shape[:-1]) * mod.in_features * mod.out_features
    return int(total)
