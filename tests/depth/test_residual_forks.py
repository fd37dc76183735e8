"""Residual forks at pruned units (issue 15 item 5).

A unit's activation output is the fork of the residual after it: ``h = act(bn(conv_a(x)));
y = branch(h) + shortcut(h)``. When ``conv_a`` is pruned inside a segment, its activation is
dropped (mapped to the BatchNorm), then the BatchNorm is erased with the conv; the residual's
fork must then be read as the segment's entry ``x``, which decides how the relocated padding
aligns the shortcut with the branch. It used to be read as the erased BatchNorm: a lint error
("used before it has been defined") when the shortcut needed a pad, and a skip left unpadded
(or a projection padded too little) otherwise, "size of tensor a (18) must match ... (16)".

References are written here by hand from the definition of relaxation (the pruned unit is the
identity, inner activations are gone, all padding sits on the convs reading the segment's
input), and the original model's output shape.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress import InfeasibleBudget
from fxcompress.depth.analysis import Analysis, Residual, Unit, geometry
from fxcompress.depth.relax import apply_choices, apply_segments
from fxcompress.testing import assert_equivalent

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
ACTS = {
    "none": None,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "hardswish": F.hardswish,
}


def _randomise_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _prepare(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, Analysis]:
    gm = fxcompress.canonicalize(fxcompress.capture(model, x))
    return gm, fxcompress.analyze(gm)


# --------------------------------------------------------------------------- the reported cases


class TanhFork(nn.Module):
    """The issue's model: ``h = silu(bn(conv_a(x))); return tanh(conv_b(h)) + h``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv_b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn(self.conv_a(x)))
        return torch.tanh(self.conv_b(h)) + h


class OneByOneFork(nn.Module):
    """A 1x1 residual branch (with or without a 1x1 projection), then a padded 3x3 conv."""

    def __init__(self, project: bool, c: int = 8) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv_b = nn.Conv2d(c, c, 1)
        self.proj = nn.Conv2d(c, c, 1) if project else None
        self.conv_c = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn(self.conv_a(x)))
        y = self.conv_b(h) + (h if self.proj is None else self.proj(h))
        return self.conv_c(torch.relu(y))


def _double(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(model).double().eval()


def test_pruned_unit_whose_activation_is_the_fork_relaxes_exactly() -> None:
    model = _double(TanhFork())
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    gm, analysis = _prepare(model, x)
    assert [type(it).__name__ for it in analysis.chain("chain0").items] == ["Unit", "Residual"]
    relaxed = apply_segments(gm, analysis, [("chain0", 0, 2, ("conv_a",))])  # used to fail lint
    # conv_a and its BatchNorm are the identity, silu and tanh (inside the segment) are gone:
    # the fork is x itself
    with torch.no_grad():
        expected = model.conv_b(x) + x
    assert_equivalent(relaxed, lambda t: expected, x, rtol=1e-12)
    assert_equivalent(fxcompress.merge(relaxed), relaxed, x, rtol=1e-9)


@pytest.mark.parametrize("project", [False, True], ids=["identity", "projection"])
def test_one_by_one_branch_before_a_padded_conv_aligns_the_shortcut(project: bool) -> None:
    model = _double(OneByOneFork(project))
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    gm, analysis = _prepare(model, x)
    relaxed = apply_segments(gm, analysis, [("chain0", 0, 3, ("conv_a",))])
    # conv_c's padding moves onto the convs reading the segment's input, the branch and the
    # projection alike; an identity shortcut is zero-padded by the same amount
    with torch.no_grad():
        branch = F.conv2d(x, model.conv_b.weight, model.conv_b.bias, padding=1)
        if project:
            skip = F.conv2d(x, model.proj.weight, model.proj.bias, padding=1)
        else:
            skip = F.pad(x, (1, 1, 1, 1))
        expected = F.conv2d(branch + skip, model.conv_c.weight, model.conv_c.bias)
    assert expected.shape == model(x).shape
    assert_equivalent(relaxed, lambda t: expected, x, rtol=1e-12)
    assert_equivalent(fxcompress.merge(relaxed), relaxed, x, rtol=1e-9)


@pytest.mark.parametrize(
    "make",
    [TanhFork, lambda: OneByOneFork(False), lambda: OneByOneFork(True)],
    ids=["tanh_fork", "one_by_one", "one_by_one_projection"],
)
@pytest.mark.parametrize("methods", [("merge", "prune"), ("merge", "prune", "drop")])
def test_optimize_at_a_residual_fork_returns_the_relaxed_function(make, methods) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(make()).eval()
    with torch.no_grad():  # the least weight: LayerMerge's rule prefers pruning conv_a
        model.conv_a.weight.mul_(0.1)
    x = torch.randn(2, 8, 16, 16)
    for budget in (0.4, 0.5, 0.7, 0.9):
        assert _assert_optimize_runs(model, x, budget, methods) is not None


# --------------------------------------------------------------------------- property test


class ForkNet(nn.Module):
    """``[pre] -> conv_a [-> bn] [-> act] = h``; ``y = branch(h) [act] + (h | proj(h))``;
    ``[act] [-> tail]``. ``conv_a`` keeps the shape, so it can be pruned."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        c, k = spec["c"], spec["k_a"]
        self.spec = spec
        self.pre = nn.Conv2d(spec["c_in"], c, 1) if spec["pre"] else None
        self.conv_a = nn.Conv2d(c, c, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(c) if spec["bn"] else None
        self.branch = nn.Sequential(
            *(nn.Conv2d(c, c, kb, padding=kb // 2) for kb in spec["branch"])
        )
        k_p = spec["proj"]
        self.proj = None if k_p is None else nn.Conv2d(c, c, k_p, padding=k_p // 2)
        tail = spec["tail"]
        self.tail = None if tail is None else nn.Conv2d(c, c, tail[0], padding=tail[1])

    @staticmethod
    def _act(name: str, t: torch.Tensor) -> torch.Tensor:
        f = ACTS[name]
        return t if f is None else f(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = torch.relu(self.pre(x))
        h = self.conv_a(x)
        if self.bn is not None:
            h = self.bn(h)
        h = self._act(self.spec["act_a"], h)
        y = self._act(self.spec["act_branch"], self.branch(h))
        y = self._act(self.spec["act_add"], y + (h if self.proj is None else self.proj(h)))
        return y if self.tail is None else self.tail(y)


@st.composite
def fork_specs(draw: st.DrawFn) -> dict:
    acts = st.sampled_from(sorted(ACTS))
    k_tail = draw(st.sampled_from([1, 3]))
    return {
        "c": draw(st.integers(1, 4)),
        "c_in": draw(st.integers(1, 4)),
        "pre": draw(st.booleans()),
        "k_a": draw(st.sampled_from([1, 3])),
        "bn": draw(st.booleans()),
        "act_a": draw(acts),
        "branch": draw(st.lists(st.sampled_from([1, 3]), min_size=1, max_size=2)),
        "act_branch": draw(acts),
        "proj": draw(st.sampled_from([None, 1, 3])),
        "act_add": draw(acts),
        "tail": draw(st.none() | st.tuples(st.just(k_tail), st.integers(0, k_tail // 2 + 1))),
        "size": (draw(st.integers(5, 9)), draw(st.integers(5, 9))),
        "seed": draw(st.integers(0, 2**16)),
    }


def _build(spec: dict) -> tuple[nn.Module, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])
        model = _randomise_bn(ForkNet(spec)).double().eval()
        c_in = spec["c_in"] if spec["pre"] else spec["c"]
        x = torch.randn(1, c_in, *spec["size"], dtype=torch.float64)
    return model, x


def _choices(analysis: Analysis, drop: bool) -> list[tuple]:
    """Every choice a plan may hold, each segment with every prune set that leaves a layer.

    (The planner offers, per merged geometry, only the prune set keeping the most weight; which
    one that is depends on the weights, so all of them are tried here.)
    """
    out = []
    for chain in analysis.chains:
        items = chain.items
        for start, item in enumerate(items):
            out.append((chain.name, start, start + 1, "keep", ()))
            if drop and isinstance(item, Residual):
                out.append((chain.name, start, start + 1, "drop", ()))
        for start, stop in itertools.combinations(range(len(items) + 1), 2):
            span = items[start:stop]
            if stop - start == 1 and isinstance(span[0], Unit):
                continue  # a lone unit merged is the unit itself
            prunable = [u.layer for it in span for u in _path(it) if u.prunable]
            for r in range(len(prunable) + 1):
                for pruned in itertools.combinations(prunable, r):
                    if geometry(span, frozenset(pruned)) is not None:
                        out.append((chain.name, start, stop, "merge", pruned))
    return out


def _path(item) -> tuple[Unit, ...]:
    return (item,) if isinstance(item, Unit) else item.branch_units


def _plans(analysis: Analysis, chain: str, choices: list[tuple]) -> Iterator[list[tuple]]:
    """Every plan of ``chain`` (with the sub-chains of its kept residuals), by brute force."""
    by_start: dict[int, list[tuple]] = {}
    for choice in choices:
        if choice[0] == chain:
            by_start.setdefault(choice[1], []).append(choice)
    items = analysis.chain(chain).items

    def from_position(k: int) -> Iterator[list[tuple]]:
        if k == len(items):
            yield []
            return
        for choice in by_start.get(k, []):
            subs: list[list[tuple]] = [[]]
            if choice[3] == "keep" and isinstance(items[k], Residual):
                subs = list(_plans(analysis, f"{items[k].add}.branch", choices))
            for sub in subs:
                for rest in from_position(choice[2]):
                    yield [choice, *sub, *rest]

    yield from from_position(0)


ISSUE_SPEC = {  # the issue's 1x1 branch with a projection and a padded conv after it
    "c": 2, "c_in": 2, "pre": False, "k_a": 3, "bn": True, "act_a": "silu", "branch": [1],
    "act_branch": "none", "proj": 1, "act_add": "relu", "tail": (3, 1), "size": (6, 6), "seed": 0,
}
BUDGETS = st.sampled_from([0.3, 0.5, 0.7, 0.9])
METHODS = st.sampled_from([("merge", "prune"), ("merge", "prune", "drop")])


@settings(max_examples=2000 if LONG else 25)
@example(ISSUE_SPEC, 0.5, ("merge", "prune"), range(64))
@example({**ISSUE_SPEC, "proj": None}, 0.5, ("merge", "prune"), range(64))
@example(
    {**ISSUE_SPEC, "branch": [3], "act_branch": "tanh", "proj": None, "act_add": "none",
     "tail": None},
    0.5,
    ("merge", "prune"),
    range(64),
)
@given(fork_specs(), BUDGETS, METHODS, st.lists(st.integers(0, 63), min_size=1, max_size=4))
def test_residual_fork_plans_merge_exactly_and_optimize_runs(spec, budget, methods, picks) -> None:
    """Plans (brute force, a drawn few of them) relax and merge exactly; optimize at a budget
    returns its plan's relaxed function, or says the budget is out of reach."""
    model, x = _build(spec)
    gm, analysis = _prepare(model, x)
    choices = _choices(analysis, drop="drop" in methods)
    plans = [p for root in analysis.roots for p in _plans(analysis, root.name, choices)]
    for i in sorted({i % len(plans) for i in picks}):
        relaxed = apply_choices(gm, analysis, plans[i])
        with torch.no_grad():
            assert relaxed(x).shape == model(x).shape, plans[i]
        assert_equivalent(fxcompress.merge(relaxed), relaxed, x, rtol=1e-9)
    _assert_optimize_runs(model, x, budget, methods)


def _assert_optimize_runs(
    model: nn.Module, x: torch.Tensor, budget: float, methods: tuple[str, ...]
) -> fxcompress.Plan | None:
    """``optimize`` returns what ``relax`` makes of its plan (returned), or names the budget
    infeasible (``None``)."""
    minimum = None
    try:
        out = fxcompress.optimize(
            model, budget, example_inputs=x, data=[x], latency="flops", methods=methods,
            progress=False,
        )
    except InfeasibleBudget as exc:
        minimum = exc.minimum
    if minimum is not None:
        assert minimum > budget
        return None
    plan = fxcompress.Plan.from_dict(out.meta["fxcompress.plan"])
    assert_equivalent(out, fxcompress.relax(model, plan, x), x)
    return plan
