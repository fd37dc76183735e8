"""Layer Fusion: fuse the weights of similar repeated blocks (O'Neill et al., 2020).

Repeated residual blocks of the same role are found in the graph (:func:`find_blocks`: same
module types, parameter shapes, tensor shapes and wiring; nothing architecture-specific), their
hidden units are aligned by a permutation (function-preserving), the most similar ones are fused,
and the unique parameter count falls to the budget.

Two modes:

``"share"``
    Ties layers: the layer in slot ``k`` of several same-role blocks becomes one module (the
    average of the aligned originals) called from every block. Unique parameters shrink; the
    graph, its depth and its latency do not change. Pairs are fused most-similar first, per
    slot, until the budget is met (single-linkage clustering of the slots).
``"drop"``
    Replaces runs of adjacent same-role blocks (shape-preserving residual blocks) by one block
    with the averaged aligned weights, applied once: depth, latency and parameters shrink.

Neither is exact: fused networks need retraining (``retrain=``, applied after each of ``steps``
increments, as in the paper's iterative fuse-then-retrain schedule). In ``share`` mode the tied
modules are single ``nn.Parameter`` objects, so an optimiser sees each once and retraining
keeps them tied.

The budget is the fraction of the model's unique parameters to keep
(``sum(p.numel() for p in model.parameters())``, which counts a shared parameter once).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.data import inputs_for
from fxcompress.errors import InfeasibleBudget, InvalidArgument, RewriteError
from fxcompress.fusion.align import align_block
from fxcompress.fusion.blocks import Block, Blocks, attr, find_blocks
from fxcompress.fusion.similarity import linear_cka, record, weight_cosine
from fxcompress.graph.capture import capture, propagate_shapes
from fxcompress.graph.util import finalize
from fxcompress.progress import bar
from fxcompress.report import count_params

__all__ = ["Block", "Blocks", "Fusion", "FusionReport", "find_blocks", "fuse"]

logger = logging.getLogger(__name__)

Mode = Literal["share", "drop"]
_MODES = ("share", "drop")
_SIMILARITIES = ("weight", "cka")


@dataclass(frozen=True)
class Fusion:
    """One fusion: ``members`` (block names) joined at ``slot`` (share) or as whole blocks."""

    mode: str
    role: str  # signature of the blocks' role
    slot: str | None  # qualified name of the kept module (share mode)
    members: tuple[str, ...]
    score: float
    saved: int  # unique parameters saved


@dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse` did (in ``result.meta["fxcompress.fusion"]``)."""

    mode: str
    budget: float
    similarity: str
    steps: int
    params_before: int
    params_after: int
    blocks_before: int
    blocks_after: int
    fusions: tuple[Fusion, ...] = ()
    aligned_units: int = 0
    skipped: tuple[tuple[str, str], ...] = field(default=())

    @property
    def ratio(self) -> float:
        """Unique parameters after / before."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d

    def to_markdown(self) -> str:
        lines = [
            f"# fxcompress fusion report ({self.mode})",
            "",
            f"- unique parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({self.ratio:.3f}; budget {self.budget:g})",
            f"- residual blocks executed: {self.blocks_before} -> {self.blocks_after}",
            f"- similarity: {self.similarity}; steps: {self.steps}; "
            f"hidden units moved by alignment: {self.aligned_units}",
        ]
        if self.fusions:
            lines += ["", "| members | slot | similarity | saved |", "|---|---|---|---|"]
            lines += [
                f"| {' + '.join(f.members)} | {f.slot or '(block)'} | {f.score:.3f} | {f.saved:,} |"
                for f in self.fusions
            ]
        for name, why in self.skipped:
            lines.append(f"- left as is: {name}: {why}")
        return "\n".join(lines) + "\n"


def fuse(
    model: nn.Module,
    budget: float,
    *,
    mode: Mode = "share",
    data: Iterable[Any] | None = None,
    example_inputs: Any = None,
    similarity: str | None = None,
    align: bool = True,
    steps: int = 1,
    retrain: Callable[[fx.GraphModule], None] | None = None,
    calibration_batches: int = 4,
    progress: bool | None = None,
) -> fx.GraphModule:
    """Fuse similar repeated blocks until at most ``budget`` of the unique parameters remain.

    Parameters
    ----------
    model : torch.nn.Module
        The model (not modified).
    budget : float
        Fraction in (0, 1] of the model's unique parameters to keep.
    mode : {"share", "drop"}
        ``"share"`` ties same-role layers (latency unchanged); ``"drop"`` replaces adjacent
        same-role blocks by one (depth and latency shrink).
    data : iterable, optional
        Calibration batches (``inputs`` or ``(inputs, targets)``) for activation similarity.
    example_inputs : Tensor or tuple, optional
        Inputs to trace with (default: the first batch of ``data``).
    similarity : {"weight", "cka"}, optional
        ``"weight"``: cosine of the aligned weights; ``"cka"``: linear CKA of the layers'
        outputs (share) or of the blocks' residual updates ``out - in`` (drop) on ``data``.
        Default: ``"cka"`` when ``data`` is given, else ``"weight"``.
    align : bool
        Permute each block's hidden units to match the first block of its role before
        averaging (function-preserving weight matching; see ``docs/fusion.md``).
    steps : int
        Fuse in this many equal increments of the budget, calling ``retrain`` after each.
    retrain : callable, optional
        ``retrain(graph_module) -> None`` trains the fused model in place (put it in train mode
        yourself); it is called after every step.
    calibration_batches : int
        Batches of ``data`` used for CKA.
    progress : bool, optional
        Show a progress bar over the steps (default: when stderr is a terminal).

    Returns
    -------
    torch.fx.GraphModule
        The fused model in eval mode; ``result.meta["fxcompress.fusion"]`` is a
        :class:`FusionReport` whose ``params_after`` equals
        ``sum(p.numel() for p in result.parameters())``.

    Raises
    ------
    InvalidArgument
        For a bad ``budget``, ``mode``, ``similarity``, ``steps`` or missing inputs.
    InfeasibleBudget
        If fusing every eligible block cannot reach the budget (``minimum`` is the smallest
        reachable fraction).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> class Res(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    ...     def forward(self, x):
    ...         return x + self.fc2(torch.relu(self.fc1(x)))
    >>> model = nn.Sequential(*(Res() for _ in range(4)))
    >>> fused = fuse(model, 0.5, mode="share", example_inputs=torch.randn(2, 8))
    >>> report = fused.meta["fxcompress.fusion"]
    >>> report.params_after == sum(p.numel() for p in fused.parameters()) <= 0.5 * 4 * 280
    True
    >>> dropped = fuse(model, 0.5, mode="drop", example_inputs=torch.randn(2, 8))
    >>> dropped.meta["fxcompress.fusion"].blocks_after
    2
    """
    budget = _check_budget(budget)
    if mode not in _MODES:
        raise InvalidArgument(f"mode must be one of {_MODES}, got mode={mode!r}")
    if similarity is None:
        similarity = "cka" if data is not None else "weight"
    if similarity not in _SIMILARITIES:
        raise InvalidArgument(
            f"similarity must be one of {_SIMILARITIES}, got similarity={similarity!r}"
        )
    if similarity == "cka" and data is None:
        raise InvalidArgument("similarity='cka' needs calibration data: pass data=...")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgument(f"steps must be a positive int, got steps={steps!r}")
    if retrain is not None and not callable(retrain):
        raise InvalidArgument(f"retrain must be callable, got retrain={retrain!r}")

    inputs = inputs_for(example_inputs, data)
    gm = capture(model, inputs)
    before = count_params(gm)
    blocks_before = len(find_blocks(gm).blocks)
    floor = before - _max_saving(gm, mode)
    if budget * before * (1 + 1e-9) < floor:
        raise InfeasibleBudget(
            f"budget {budget:g} of {before:,} unique parameters is out of reach in {mode!r} "
            f"mode: fusing every eligible block keeps {floor:,} ({floor / before:.3f})",
            minimum=floor / before,
        )
    fusions: list[Fusion] = []
    skipped: dict[str, str] = {}
    aligned = 0
    with bar(total=steps, desc=f"fusion ({mode})", enabled=progress) as pbar:
        for step in range(1, steps + 1):
            target = before * (1.0 - (1.0 - budget) * step / steps) * (1 + 1e-9)
            gm, done, moved, skip = _fuse_step(
                gm, target, mode, similarity, align, data, calibration_batches
            )
            fusions += done
            aligned += moved
            skipped.update(skip)
            propagate_shapes(gm, inputs)
            if retrain is not None:
                retrain(gm)
                gm.eval()
            pbar.update()
    after = count_params(gm)
    dropped = sum(len(f.members) - 1 for f in fusions if f.mode == "drop")
    gm.meta[meta.FUSION] = FusionReport(
        mode=mode,
        budget=budget,
        similarity=similarity,
        steps=steps,
        params_before=before,
        params_after=after,
        blocks_before=blocks_before,
        blocks_after=blocks_before - dropped,
        fusions=tuple(fusions),
        aligned_units=aligned,
        skipped=tuple(sorted(skipped.items())),
    )
    return gm


def _check_budget(budget: Any) -> float:
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not (math.isfinite(budget) and 0 < budget <= 1)
    ):
        raise InvalidArgument(
            f"budget must be a fraction in (0, 1] of the unique parameters to keep, got "
            f"budget={budget!r}"
        )
    return float(budget)


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class _Pair:
    role: str
    slot: int | None  # share: slot index; drop: None
    a: Block
    b: Block
    saved: int


def _call_sites(gm: fx.GraphModule) -> dict[str, set[str]]:
    sites: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            sites.setdefault(str(n.target), set()).add(n.name)
    return sites


def _slot_numel(gm: fx.GraphModule, block: Block, k: int) -> int:
    target = block.slots[k]
    if block.slot_kinds[k] == "module":
        return sum(p.numel() for p in gm.get_submodule(target).parameters())
    value = attr(gm, target)
    return value.numel() if isinstance(value, nn.Parameter) else 0


def _pairs(gm: fx.GraphModule, mode: str, skipped: dict[str, str]) -> list[_Pair]:
    """Every pair that may be fused, structure only (no scores)."""
    found = find_blocks(gm)
    pairs: list[_Pair] = []
    sites = _call_sites(gm)
    for role, blocks in found.groups().items():
        if mode == "drop":
            ordered = sorted(blocks, key=lambda b: (b.run, b.position))
            for a, b in itertools.pairwise(ordered):
                if (b.run, b.position) != (a.run, a.position + 1):
                    continue
                if not (a.private and b.private):
                    skipped[b.name] = "parameters used outside the block: not dropped"
                    continue
                if not a.same_shape:
                    skipped[b.name] = "changes the tensor shape: cannot be applied twice"
                    continue
                pairs.append(_Pair(role, None, a, b, b.params))
            continue
        inside = {n for b in blocks for n in b.nodes}
        for k, kind in enumerate(blocks[0].slot_kinds):
            if kind != "module":
                skipped[f"{blocks[0].slots[k]}"] = "share mode ties modules, not get_attr tensors"
                continue
            eligible = []
            for b in blocks:
                if sites[b.slots[k]] <= inside:
                    eligible.append(b)
                else:
                    skipped[b.slots[k]] = "also called outside its role's blocks: not shared"
            numel = _slot_numel(gm, blocks[0], k)
            if numel == 0:
                continue
            for i, a in enumerate(eligible):
                for b in eligible[i + 1 :]:
                    pairs.append(_Pair(role, k, a, b, numel))
    return pairs


def _max_saving(gm: fx.GraphModule, mode: str) -> int:
    pairs = _pairs(gm, mode, {})
    parent: dict[Any, Any] = {}
    total = 0
    for p in pairs:
        ka, kb = _key(p, p.a, gm), _key(p, p.b, gm)
        if _union(parent, ka, kb):
            total += p.saved
    return total


def _key(pair: _Pair, block: Block, gm: fx.GraphModule) -> Any:
    """Union-find key: in share mode the module (blocks already sharing it are one cluster)."""
    if pair.slot is None:
        return ("block", block.name)
    return ("module", block.slots[pair.slot])


def _find(parent: dict[Any, Any], x: Any) -> Any:
    parent.setdefault(x, x)
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def _union(parent: dict[Any, Any], a: Any, b: Any) -> bool:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra == rb:
        return False
    parent[rb] = ra
    return True


# --------------------------------------------------------------------------- one step


def _fuse_step(
    gm: fx.GraphModule,
    target: float,
    mode: str,
    similarity: str,
    align: bool,
    data: Iterable[Any] | None,
    calibration_batches: int,
) -> tuple[fx.GraphModule, list[Fusion], int, dict[str, str]]:
    skipped: dict[str, str] = {}
    moved = 0
    if align:
        for blocks in find_blocks(gm).groups().values():
            for b in blocks[1:]:
                if b.private:
                    moved += align_block(gm, blocks[0], b)
    pairs = _pairs(gm, mode, skipped)
    scores = _scores(gm, pairs, mode, similarity, data, calibration_batches)
    order = sorted(range(len(pairs)), key=lambda i: (-scores[i], i))
    parent: dict[Any, Any] = {}
    current = count_params(gm)
    chosen: list[tuple[_Pair, float]] = []

    def take(i: int) -> None:
        nonlocal current
        p = pairs[i]
        if _union(parent, _key(p, p.a, gm), _key(p, p.b, gm)):
            chosen.append((p, scores[i]))
            current -= p.saved

    # most similar first, skipping fusions that would undershoot the budget ...
    for i in order:
        if current <= target:
            break
        p = pairs[i]
        if current - p.saved >= target and _find(parent, _key(p, p.a, gm)) != _find(
            parent, _key(p, p.b, gm)
        ):
            take(i)
    # ... then, if still above it, the smallest fusion that reaches it (else the most similar)
    while current > target:
        live = [
            i
            for i in order
            if _find(parent, _key(pairs[i], pairs[i].a, gm))
            != _find(parent, _key(pairs[i], pairs[i].b, gm))
        ]
        if not live:
            break
        reaching = [i for i in live if current - pairs[i].saved <= target]
        take(min(reaching, key=lambda i: pairs[i].saved) if reaching else live[0])
    if not chosen:
        return gm, [], moved, skipped
    expected = current
    fusions = (_share if mode == "share" else _drop)(gm, chosen, parent)
    finalize(gm)
    if count_params(gm) != expected:
        raise RewriteError(
            f"fusion left {count_params(gm):,} unique parameters, expected {expected:,}"
        )
    logger.info("fusion step: %d fusions, %d unique parameters", len(fusions), expected)
    return gm, fusions, moved, skipped


def _scores(
    gm: fx.GraphModule,
    pairs: list[_Pair],
    mode: str,
    similarity: str,
    data: Iterable[Any] | None,
    calibration_batches: int,
) -> list[float]:
    if similarity == "weight":
        return [weight_cosine(_tensors(gm, p.a, p.slot), _tensors(gm, p.b, p.slot)) for p in pairs]
    assert data is not None
    nodes = {n.name: n for n in gm.graph.nodes}
    if mode == "drop":
        names = {x for p in pairs for b in (p.a, p.b) for x in (b.input, b.output)}
    else:
        names = {_slot_node(p.a, p.slot, nodes) for p in pairs}
        names |= {_slot_node(p.b, p.slot, nodes) for p in pairs}
    acts = record(gm, names, data, batches=calibration_batches)
    out = []
    for p in pairs:
        if mode == "drop":
            da = acts[p.a.output] - acts[p.a.input]
            db = acts[p.b.output] - acts[p.b.input]
        else:
            da = acts.get(_slot_node(p.a, p.slot, nodes))
            db = acts.get(_slot_node(p.b, p.slot, nodes))
            if da is None or db is None:  # not a tensor output: fall back to the weights
                out.append(weight_cosine(_tensors(gm, p.a, p.slot), _tensors(gm, p.b, p.slot)))
                continue
        out.append(linear_cka(da, db))
    return out


def _slot_node(block: Block, slot: int | None, nodes: dict[str, fx.Node]) -> str:
    assert slot is not None
    target = block.slots[slot]
    return next(
        n for n in block.nodes if str(nodes[n].target) == target and nodes[n].op == "call_module"
    )


def _tensors(gm: fx.GraphModule, block: Block, slot: int | None) -> list[torch.Tensor]:
    ks = range(len(block.slots)) if slot is None else [slot]
    out: list[torch.Tensor] = []
    for k in ks:
        if block.slot_kinds[k] == "module":
            out += list(gm.get_submodule(block.slots[k]).parameters())
        else:
            value = attr(gm, block.slots[k])
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out


def _averaged(values: list[torch.Tensor]) -> torch.Tensor:
    if not values[0].is_floating_point():
        return values[0].clone()  # e.g. BatchNorm's num_batches_tracked: keep the first
    mean = torch.stack([v.detach().double() for v in values]).mean(0)
    return mean.to(values[0].dtype)


def _average_into(modules: list[nn.Module], keep: nn.Module) -> None:
    """Write the element-wise mean of ``modules``' parameters and buffers into ``keep``."""
    with torch.no_grad():
        for name, t in list(keep.named_parameters()) + list(keep.named_buffers()):
            values = [
                m.get_parameter(name) if isinstance(t, nn.Parameter) else m.get_buffer(name)
                for m in modules
            ]
            t.copy_(_averaged(values))


def _share(
    gm: fx.GraphModule, chosen: list[tuple[_Pair, float]], parent: dict[Any, Any]
) -> list[Fusion]:
    """Tie every module of each cluster to its first-called member (weights: the mean)."""
    targets: dict[Any, set[str]] = {}
    for p, _ in chosen:
        for b in (p.a, p.b):
            key = _key(p, b, gm)
            targets.setdefault(_find(parent, key), set()).add(key[1])
    kept_of: dict[Any, str] = {}
    for root, names in targets.items():
        sites = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in names]
        keep = str(sites[0].target)
        kept_of[root] = keep
        # one entry per call site: a module already shared by several blocks weighs more
        _average_into([gm.get_submodule(str(n.target)) for n in sites], gm.get_submodule(keep))
        for n in sites:
            n.target = keep
    return [
        Fusion(
            "share",
            p.role,
            kept_of[_find(parent, _key(p, p.a, gm))],
            (p.a.name, p.b.name),
            score,
            p.saved,
        )
        for p, score in chosen
    ]


def _drop(
    gm: fx.GraphModule, chosen: list[tuple[_Pair, float]], parent: dict[Any, Any]
) -> list[Fusion]:
    nodes = {n.name: n for n in gm.graph.nodes}
    clusters: dict[Any, dict[str, Block]] = {}
    for p, _ in chosen:
        for b in (p.a, p.b):
            clusters.setdefault(_find(parent, _key(p, b, gm)), {})[b.name] = b
    fusions = []
    doomed: list[fx.Node] = []
    attrs: set[str] = set()
    for members in clusters.values():
        run = sorted(members.values(), key=lambda b: b.position)
        keep = run[0]
        for k, kind in enumerate(keep.slot_kinds):
            if kind == "module":
                _average_into(
                    [gm.get_submodule(b.slots[k]) for b in run], gm.get_submodule(keep.slots[k])
                )
            else:
                value = attr(gm, keep.slots[k])
                with torch.no_grad():
                    value.copy_(_averaged([attr(gm, b.slots[k]) for b in run]))
                attrs.update(b.slots[k] for b in run[1:])
        nodes[run[-1].output].replace_all_uses_with(nodes[keep.output])
        doomed += [nodes[n] for b in run[1:] for n in b.nodes]
        score = min(s for p, s in chosen if p.a.name in members and p.b.name in members)
        fusions.append(
            Fusion(
                "drop",
                keep.signature,
                None,
                tuple(b.name for b in run),
                score,
                sum(b.params for b in run[1:]),
            )
        )
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(set(doomed), key=index.__getitem__, reverse=True):
        gm.graph.erase_node(n)
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for t in attrs - used:
        owner, _, name = t.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, name)
    return fusions
