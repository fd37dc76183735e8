"""Graph surgery of the low-rank pass: find the layers to decompose, replace them by their pair.

A *site* is a conv (``nn.Conv1d/2d/3d`` or ``F.convNd`` on fixed weights, ``groups == 1``, zero
padding) or a linear layer (``nn.Linear`` or ``F.linear`` on fixed weights) with a recorded
floating-point input shape. Anything else conv- or linear-like is reported with the reason it is
left alone. A module called from several places is left dense (decomposing it at one call site
only would silently split the shared weights).

A decomposed site becomes two ``call_module`` nodes on a new ``nn.Sequential`` installed at the
layer's own name: ``<name>.enc`` (grouped conv, or :class:`~.modules.GroupedLinear` /
bias-free ``nn.Linear``) then ``<name>.dec`` (1x1 conv or ``nn.Linear`` with the original bias).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import skip_init

from fxcompress.graph.recognise import layer_of, module_call_counts
from fxcompress.graph.util import clone, finalize, install, is_unused, shape_of
from fxcompress.lowrank.factorize import factorize, reconstruct
from fxcompress.lowrank.modules import GroupedLinear
from fxcompress.maths import ConvParams, LinearParams

__all__ = ["Site", "apply", "factorised_reference", "find_sites"]

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class Site:
    """A layer that can be decomposed, named by its graph node (JSON-able fields only)."""

    node: str
    name: str
    kind: str  # "conv" or "linear"
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    bias: bool
    dtype: str
    functional: bool = False  # F.conv/F.linear on get_attr weights rather than a module call

    @property
    def positions(self) -> int:
        """Output positions per weight application: ``N * prod(spatial)`` or leading dims."""
        if self.kind == "conv":
            return self.output_shape[0] * math.prod(self.output_shape[2:])
        return math.prod(self.output_shape[:-1])


def _input_of(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


def _reads_elsewhere(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a functional layer's weight or bias attribute is read by another node too."""
    for arg in [*node.args[1:3], node.kwargs.get("weight"), node.kwargs.get("bias")]:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == arg.target]
            if len(readers) > 1 or len(arg.users) > 1:
                return True
    return False


def find_sites(gm: fx.GraphModule) -> tuple[tuple[Site, ...], tuple[tuple[str, str], ...]]:
    """The decomposable layers of ``gm`` and, for the others, ``(name, reason)`` pairs.

    Examples
    --------
    >>> import torch
    >>> from fxcompress import capture
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
    ...                   nn.Linear(8 * 4 * 4, 10))
    >>> sites, skipped = find_sites(capture(m, torch.randn(1, 3, 8, 8)))
    >>> [s.name for s in sites], skipped
    (['0', '3'], (('1', 'grouped conv (groups=8)'),))
    """
    counts = module_call_counts(gm)
    sites: list[Site] = []
    skipped: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        name = str(node.target) if node.op == "call_module" else node.name
        mod = gm.get_submodule(name) if node.op == "call_module" else None
        layer = layer_of(gm, node)
        if layer is None:
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                skipped.append((name, f"{type(mod).__name__} with unsupported settings"))
            continue
        reason = _skip_reason(gm, node, layer, counts.get(name, 0))
        if reason is not None:
            skipped.append((name, reason))
            continue
        in_shape = shape_of(_input_of(node))
        out_shape = shape_of(node)
        assert in_shape is not None
        assert out_shape is not None
        conv = isinstance(layer, ConvParams)
        sites.append(
            Site(
                node=node.name,
                name=name,
                kind="conv" if conv else "linear",
                weight_shape=tuple(int(s) for s in layer.weight.shape),
                input_shape=in_shape,
                output_shape=out_shape,
                stride=layer.stride if conv else (),
                padding=layer.padding if conv else (),
                dilation=layer.dilation if conv else (),
                bias=layer.bias is not None,
                dtype=str(layer.weight.dtype).replace("torch.", ""),
                functional=node.op == "call_function",
            )
        )
    return tuple(sites), tuple(dict.fromkeys(skipped))  # a shared module: once


def _skip_reason(
    gm: fx.GraphModule, node: fx.Node, layer: ConvParams | LinearParams, calls: int
) -> str | None:
    if isinstance(layer, ConvParams) and layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    if isinstance(layer, ConvParams) and any(p < 0 for p in layer.padding):
        return f"negative padding {layer.padding}"
    if calls > 1:
        return f"module shared by {calls} call sites"
    if node.op == "call_function" and _reads_elsewhere(gm, node):
        return "weights read elsewhere in the graph"
    if shape_of(_input_of(node)) is None or shape_of(node) is None:
        return "no recorded input/output shape"
    if not layer.weight.dtype.is_floating_point:
        return f"non-float weights ({layer.weight.dtype})"
    return None


def _pair(layer: ConvParams | LinearParams, k: int, j: int) -> nn.Sequential:
    """The encoder/decoder pair of ``layer`` at ``(k, j)`` as an ``nn.Sequential``."""
    w = layer.weight
    enc_w, dec_w = factorize(w, k, j)
    f, c = int(w.shape[0]), int(w.shape[1])
    kw = {"device": w.device, "dtype": w.dtype}
    enc: nn.Module
    dec: nn.Module
    # skip_init: the weights are overwritten, and initialising would draw from the global RNG
    if isinstance(layer, ConvParams):
        conv = _CONVS[layer.ndim]
        enc = skip_init(
            conv, c, k * j, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=k, bias=False, **kw,
        )  # fmt: skip
        dec = skip_init(conv, k * j, f, 1, bias=layer.bias is not None, **kw)
        dec_w = dec_w.reshape(f, k * j, *([1] * layer.ndim))
    else:
        enc = (
            skip_init(nn.Linear, c, j, bias=False, **kw)
            if k == 1
            else skip_init(GroupedLinear, c, j, groups=k, **kw)
        )
        dec = skip_init(nn.Linear, k * j, f, bias=layer.bias is not None, **kw)
        enc_w = enc_w.reshape(enc.weight.shape)
    with torch.no_grad():
        enc.weight.copy_(enc_w)
        dec.weight.copy_(dec_w)
        if layer.bias is not None:
            dec.bias.copy_(layer.bias)
    return nn.Sequential(OrderedDict(enc=enc, dec=dec))


def apply(gm: fx.GraphModule, decisions: Mapping[str, tuple[int, int]]) -> fx.GraphModule:
    """A copy of ``gm`` with the layer at each node ``decisions`` names replaced by its pair.

    ``decisions`` maps node names (:attr:`Site.node`) to ``(k, j)``. Shapes in ``node.meta`` of
    the new nodes are not recorded (run :func:`fxcompress.graph.capture.propagate_shapes`).
    """
    out = clone(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    attrs: list[str] = []  # parameters read by replaced functional layers
    for node_name, (k, j) in decisions.items():
        node = nodes[node_name]
        layer = layer_of(out, node)
        assert layer is not None, node_name
        pair = _pair(layer, k, j)
        if node.op == "call_function":
            attrs += [str(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
        if node.op == "call_module" and is_unused(out, str(node.target), ignore=[node]):
            prefix = str(node.target)
        else:
            prefix = install(out, node.name + "_lowrank", nn.Module())
        out.add_submodule(prefix, pair)  # the layer's own tensors were copied by layer_of
        with out.graph.inserting_before(node):
            h = out.graph.call_module(f"{prefix}.enc", (_input_of(node),))
            y = out.graph.call_module(f"{prefix}.dec", (h,))
        y.meta = {k_: v for k_, v in node.meta.items() if k_ != "tensor_meta"}
        node.replace_all_uses_with(y)
        out.graph.erase_node(node)
    finalize(out)
    read = {str(n.target) for n in out.graph.nodes if n.op == "get_attr"}
    for target in attrs:
        if target not in read:  # an orphaned parameter would still count and be trained
            owner, _, attr = target.rpartition(".")
            delattr(out.get_submodule(owner), attr)
    return out


def factorised_reference(
    gm: fx.GraphModule, decisions: Mapping[str, tuple[int, int]]
) -> fx.GraphModule:
    """A copy of ``gm`` whose decided layers hold the low-rank weight their pair computes.

    The independent reference of :func:`apply`: one layer with the reconstructed weight instead
    of the encoder/decoder pair, everything else unchanged.
    """
    out = clone(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    for node_name, (k, j) in decisions.items():
        node = nodes[node_name]
        layer = layer_of(out, node)
        assert layer is not None, node_name
        enc, dec = factorize(layer.weight, k, j)
        low = reconstruct(enc, dec, k).to(layer.weight.dtype)
        if node.op == "call_module":
            target = out.get_submodule(str(node.target)).weight
        else:
            weight_arg = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            target = out
            for part in str(weight_arg.target).split("."):
                target = getattr(target, part)
        with torch.no_grad():
            target.copy_(low.reshape(target.shape))
    return out
