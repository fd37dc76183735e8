"""Compressed models deploy: ``torch.export``, ``torch.compile`` and ONNX (run by onnxruntime).

Each runtime's output is compared with the compressed model run eagerly, and at budget 1.0 (exact
rewrites only) with the original model too.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnxruntime  # the `export` extra
import pytest
import torch
import torchvision
from torch import fx, nn

import fxcompress
from fxcompress.io import load, save
from fxcompress.testing import assert_equivalent
from fxcompress.testing.drawing import randomise_bn as _randomise_bn


class Block(nn.Module):
    """A residual block; with ``stride`` > 1 a projection shortcut (1x1 conv + BN)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride > 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.short(x))


class TinyNet(nn.Module):
    """Stem, residual blocks (one strided), a depthwise-separable block, pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = Block(8, 8, 1)
        self.block2 = Block(8, 16, 2)
        self.dw = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            nn.Conv2d(16, 16, 1),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.block2(self.block1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _randomised(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so a wrong fold would show (under the caller's RNG state)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomise_bn(m)
    return model.eval()


@functools.cache
def _compressed(budget: float) -> tuple[nn.Module, fx.GraphModule, torch.Tensor]:
    """(original, optimize result, input); cached: each budget is optimized once per session."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _randomised(TinyNet())
    x = torch.randn(2, 3, 16, 16, generator=g)
    calib = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    result = fxcompress.optimize(
        model, budget, example_inputs=x, data=calib, latency="flops", progress=False
    )
    if budget < 1:
        assert any(d["key"] != "keep" for d in result.meta["fxcompress"].decisions)
    return model, result, x


BUDGETS = pytest.mark.parametrize("budget", [1.0, 0.5], ids=["exact", "budget0.5"])


def _onnx_run(model: nn.Module, x: torch.Tensor, path) -> np.ndarray:
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _check_exact_at_one(model: nn.Module, result: nn.Module, x: torch.Tensor) -> None:
    if result.meta["fxcompress"].budget == 1.0:
        assert_equivalent(result, model, x)


@BUDGETS
def test_torch_export_matches_eager(budget) -> None:
    model, result, x = _compressed(budget)
    program = torch.export.export(result, (x,))
    assert_equivalent(program.module(), result, x)
    # a fresh input of the same shape, not only the traced one
    assert_equivalent(program.module(), result, torch.randn_like(x))
    _check_exact_at_one(model, result, x)


@BUDGETS
def test_onnxruntime_matches_eager(budget, tmp_path) -> None:
    model, result, x = _compressed(budget)
    got = _onnx_run(result, x, tmp_path / "m.onnx")
    assert_equivalent(lambda _: torch.from_numpy(got), result, x)
    _check_exact_at_one(model, result, x)


@BUDGETS
def test_saved_program_runs_at_any_batch_size(budget, tmp_path) -> None:
    model, result, x = _compressed(budget)
    path = save(result, tmp_path / "m.pt2", x[:1])  # a batch-1 example, as a deployment has
    program = load(path)
    for n in (1, 8):
        xb = torch.randn(n, 3, 16, 16)
        assert_equivalent(program, result, xb)
        if budget == 1.0:
            assert_equivalent(program, model, xb)
    if budget < 1:
        # without example inputs: the shapes recorded in the result, and still any batch
        program = load(save(result, tmp_path / "r.pt2"))
        assert_equivalent(program, result, torch.randn(8, 3, 16, 16))


def test_onnx_export_runs_at_any_batch_size_in_onnxruntime(tmp_path) -> None:
    from fxcompress.io import export_onnx

    # one budget keeps this fast: the compressed model (merged kernels) is the interesting one
    _, result, x = _compressed(0.5)
    path = export_onnx(result, tmp_path / "m.onnx", x[:1])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for n in (1, 8):
        xb = torch.randn(n, 3, 16, 16)
        got = session.run(None, {name: xb.numpy()})[0]
        assert_equivalent(lambda _, got=got: torch.from_numpy(got), result, xb)


class FixedBatch(nn.Module):
    """Concatenates a batch-1 parameter: exportable for a batch of 1 only."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Parameter(torch.randn(1, 2, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.extra], 1).relu()


def test_a_model_that_fixes_its_batch_is_saved_static_with_a_warning(tmp_path, caplog) -> None:
    model = FixedBatch().train()
    x = torch.randn(1, 3, 4, 4)
    before = x.clone()
    with caplog.at_level(logging.WARNING, logger="fxcompress.io"):
        path = save(model, tmp_path / "m.pt2", x)
    assert "could not be exported with a dynamic batch dimension" in caplog.text
    assert "batch size 1 only" in caplog.text
    assert_equivalent(load(path), model, x)
    assert model.training  # the caller's flag is restored
    assert torch.equal(x, before)
    with caplog.at_level(logging.WARNING, logger="fxcompress.io"):
        caplog.clear()
        save(model, tmp_path / "s.pt2", x, dynamic_batch=False)  # asked for: no warning
    assert caplog.text == ""


def test_torch_compile_matches_eager() -> None:
    # one budget keeps this test fast: the compressed model (merged kernels) is the interesting one
    _, result, x = _compressed(0.5)
    torch._dynamo.reset()
    compiled = torch.compile(result)
    assert_equivalent(compiled, result, x)
    assert_equivalent(compiled, result, torch.randn_like(x))
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_compressed_deploys(name, tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomised(torchvision.models.get_model(name, weights=None))
    x = torch.randn(1, 3, 64, 64)
    result = fxcompress.optimize(model, 0.6, example_inputs=x, latency="flops", progress=False)
    assert any(d["key"] != "keep" for d in result.meta["fxcompress"].decisions)
    assert_equivalent(torch.export.export(result, (x,)).module(), result, x)
    got = _onnx_run(result, x, tmp_path / "m.onnx")
    assert_equivalent(lambda _: torch.from_numpy(got), result, x)
    torch._dynamo.reset()
    assert_equivalent(torch.compile(result), result, x)
    torch._dynamo.reset()
