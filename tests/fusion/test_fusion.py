"""Layer Fusion: block detection, alignment, similarity, share/drop rewrites, schedule, errors."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from fxcompress.errors import InfeasibleBudget, InvalidArgument
from fxcompress.fusion import find_blocks, fuse
from fxcompress.fusion.align import align_block, linear_sum_assignment
from fxcompress.fusion.similarity import linear_cka, weight_cosine
from fxcompress.graph.capture import capture
from fxcompress.testing import assert_equivalent

FEW = settings(max_examples=12)

# --------------------------------------------------------------------------- test models


class ResMLP(nn.Module):
    """``x + fc_last(act(... act(fc_1(x))))`` with ``len(hidden)`` hidden spaces."""

    def __init__(self, d: int, hidden: tuple[int, ...], norm: bool = False) -> None:
        super().__init__()
        dims = (d, *hidden, d)
        self.norm = nn.LayerNorm(d) if norm else nn.Identity()
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        for i, fc in enumerate(self.fcs):
            h = fc(h)
            if i + 1 < len(self.fcs):
                h = torch.relu(h)
        return x + h


class ResConv(nn.Module):
    """A basic block: conv-BN-ReLU-conv-BN, identity skip, ReLU."""

    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], d_in: int, d: int, conv: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(d_in, d, 1) if conv else nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(d, 3, 1) if conv else nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _randomise_bn(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _permuted_copy(block: nn.Module, g: torch.Generator) -> nn.Module:
    """The same function with every hidden space's units shuffled (an independent reference)."""
    new = copy.deepcopy(block)
    with torch.no_grad():
        if isinstance(new, ResMLP):
            for a, b in itertools.pairwise(new.fcs):
                perm = torch.randperm(a.out_features, generator=g)
                a.weight.copy_(a.weight[perm])
                a.bias.copy_(a.bias[perm])
                b.weight.copy_(b.weight[:, perm])
        else:
            perm = torch.randperm(new.conv1.out_channels, generator=g)
            new.conv1.weight.copy_(new.conv1.weight[perm])
            for t in (new.bn1.weight, new.bn1.bias, new.bn1.running_mean, new.bn1.running_var):
                t.copy_(t[perm])
            new.conv2.weight.copy_(new.conv2.weight[:, perm])
    return new


@st.composite
def stacks(draw, *, copies: bool = False):
    """``(model, x, n_blocks, block_params)``: a stem, ``n`` same-role blocks and a head.

    With ``copies`` every block is a hidden-unit permutation of the first (same function).
    """
    seed = draw(st.integers(0, 2**16))
    n = draw(st.integers(2, 4))
    conv = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if conv:
            d, mid = draw(st.integers(2, 5)), draw(st.integers(2, 6))
            blocks = [ResConv(d, mid) for _ in range(n)]
            x = torch.randn(2, 2, 5, 5, generator=g)
        else:
            d = draw(st.integers(2, 6))
            hidden = tuple(draw(st.lists(st.integers(2, 8), min_size=1, max_size=2)))
            norm = draw(st.booleans())
            blocks = [ResMLP(d, hidden, norm) for _ in range(n)]
            x = torch.randn(3, 2, generator=g)
        for b in blocks:
            _randomise_bn(b, g)
        if copies:
            blocks = [blocks[0]] + [_permuted_copy(blocks[0], g) for _ in blocks[1:]]
        model = Net(blocks, 2, d, conv).eval()
    per_block = sum(p.numel() for p in blocks[0].parameters())
    return model, x, n, per_block


def _unique_by_identity(module: nn.Module) -> int:
    """Unique parameter count by object identity (independent of ``parameters()``' dedup)."""
    seen: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        seen[id(p)] = p.numel()
    return sum(seen.values())


# --------------------------------------------------------------------------- assignment


@given(st.integers(1, 6), st.integers(0, 2**16), st.booleans())
@example(3, 0, True)
def test_assignment_is_optimal_against_brute_force(n, seed, integer):
    rng = np.random.default_rng(seed)
    cost = rng.integers(-3, 4, (n, n)).astype(float) if integer else rng.normal(size=(n, n))
    cols, _, _ = linear_sum_assignment(cost)
    assert sorted(cols.tolist()) == list(range(n))
    best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
    assert cost[np.arange(n), cols].sum() == pytest.approx(best, abs=1e-9)


@given(st.integers(1, 60), st.integers(0, 2**16))
def test_assignment_duals_certify_optimality(n, seed):
    cost = np.random.default_rng(seed).normal(size=(n, n)) * 10
    cols, u, v = linear_sum_assignment(cost)
    slack = cost - u[:, None] - v[None, :]
    assert slack.min() >= -1e-9  # dual feasible
    assert np.abs(slack[np.arange(n), cols]).max() <= 1e-9  # complementary slackness


def test_assignment_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        linear_sum_assignment(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        linear_sum_assignment(np.array([[np.inf]]))


# --------------------------------------------------------------------------- similarity


@given(st.integers(3, 30), st.integers(1, 6), st.integers(0, 2**16))
def test_cka_matches_feature_space_formula_and_invariances(n, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = torch.randn(n, p + 1, generator=g, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    ref = float((yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
    assert linear_cka(x, y) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    assert linear_cka(x, 2.5 * x @ q - 1.0) == pytest.approx(1.0, abs=1e-9)
    assert 0.0 <= linear_cka(x, y) <= 1.0 + 1e-12


def test_weight_cosine():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([[2.0]])]
    assert weight_cosine(a, [torch.tensor([0.0, 1.0]), torch.tensor([[0.0]])]) == 0.0
    assert weight_cosine(a, [-3 * t for t in a]) == pytest.approx(-1.0)


# --------------------------------------------------------------------------- block detection


@FEW
@given(stacks())
def test_blocks_of_a_stack_share_one_role(case):
    model, x, n, per_block = case
    found = find_blocks(capture(model, x))
    assert [b.name for b in found.blocks] == [f"blocks.{i}" for i in range(n)]
    assert len({b.signature for b in found.blocks}) == 1
    assert all(b.params == per_block and b.private and b.same_shape for b in found.blocks)


def test_different_widths_are_different_roles():
    model = Net([ResMLP(4, (8,)), ResMLP(4, (6,)), ResMLP(4, (8,))], 2, 4)
    found = find_blocks(capture(model, torch.randn(2, 2)))
    sigs = [b.signature for b in found.blocks]
    assert sigs[0] == sigs[2] != sigs[1]
    assert list(found.groups()) == [sigs[0]]


def test_resnet18_stages_and_projection_blocks():
    gm = capture(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    found = find_blocks(gm)
    assert [b.name for b in found.blocks] == [f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in (0, 1)]
    groups = found.groups()
    assert [[b.name for b in g] for g in groups.values()] == [["layer1.0", "layer1.1"]]
    assert [b.same_shape for b in found.blocks] == [True, True] + [False, True] * 3


def test_vit_blocks_pair_attention_and_mlp_regions():
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(16, 8, 3, 2, 16, 32, num_classes=4)
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head
    found = find_blocks(capture(vit, torch.randn(1, 3, 16, 16)))
    names = [f"encoder.layers.encoder_layer_{i}" for i in range(3)]
    assert [b.name for b in found.blocks] == names
    assert len({b.signature for b in found.blocks}) == 1
    assert all(b.slots[-1].endswith("mlp.3") for b in found.blocks)  # both halves in each
    total = sum(p.numel() for p in vit.parameters())
    per_block = found.blocks[0].params
    fused = fuse(vit, (total - 2 * per_block) / total, example_inputs=torch.randn(1, 3, 16, 16))
    assert sum(p.numel() for p in fused.parameters()) == total - 2 * per_block
    x = torch.randn(2, 3, 16, 16)
    assert fused(x).abs().max() > 0
    assert_equivalent(torch.export.export(fused, (x,)).module(), fused, x)


# --------------------------------------------------------------------------- alignment


@FEW
@given(stacks(copies=True))
def test_alignment_recovers_a_permuted_copy(case):
    model, x, n, _ = case
    gm = capture(model, x)
    blocks = find_blocks(gm).blocks
    for b in blocks[1:]:
        align_block(gm, blocks[0], b)
    assert_equivalent(gm, model, x)  # permuting hidden units preserves the function
    first = dict(gm.blocks.get_submodule("0").state_dict())
    for i in range(1, n):
        other = gm.blocks.get_submodule(str(i)).state_dict()
        for k, v in first.items():
            torch.testing.assert_close(other[k], v, rtol=0, atol=0)


@FEW
@given(stacks())
def test_alignment_alone_preserves_the_function(case):
    model, x, _, _ = case
    fused = fuse(model, 1.0, example_inputs=x)  # budget 1: only the alignment runs
    assert fused.meta["fxcompress.fusion"].fusions == ()
    assert_equivalent(fused, model, x)


# --------------------------------------------------------------------------- share mode


@FEW
@given(stacks(), st.floats(0.05, 1.0), st.sampled_from(["weight", "cka"]))
def test_share_counts_unique_parameters_and_exports(case, budget, similarity):
    model, x, n, per_block = case
    before = copy.deepcopy(model.state_dict())
    total = sum(p.numel() for p in model.parameters())
    floor = total - (n - 1) * per_block
    if budget * total < floor:
        with pytest.raises(InfeasibleBudget) as info:
            fuse(model, budget, example_inputs=x, similarity="weight")
        assert info.value.minimum == pytest.approx(floor / total)
        return
    fused = fuse(model, budget, mode="share", data=[x], similarity=similarity)
    report = fused.meta["fxcompress.fusion"]
    assert report.params_after == sum(p.numel() for p in fused.parameters())
    assert report.params_after == _unique_by_identity(fused)
    assert report.params_after <= budget * total
    assert report.params_before - report.params_after == sum(f.saved for f in report.fusions)
    fused.graph.lint()
    assert report.blocks_after == report.blocks_before == n
    exported = torch.export.export(fused, (x,))
    assert_equivalent(exported.module(), fused, x)
    for k, v in model.state_dict().items():  # the caller's model is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not model.training


@FEW
@given(stacks(copies=True))
def test_share_of_permuted_copies_is_exact(case):
    model, x, n, per_block = case
    total = sum(p.numel() for p in model.parameters())
    fused = fuse(model, (total - (n - 1) * per_block) / total, example_inputs=x)
    assert_equivalent(fused, model, x)
    calls = [node.target for node in fused.graph.nodes if node.op == "call_module"]
    assert len(set(calls)) < len(calls)  # modules are really called at several places


def test_share_keeps_tied_weights_tied_through_training():
    model = Net([ResMLP(4, (8,)) for _ in range(3)], 2, 4)
    x = torch.randn(5, 2)
    total = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    fused = fuse(model, (total - 2 * per_block) / total, example_inputs=x)  # as far as it goes
    n = fused.meta["fxcompress.fusion"].params_after
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused(x).square().sum().backward()
    opt.step()
    assert sum(p.numel() for p in fused.parameters()) == n
    targets = {node.target for node in fused.graph.nodes if node.op == "call_module"}
    assert "blocks.1.fcs.0" not in targets
    assert "blocks.0.fcs.0" in targets
    assert fused.get_submodule("blocks.0.fcs.0").weight.grad is not None


# --------------------------------------------------------------------------- drop mode


@FEW
@given(stacks(copies=True))
def test_drop_of_permuted_copies_equals_running_one_block(case):
    model, x, n, per_block = case
    total = sum(p.numel() for p in model.parameters())
    fused = fuse(model, (total - (n - 1) * per_block) / total, mode="drop", example_inputs=x)
    report = fused.meta["fxcompress.fusion"]
    assert report.blocks_after == 1
    assert report.params_after == sum(p.numel() for p in fused.parameters())
    reference = nn.Sequential(model.stem, model.blocks[0], model.head).eval()
    assert_equivalent(fused, reference, x)
    torch.export.export(fused, (x,))


@FEW
@given(stacks(), st.floats(0.3, 0.99))
def test_drop_removes_whole_blocks(case, budget):
    model, x, n, per_block = case
    total = sum(p.numel() for p in model.parameters())
    if budget * total < total - (n - 1) * per_block:
        return
    fused = fuse(model, budget, mode="drop", example_inputs=x)
    report = fused.meta["fxcompress.fusion"]
    dropped = -(-(total - budget * total) // per_block)  # blocks needed to meet the budget
    assert report.blocks_after == n - dropped
    assert report.params_after == total - dropped * per_block
    assert report.params_after == sum(p.numel() for p in fused.parameters())
    n_layers = sum(1 for node in fused.graph.nodes if node.op == "call_module")
    assert n_layers < sum(1 for _ in fx.symbolic_trace(model).graph.nodes)
    torch.export.export(fused, (x,))


def test_drop_on_resnet18_removes_one_stage_one_block():
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    total = sum(p.numel() for p in model.parameters())
    fused = fuse(model, 0.999, mode="drop", example_inputs=x)
    report = fused.meta["fxcompress.fusion"]
    assert report.fusions[0].members == ("layer1.0", "layer1.1")
    assert report.params_after == total - sum(p.numel() for p in model.layer1[1].parameters())
    assert fused(x).shape == (1, 1000)


# --------------------------------------------------------------------------- schedule, guards


def test_iterative_schedule_calls_retrain_after_each_step():
    model = Net([ResMLP(4, (8,)) for _ in range(4)], 2, 4)
    x = torch.randn(5, 2)
    seen: list[int] = []

    def retrain(gm: fx.GraphModule) -> None:
        seen.append(sum(p.numel() for p in gm.parameters()))
        gm.train()

    fused = fuse(model, 0.4, mode="share", example_inputs=x, steps=3, retrain=retrain)
    total = sum(p.numel() for p in model.parameters())
    assert len(seen) == 3
    assert seen == sorted(seen, reverse=True)
    assert seen[0] < total
    for k, n in enumerate(seen, 1):
        assert n <= total * (1 - 0.6 * k / 3)
    assert not fused.training
    assert seen[-1] == fused.meta["fxcompress.fusion"].params_after


class _SharedOutside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResMLP(4, (8,)) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self.blocks[2].fcs
        y = self.blocks(x)
        return y + last[1](torch.relu(last[0](y)))  # the last block's layers called again


def test_modules_used_outside_their_block_are_left_alone():
    model = _SharedOutside()
    x = torch.randn(2, 4)
    fused = fuse(model, 0.8, mode="share", example_inputs=x)
    report = fused.meta["fxcompress.fusion"]
    assert dict(report.skipped)["blocks.2.fcs.0"].startswith("also called outside")
    assert all("blocks.2.fcs.0" not in f.slot for f in report.fusions)
    torch.testing.assert_close(
        fused.blocks.get_submodule("2.fcs.0").weight, model.blocks[2].fcs[0].weight
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 0.0}, "budget must be .*a fraction of the unique parameters to keep"),
        ({"budget": 1.5}, "budget must be .*a fraction of the unique parameters to keep"),
        ({"budget": True}, "budget must be .*a fraction of the unique parameters to keep"),
        ({"budget": {"speedup": 2.0}}, "fusion cannot meet"),
        ({"mode": "merge"}, "mode must be one of"),
        ({"similarity": "kl"}, "similarity must be one of"),
        ({"similarity": "cka"}, "needs calibration data"),
        ({"steps": 0}, "steps must be a positive int"),
        ({"retrain": 3}, "retrain must be callable"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    model = Net([ResMLP(4, (8,)) for _ in range(2)], 2, 4)
    args = {"budget": 0.9, "example_inputs": torch.randn(2, 2), **kwargs}
    budget = args.pop("budget")
    with pytest.raises(InvalidArgument, match=match):
        fuse(model, budget, **args)


def test_report_renders():
    model = Net([ResMLP(4, (8,)) for _ in range(3)], 2, 4)
    fused = fuse(model, 0.75, mode="drop", example_inputs=torch.randn(2, 2))
    report = fused.meta["fxcompress.fusion"]
    text = report.to_markdown()
    assert "blocks executed: 3 -> 2" in text
    assert report.to_dict()["ratio"] == pytest.approx(report.params_after / report.params_before)
