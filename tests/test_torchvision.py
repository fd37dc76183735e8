"""``optimize(model, 1.0)`` on every torchvision classification model (random weights).

For each builder in ``torchvision.models.list_models(module=torchvision.models)``:

- the result of ``optimize(m, 1.0, example_inputs=x, latency="flops")`` computes ``m(x)`` within
  1e-4 relative error (max abs difference / max abs reference);
- the caller's model is unchanged (every state_dict tensor and every ``training`` flag);
- on models with BatchNorm, one ``fold_bn`` event is reported per BatchNorm that directly follows
  a convolution in the traced graph (counted here by walking a ``torch.fx`` trace ourselves).

Tiers: models with more than ~100M parameters, or that take more than ~10 s here, are marked
``slow`` and left out of the default run (``pytest -m "not slow"``); run them with
``pytest -m slow tests/test_torchvision.py`` (``-n 2`` works too: each of the two ~13 GB models
in :data:`HUGE` holds a file lock that keeps every other model of this module waiting).

Models that fail because of a known library bug are listed in :data:`KNOWN_FAILURES` and tested
to still fail (so a fix shows up as a failure to remove them from the list).

``benchmarks/torchvision_coverage.py`` imports :func:`build`, :data:`SLOW` and
:data:`KNOWN_FAILURES` from here, so the benchmark and the tests cover the same configurations.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import fx, nn

import fxcompress

try:
    import fcntl
except ImportError:  # not POSIX: no lock (run the slow tier without -n there)
    fcntl = None  # type: ignore[assignment]

MODELS: tuple[str, ...] = tuple(torchvision.models.list_models(module=torchvision.models))

# Input side length for convolutional models; small to keep the default tier fast.
DEFAULT_SIZE = 64
# Models whose architecture needs a larger input than DEFAULT_SIZE (side length).
MIN_SIZE: dict[str, int] = {
    "inception_v3": 75,  # the stem's valid convolutions need at least 75x75
    "maxvit_t": 224,  # 7x7 partitions at stride 32; the builder fixes partition_size=7
}
# ViTs take image_size as a keyword: use the smallest multiple of the patch size >= 32.
VIT_PATCH: dict[str, int] = {
    "vit_b_16": 16,
    "vit_b_32": 32,
    "vit_l_16": 16,
    "vit_l_32": 32,
    "vit_h_14": 14,
}
VIT_SIZE = 32

# Left out of the default tier: > ~100M parameters or > ~10 s each on a 2-core CPU machine
# (measured with benchmarks/torchvision_coverage.py; see benchmarks/results/coverage.md).
SLOW: frozenset[str] = frozenset(
    {
        # > 100M parameters
        "convnext_large",
        "efficientnet_v2_l",
        "regnet_x_32gf",
        "regnet_y_32gf",
        "regnet_y_128gf",
        "vgg11",
        "vgg11_bn",
        "vgg13",
        "vgg13_bn",
        "vgg16",
        "vgg16_bn",
        "vgg19",
        "vgg19_bn",
        "vit_h_14",
        "vit_l_16",
        "vit_l_32",
        "wide_resnet101_2",
        # the slowest of the rest
        "efficientnet_b7",
    }
)

# ~11-13 GB peak memory each (optimize holds about 3.5 copies of the weights): each runs alone,
# under an exclusive inter-process file lock (see _memory_lock), so that another pytest-xdist
# worker's model does not push the machine (23 GB) out of memory.
HUGE: frozenset[str] = frozenset({"regnet_y_128gf", "vit_h_14"})

# Models that fail because of a library bug: name -> reason. Each is tested to still fail.
KNOWN_FAILURES: dict[str, str] = {}

RTOL = 1e-4


def input_size(name: str, size: int | None = None) -> int:
    """The side length of the square input used for ``name``."""
    if name in VIT_PATCH:
        patch = VIT_PATCH[name]
        want = VIT_SIZE if size is None else size
        return max(1, -(-want // patch)) * patch
    want = DEFAULT_SIZE if size is None else size
    return max(want, MIN_SIZE.get(name, 0))


def build(name: str, size: int | None = None, *, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Random-weight eval-mode model ``name`` and a seeded batch-1 input for it."""
    side = input_size(name, size)
    kwargs: dict[str, object] = {"weights": None}
    if name in VIT_PATCH:
        kwargs["image_size"] = side
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, **kwargs).eval()
    _randomize_batchnorm(model)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def _randomize_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (seeded).

    Freshly built BatchNorms are the identity (mean 0, var 1, weight 1, bias 0): a fold that
    ignored them would go unnoticed.
    """
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(n, generator=gen))


def rel_error(out: object, ref: object) -> float:
    """Max over outputs of ``max |out - ref| / max |ref|`` (in float64)."""
    outs, refs = _flat(out), _flat(ref)
    assert len(outs) == len(refs), (len(outs), len(refs))
    worst = 0.0
    for a, b in zip(outs, refs):
        assert a.shape == b.shape, (a.shape, b.shape)
        diff = float((a.double() - b.double()).abs().max())
        worst = max(worst, diff / max(float(b.double().abs().max()), 1e-12))
    return worst


def _flat(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach()]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    raise TypeError(f"unexpected output type {type(out).__name__}")


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCS = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)


def count_conv_bn(model: nn.Module) -> int:
    """BatchNorm calls (with running statistics) that directly follow a convolution.

    "Directly follow": the BatchNorm's input is the output of a conv that nothing else reads.
    (A conv whose output is also read elsewhere, like maxvit_t's stem conv, which feeds both a
    BatchNorm and a shortcut, cannot take the BatchNorm in without changing what the other
    reader sees.) Computed from our own ``torch.fx.symbolic_trace`` of ``model`` (tracing only
    reads it), independently of fxcompress's pattern matching.
    """
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())

    def is_conv(node: object) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if node.op == "call_module":
            return type(modules[str(node.target)]) in _CONVS
        return node.op == "call_function" and node.target in _CONV_FUNCS

    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[str(node.target)]
        if (
            isinstance(mod, nn.modules.batchnorm._BatchNorm)
            and mod.running_mean is not None
            and node.args
            and is_conv(node.args[0])
            and len(node.args[0].users) == 1
        ):
            count += 1
    return count


def _digest(t: torch.Tensor) -> tuple[object, ...]:
    """Exact fingerprint of a tensor: dtype, shape and a SHA-256 of its bytes.

    Used instead of a clone so that checking the 600M-parameter models does not hold another
    copy of their weights.
    """
    data = t.detach().cpu().contiguous().reshape(-1)
    raw = data.view(torch.uint8) if data.numel() else data
    return (t.dtype, tuple(t.shape), hashlib.sha256(raw.numpy()).hexdigest())


def _snapshot(model: nn.Module) -> tuple[dict[str, tuple[object, ...]], dict[str, bool]]:
    state = {k: _digest(v) for k, v in model.state_dict().items()}
    flags = {k: m.training for k, m in model.named_modules()}
    return state, flags


@contextlib.contextmanager
def _memory_lock(name: str) -> Iterator[None]:
    """Run a model of :data:`HUGE` alone.

    It takes an inter-process file lock exclusively, every other model takes it shared (POSIX
    only; elsewhere run the slow tier without ``-n``).
    """
    if fcntl is None:
        yield
        return
    path = Path(tempfile.gettempdir()) / "fxcompress-test-torchvision.lock"
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if name in HUGE else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_model(name: str, size: int | None = None) -> dict[str, object]:
    """Run optimize on ``name`` and assert everything this module promises; return the facts."""
    with _memory_lock(name):
        return _check_model(name, size)


def _check_model(name: str, size: int | None) -> dict[str, object]:
    model, x = build(name, size)
    state, flags = _snapshot(model)
    with torch.no_grad():
        ref = model(x)
    compiled = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
    with torch.no_grad():
        out = compiled(x)
    err = rel_error(out, ref)
    assert err <= RTOL, f"{name}: max relative error {err:.3g} > {RTOL}"

    # the caller's model is unchanged
    after_state, after_flags = _snapshot(model)
    assert after_flags == flags, f"{name}: training flags changed"
    assert after_state.keys() == state.keys(), f"{name}: state_dict keys changed"
    for k, v in state.items():
        assert after_state[k] == v, f"{name}: state_dict[{k!r}] changed"

    report = compiled.meta["fxcompress"]
    assert isinstance(report, fxcompress.Report)
    kinds: dict[str, int] = {}
    for e in report.events:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    return {"model": model, "compiled": compiled, "report": report, "kinds": kinds, "err": err}


def _param(name: str) -> object:
    marks = []
    if name in SLOW:
        marks.append(pytest.mark.slow)
    return pytest.param(name, marks=marks, id=name)


WORKING = [n for n in MODELS if n not in KNOWN_FAILURES]


@pytest.mark.parametrize("name", [_param(n) for n in WORKING])
def test_optimize_is_exact_and_folds_every_conv_bn(name: str) -> None:
    """Exact, leaves the caller's model alone, and folds each conv->BatchNorm pair."""
    facts = check_model(name)
    model = facts["model"]
    assert isinstance(model, nn.Module)
    kinds = facts["kinds"]
    assert isinstance(kinds, dict)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        expected = count_conv_bn(model)
        assert expected > 0, f"{name}: has BatchNorm but none directly after a conv"
        assert kinds.get("fold_bn", 0) == expected, (
            f"{name}: {kinds.get('fold_bn', 0)} fold_bn events, but {expected} BatchNorms "
            "directly follow a conv in the traced graph"
        )
        compiled = facts["compiled"]
        assert isinstance(compiled, fx.GraphModule)
        assert count_conv_bn(compiled) == 0, f"{name}: a conv->BatchNorm pair is left"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_caller_model_in_train_mode_is_unchanged(name: str) -> None:
    """A model handed over in train mode stays so; its BatchNorm statistics are not updated."""
    model, x = build(name)
    model.train()
    state, flags = _snapshot(model)
    compiled = fxcompress.optimize(model, 1.0, example_inputs=x, latency="flops")
    assert _snapshot(model) == (state, flags)
    assert all(flags.values())
    with torch.no_grad():
        err = rel_error(compiled(x), model.eval()(x))
    assert err <= RTOL


def test_known_failures_still_fail() -> None:
    """Every model in KNOWN_FAILURES still fails (remove it from the dict once it passes)."""
    for name in KNOWN_FAILURES:
        with pytest.raises((AssertionError, fxcompress.FxCompressError)):
            check_model(name)


def test_every_builder_is_covered() -> None:
    assert len(MODELS) >= 80
    assert set(KNOWN_FAILURES) <= set(MODELS)
    assert set(SLOW) <= set(MODELS)
    assert HUGE <= SLOW
    assert set(MIN_SIZE) <= set(MODELS)
    assert set(VIT_PATCH) <= set(MODELS)
    assert {n for n in MODELS if n.startswith("vit_")} == set(VIT_PATCH)


def test_count_conv_bn_is_independent_of_fxcompress() -> None:
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
    )
    assert count_conv_bn(m) == 1
