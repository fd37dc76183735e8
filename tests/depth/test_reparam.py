"""Structural re-parameterisation (issue 15, item 9): sums of parallel linear branches.

A sum whose summands each apply a linear map to one tensor ``x`` -- a conv with its BatchNorm, a
BatchNorm alone (a per-channel affine map, i.e. a depthwise 1x1 conv), ``x`` itself -- is one
conv of ``x``. RepVGG, MobileOne and FastViT train such blocks and deploy them as one conv;
``merge`` (and ``optimize`` at budget 1.0) must find that conv whatever the association of the
nested adds torch.fx records (``(a + b) + c`` is two add nodes).

The reference is always the original model run eagerly, in float64, within 1e-9 relative
(:func:`fxcompress.testing.assert_equivalent`); the expected structure (how many convs, their
kernel and groups) follows from the block's definition.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import capture, merge
from fxcompress.testing import assert_equivalent

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
F64 = torch.float64


def random_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.eval()


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, random_bn(c_out))


def convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, CONVS)]


def calls(gm: torch.fx.GraphModule) -> list[str]:
    """What the graph computes, in order: module types and function names."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            out.append(type(gm.get_submodule(str(node.target))).__name__)
        elif node.op in ("call_function", "call_method"):
            out.append(getattr(node.target, "__name__", str(node.target)))
    return out


def assert_one_conv(model: nn.Module, x: torch.Tensor, *, kernel, groups) -> nn.Module:
    """merge gives conv (+ relu): one conv of the expected shape, exact in float64."""
    out = merge(capture(model, x))
    assert_equivalent(out, model, x)
    assert calls(out) in (["Conv2d"], ["Conv2d", "relu"]), calls(out)
    (conv,) = convs(out)
    assert conv.kernel_size == kernel
    assert conv.groups == groups
    return out


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block, ``relu(bn(conv3x3(x)) + bn(conv1x1(x)) [+ bn(x)])``.

    ``order`` is how the sum is written (and so which add nodes torch.fx records).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1, order="left"):
        super().__init__()
        self.order = order
        self.conv3 = conv_bn(c_in, c_out, 3, stride, groups)
        self.conv1 = conv_bn(c_in, c_out, 1, stride, groups)
        self.identity = random_bn(c_in) if c_in == c_out and stride == 1 else None

    def forward(self, x):
        a, b = self.conv3(x), self.conv1(x)
        if self.identity is None:
            return F.relu(a + b)
        c = self.identity(x)
        if self.order == "left":
            y = (a + b) + c
        elif self.order == "right":
            y = a + (b + c)
        elif self.order == "identity first":
            y = c + (b + a)
        elif self.order == "timm":  # identity computed first, then `x = b + a; x += identity`
            y = b + a
            y += c
        else:
            y = torch.add(a, b).add(c)
        return F.relu(y)


@pytest.mark.parametrize("order", ["left", "right", "identity first", "timm", "methods"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_repvgg_block_is_one_conv(order, groups):
    torch.manual_seed(0)
    model = RepVGGBlock(4, 4, groups=groups, order=order).to(F64).eval()
    x = torch.randn(2, 4, 7, 6, dtype=F64)
    out = assert_one_conv(model, x, kernel=(3, 3), groups=groups)
    assert [e["kind"] for e in out.meta["fxcompress.events"]].count("fold_skip") == 1


@pytest.mark.parametrize("stride", [1, 2])
def test_repvgg_block_without_identity_is_one_conv(stride):
    """The downsampling block (stride 2, or other widths) has no identity branch."""
    torch.manual_seed(0)
    model = RepVGGBlock(3, 5, stride=stride).to(F64).eval()
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    assert_one_conv(model, x, kernel=(3, 3), groups=1)


class MobileOneBlock(nn.Module):
    """MobileOne's training-time block (as written in timm): ``k`` parallel kxk conv+BN
    branches, a 1x1 conv+BN ``scale`` branch and a BatchNorm identity, summed with ``+=``."""

    def __init__(self, channels: int, k: int, kernel: int, depthwise: bool):
        super().__init__()
        groups = channels if depthwise else 1
        self.branches = nn.ModuleList(
            [conv_bn(channels, channels, kernel, groups=groups) for _ in range(k)]
        )
        self.scale = conv_bn(channels, channels, 1, groups=groups) if kernel > 1 else None
        self.identity = random_bn(channels)

    def forward(self, x):
        identity_out = self.identity(x)
        scale_out = 0 if self.scale is None else self.scale(x)
        out = scale_out + identity_out
        for branch in self.branches:
            out += branch(x)
        return F.relu(out)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize(("kernel", "depthwise"), [(3, False), (3, True), (1, False)])
def test_mobileone_block_is_one_conv(k, kernel, depthwise):
    torch.manual_seed(0)
    model = MobileOneBlock(4, k, kernel, depthwise).to(F64).eval()
    x = torch.randn(2, 4, 6, 7, dtype=F64)
    assert_one_conv(model, x, kernel=(kernel, kernel), groups=4 if depthwise else 1)


class BatchNormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm subclass that torch.fx traces through, giving a
    rank assertion on its input and an ``F.batch_norm`` call on ``get_attr`` statistics."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.load_state_dict(random_bn(channels).state_dict())
        self.act = nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return self.act(x)


class TimmRepVGGBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.identity = BatchNormAct(channels)
        self.conv_kxk = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                      BatchNormAct(channels))
        self.conv_1x1 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                      BatchNormAct(channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x += identity
        return self.act(x)


def test_functional_batchnorm_with_rank_assertions_folds():
    """timm's blocks trace to F.batch_norm on get_attr statistics, with ``x.ndim == 4``
    assertions on each conv's output; both used to block every fold (repvgg_a0: nothing
    folded). The assertions stay, reading the conv's input (same rank)."""
    torch.manual_seed(0)
    model = nn.Sequential(TimmRepVGGBlock(4), TimmRepVGGBlock(4)).to(F64).eval()
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    out = merge(capture(model, x))
    assert_equivalent(out, model, x)
    assert len(convs(out)) == 2
    assert not any(n.target is F.batch_norm for n in out.graph.nodes)
    assert sum(n.target is torch._assert for n in out.graph.nodes) == 6  # kept, still valid


def test_bn_after_a_folded_sum_folds_too():
    """``bn(conv_a(x) + conv_b(x))``: once the sum is one conv, the BatchNorm follows a conv."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 1)
            self.bn = random_bn(4)

        def forward(self, x):
            return self.bn(self.a(x) + self.b(x))

    model = Net().to(F64).eval()
    assert_one_conv(model, torch.randn(2, 3, 5, 6, dtype=F64), kernel=(3, 3), groups=1)


def test_whole_sum_folds_where_no_pair_is_cheaper():
    """``(dw3x3(x) + dense1x1(x)) + dense3x3(x)``: the first pair alone would be a dense 3x3
    (costlier than the pair), but all three are one dense 3x3, cheaper than the three."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 8, 1)
            self.dense = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return (self.dw(x) + self.pw(x)) + self.dense(x)

    model = Net().to(F64).eval()
    assert_one_conv(model, torch.randn(1, 8, 6, 6, dtype=F64), kernel=(3, 3), groups=1)


def test_depthwise_branches_stay_depthwise_without_the_dense_one():
    """``dw3x3(x) + dw1x1(x) + dense1x1(x)``: all three would be a dense 3x3 (costlier), so
    only the depthwise pair folds (into a depthwise 3x3), beside the dense 1x1."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.dw1 = nn.Conv2d(8, 8, 1, groups=8)
            self.pw = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.dw3(x) + self.pw(x) + self.dw1(x)

    model = Net().to(F64).eval()
    x = torch.randn(1, 8, 6, 6, dtype=F64)
    out = merge(capture(model, x))
    assert_equivalent(out, model, x)
    assert sorted((c.kernel_size, c.groups) for c in convs(out)) == [((1, 1), 1), ((3, 3), 8)]
    assert calls(out).count("add") == 1


class PartialSum(nn.Module):
    """``conv_a(x) + y + conv_c(x)``: the two branches of x fold, y stays a summand."""

    def __init__(self, write_y: bool):
        super().__init__()
        self.write_y = write_y
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(3, 4, 1)
        self.e = nn.Conv2d(2, 4, 1)

    def forward(self, x, z):
        y = self.e(z)
        t = self.a(x) + y
        if self.write_y:  # y is read by the outer sum's re-association later than this write
            y.mul_(2.0)
            return t + self.c(x), y
        return t + self.c(x)


@pytest.mark.parametrize("write_y", [False, True])
def test_partial_sum_folds_the_branches_of_one_tensor(write_y):
    torch.manual_seed(0)
    model = PartialSum(write_y).to(F64).eval()
    x = (torch.randn(2, 3, 5, 5, dtype=F64), torch.randn(2, 2, 5, 5, dtype=F64))
    out = merge(capture(model, x))
    assert_equivalent(out, model, x)
    # folding would re-associate the sum and read y after y.mul_(2.0): left as it is then
    assert len(convs(out)) == (3 if write_y else 2)


def test_sum_of_three_1d_branches_and_unbatched_input():
    """The same fold in one spatial axis, batched and unbatched (channels on axis 0)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(3, 3, 5, padding=2)
            self.b = nn.Conv1d(3, 3, 3, padding=1, groups=3)

        def forward(self, x):
            return self.a(x) + (self.b(x) + x)

    model = Net().to(F64).eval()
    for x in (torch.randn(2, 3, 9, dtype=F64), torch.randn(3, 9, dtype=F64)):
        out = merge(capture(model, x))
        assert_equivalent(out, model, x)
        assert calls(out) == ["Conv1d"]


def test_optimize_at_budget_one_reparameterises_a_repvgg_net():
    """``optimize(m, 1.0)`` deploys a small RepVGG-style net as one conv per block."""
    torch.manual_seed(0)
    model = nn.Sequential(
        RepVGGBlock(3, 8, stride=2),
        RepVGGBlock(8, 8),
        RepVGGBlock(8, 8, order="timm"),
        MobileOneBlock(8, 3, 3, depthwise=True),
        MobileOneBlock(8, 2, 1, depthwise=False),
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    compiled = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
    assert_equivalent(compiled, model, x)
    assert len(convs(compiled)) == 5
    assert not [m for m in compiled.modules() if isinstance(m, BNS)]
    assert not [n for n in compiled.graph.nodes if n.target in (operator.add, operator.iadd)]


@pytest.mark.slow
def test_timm_repvgg_a0_is_one_conv_per_block():
    """timm's repvgg_a0 (random weights) at budget 1.0: 44 convs (22 blocks) become 22."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("repvgg_a0").eval()
    x = torch.randn(1, 3, 224, 224)
    compiled = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
    assert len(convs(model)) == 44
    assert len(convs(compiled)) == 22
    assert_equivalent(compiled, model, x)
