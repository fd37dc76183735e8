"""Drawing the blocks of a generated model: :class:`ModelBuilder`, one block kind a method."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from fxcompress.testing.drawing import (
    ACTIVATION_MODULES,
    BN_EPS,
    EXTRA_ACTIVATION_MODULES,
    activation_module,
    divisors,
)
from fxcompress.testing.hostile import INPLACE_OPS, Hook, hook_strategy
from fxcompress.testing.program import Step

__all__ = ["ModelBuilder"]


class ModelBuilder:
    """Draws the blocks of a :class:`GeneratedModel`, tracking every value's (C, H, W)."""

    def __init__(
        self,
        draw: Any,
        st: Any,
        max_channels: int,
        *,
        rich: bool = False,
        hooks: bool = False,
        inplace: bool = False,
        unbatched: bool = False,
    ) -> None:
        self.draw = draw
        self.st = st
        self.max_channels = max_channels
        self.rich = rich  # graphs(): per-axis geometry, more activations and spellings
        self.shapes: list[tuple[int, ...]] = []
        self.steps: list[Step] = []
        self.makers: dict[str, Any] = {}
        self.params: dict[str, tuple[int, ...]] = {}
        self.hooks: dict[str, list[Hook]] = {}
        self.allow_hooks = hooks
        self.inplace = inplace
        self.batch = draw(st.integers(1, 2))
        self.unbatched = unbatched and draw(st.booleans())
        self._last = 0  # the value blocks extend (a side-effect write does not move it)

    # -- bookkeeping
    def _name(self, stem: str) -> str:
        i = 0
        while f"{stem}{i}" in self.makers or f"{stem}{i}" in self.params:
            i += 1
        return f"{stem}{i}"

    def _emit(self, step: Step, shape: tuple[int, ...], *, advance: bool = True) -> int:
        self.steps.append(step)
        self.shapes.append(shape)
        if advance:
            self._last = len(self.shapes) - 1
        return len(self.shapes) - 1

    def _maybe_hook(self, name: str) -> None:
        """With ``hooks``, one module in three gets a :class:`Hook`."""
        if self.allow_hooks and self.draw(self.st.integers(0, 2)) == 0:
            self.hooks[name] = [self.draw(hook_strategy(self.st))]

    def _module(self, stem: str, make: Any, src: int, shape: tuple[int, ...]) -> int:
        name = self._name(stem)
        self.makers[name] = make
        self._maybe_hook(name)
        return self._emit(Step("module", (src,), name), shape)

    @property
    def last(self) -> int:
        return self._last

    def _spatial_source(self) -> int | None:
        """The last value when it is a feature map (blocks only extend the last value)."""
        return self.last if len(self.shapes[self.last]) == 3 else None

    # -- pieces
    def conv(
        self,
        src: int,
        *,
        out: int | None = None,
        kernel: int | None = None,
        stride: int | None = None,
        centred: bool | None = None,
        dense: bool = False,
    ) -> int:
        draw, st = self.draw, self.st
        if self.rich and kernel is None and stride is None and centred is None:
            return self._free_conv(src, out=out, dense=dense)
        c, h, w = self.shapes[src]
        k = kernel if kernel is not None else draw(st.sampled_from((1, 1, 3, 3, 5)))
        d = 1 if k == 1 else draw(st.sampled_from((1, 1, 2)))
        span = d * (k - 1)
        is_centred = centred if centred is not None else draw(st.booleans())
        p = span // 2 if is_centred else 0
        while min(h, w) + 2 * p - span < 1:  # too small for this kernel: pad it
            p += 1
        s = stride if stride is not None else draw(st.sampled_from((1, 1, 2)))
        kind = "dense" if dense else draw(st.sampled_from(("dense", "dense", "grouped", "dw")))
        if kind == "dw":
            g, o = c, c * draw(st.integers(1, max(1, self.max_channels // c)))
        elif kind == "grouped":
            g = draw(st.sampled_from(divisors(c)))
            o = g * draw(st.integers(1, max(1, self.max_channels // g)))
        else:
            g, o = 1, draw(st.integers(1, self.max_channels))
        if out is not None:
            g = math.gcd(g, out)
            o = out
        bias = draw(st.booleans())
        shape = (o, (h + 2 * p - span - 1) // s + 1, (w + 2 * p - span - 1) // s + 1)
        return self._module(
            "conv",
            lambda: nn.Conv2d(c, o, k, stride=s, padding=p, dilation=d, groups=g, bias=bias),
            src,
            shape,
        )

    def _groups(self, c: int, out: int | None, dense: bool) -> tuple[int, int]:
        draw, st = self.draw, self.st
        kind = "dense" if dense else draw(st.sampled_from(("dense", "dense", "grouped", "dw")))
        if kind == "dw":
            g, o = c, c * draw(st.integers(1, max(1, self.max_channels // c)))
        elif kind == "grouped":
            g = draw(st.sampled_from(divisors(c)))
            o = g * draw(st.integers(1, max(1, self.max_channels // g)))
        else:
            g, o = 1, draw(st.integers(1, self.max_channels))
        if out is not None:
            g, o = math.gcd(g, out), out
        return g, o

    def _free_conv(self, src: int, *, out: int | None, dense: bool) -> int:
        """A conv with kernel, stride, dilation and padding drawn per axis (may be uncentred)."""
        draw, st = self.draw, self.st
        c, *spatial = self.shapes[src]
        kernel, stride, dilation, padding, size = [], [], [], [], []
        for n in spatial:
            k = draw(st.sampled_from((1, 1, 2, 3, 3, 5)))
            d = 1 if k == 1 else draw(st.sampled_from((1, 1, 2, 3)))
            span = d * (k - 1)
            p = draw(st.integers(0, span))  # 0 .. "full" padding, centred or not
            while n + 2 * p - span < 1:
                p += 1
            s = draw(st.sampled_from((1, 1, 2, 3)))
            kernel.append(k)
            dilation.append(d)
            padding.append(p)
            stride.append(s)
            size.append((n + 2 * p - span - 1) // s + 1)
        g, o = self._groups(c, out, dense)
        bias = draw(st.booleans())
        k_, s_, p_, d_ = tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)
        return self._module(
            "conv",
            lambda: nn.Conv2d(c, o, k_, stride=s_, padding=p_, dilation=d_, groups=g, bias=bias),
            src,
            (o, *size),
        )

    def bn(self, src: int) -> int:
        eps = self.draw(self.st.sampled_from(BN_EPS))
        if self.unbatched:
            # torch reads an unbatched (C, H, W) map as (N, C', L): the BN normalises H
            h = self.shapes[src][1]
            return self._module("bn", lambda: nn.BatchNorm1d(h, eps=eps), src, self.shapes[src])
        c = self.shapes[src][0]
        return self._module("bn", lambda: nn.BatchNorm2d(c, eps=eps), src, self.shapes[src])

    def act(self, src: int) -> int:
        spelling = self.draw(self.st.sampled_from(("module", "module", "relu", "relu_method")))
        if spelling == "module":
            if self.rich:
                choices = ACTIVATION_MODULES + EXTRA_ACTIVATION_MODULES
                make = choices[self.draw(self.st.integers(0, len(choices) - 1))]
                return self._module("act", make, src, self.shapes[src])
            i = self.draw(self.st.integers(0, len(ACTIVATION_MODULES) - 1))
            return self._module("act", lambda: activation_module(i), src, self.shapes[src])
        return self._emit(Step(spelling, (src,)), self.shapes[src])

    def add(self, a: int, b: int) -> int:
        spelling = None
        if self.rich:
            spelling = self.draw(self.st.sampled_from((None, "torch.add", "method")))
        return self._emit(Step("add", (a, b), spelling), self.shapes[a])

    def unit(self, src: int, **kw: Any) -> int:
        if self.unbatched and not kw and self.draw(self.st.integers(0, 2)) == 0:
            h = self.shapes[src][1]
            if h <= self.max_channels:
                # C_out == H: the BatchNorm1d(H) after it looks like a per-channel BN
                return self.bn(self.conv(src, out=h, stride=1, centred=True))
        v = self.conv(src, **kw)
        if self.draw(self.st.booleans()):
            v = self.bn(v)
        return v

    # -- blocks
    def block_conv(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        v = self.unit(src)
        if self.draw(self.st.booleans()):
            self.act(v)

    def block_residual(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        c = self.shapes[src][0]
        v = self.unit(
            src, out=c, kernel=self.draw(self.st.sampled_from((1, 3))), stride=1, centred=True
        )
        if self.draw(self.st.booleans()):
            v = self.act(v)
            v = self.unit(v, out=c, kernel=3, stride=1, centred=True)
        order = (src, v) if self.draw(self.st.booleans()) else (v, src)
        v = self.add(*order)
        if self.draw(self.st.booleans()):
            self.act(v)

    def block_projection(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        s = self.draw(self.st.sampled_from((1, 2)))
        o = self.draw(self.st.integers(1, self.max_channels))
        branch = self.unit(src, out=o, kernel=3, stride=s, centred=True)
        short = self.unit(src, out=o, kernel=1, stride=s, centred=True)
        v = self.add(branch, short)
        if self.draw(self.st.booleans()):
            self.act(v)

    def block_shared(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        c, h, w = self.shapes[src]
        name = self._name("shared")
        k = self.draw(self.st.sampled_from((1, 3)))
        bias = self.draw(self.st.booleans())
        self.makers[name] = lambda: nn.Conv2d(c, c, k, padding=k // 2, bias=bias)
        self._maybe_hook(name)
        first = self._emit(Step("module", (src,), name), (c, h, w))
        mid = first
        if self.draw(self.st.booleans()):
            mid = self.bn(mid)  # BN after one call site only (pytorch issue 104593)
        if self.draw(self.st.booleans()):
            mid = self.act(mid)
        second = self._emit(Step("module", (mid,), name), (c, h, w))
        if self.draw(self.st.booleans()):
            self.bn(second)

    def block_conv_fn(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        c, h, w = self.shapes[src]
        o = self.draw(self.st.integers(1, self.max_channels))
        k = self.draw(self.st.sampled_from((1, 3)))
        p = k // 2 if self.draw(self.st.booleans()) or min(h, w) < k else 0
        weight = self._name("weight")
        self.params[weight] = (o, c, k, k)
        bias = None
        if self.draw(self.st.booleans()):
            bias = self._name("bias")
            self.params[bias] = (o,)
        shape = (o, h + 2 * p - k + 1, w + 2 * p - k + 1)
        v = self._emit(Step("conv_fn", (src,), (weight, bias, 1, p)), shape)
        if self.draw(self.st.booleans()):
            v = self.bn(v)

    def block_elementwise(self) -> None:
        src = self.last
        if self.draw(self.st.booleans()):
            factor = self.draw(self.st.sampled_from((0.5, -1.0, 2.0)))
            self._emit(Step("scale", (src,), factor), self.shapes[src])
        else:
            self._emit(Step("gate", (src,)), self.shapes[src])

    def block_cat(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        a = self.unit(src, stride=1, centred=True, kernel=self.draw(self.st.sampled_from((1, 3))))
        if self.draw(self.st.booleans()):
            b = src
        else:
            b = self.unit(src, stride=1, centred=True, kernel=1)
        self._emit(
            Step("cat", (a, b)), (self.shapes[a][0] + self.shapes[b][0], *self.shapes[a][1:])
        )

    def block_pool(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        c, h, w = self.shapes[src]
        if min(h, w) < 2:
            return
        op = self.draw(self.st.sampled_from(("max_pool", "avg_pool")))
        self._emit(Step(op, (src,)), (c, h // 2, w // 2))

    def block_bottleneck(self) -> None:
        """1x1 -> kxk (strided, maybe depthwise) -> 1x1, identity or projection shortcut."""
        src = self._spatial_source()
        if src is None:
            return
        draw, st = self.draw, self.st
        c = self.shapes[src][0]
        mid = draw(st.integers(1, self.max_channels))
        stride = draw(st.sampled_from((1, 1, 2)))
        v = self.unit(src, out=mid, kernel=1, stride=1, centred=True, dense=True)
        v = self.act(v)
        v = self.unit(v, out=mid, kernel=3, stride=stride, centred=True)
        if draw(st.booleans()):
            v = self.act(v)
        out = c if stride == 1 and draw(st.booleans()) else draw(st.integers(1, self.max_channels))
        v = self.unit(v, out=out, kernel=1, stride=1, centred=True, dense=True)
        if stride == 1 and out == c:
            short = src
        else:
            short = self.unit(src, out=out, kernel=1, stride=stride, centred=True, dense=True)
        v = self.add(v, short)
        if draw(st.booleans()):
            self.act(v)

    def block_squeeze_excite(self) -> None:
        """``x * sigmoid(conv(act(conv(pool(x)))))``: a multiplicative gate."""
        src = self._spatial_source()
        if src is None:
            return
        draw, st = self.draw, self.st
        c = self.shapes[src][0]
        pool = draw(st.sampled_from(("global_pool", "mean_pool")))
        g = self._emit(Step(pool, (src,)), (c, 1, 1))
        g = self.conv(
            g,
            out=draw(st.integers(1, self.max_channels)),
            kernel=1,
            stride=1,
            centred=True,
            dense=True,
        )
        g = self.act(g)
        g = self.conv(g, out=c, kernel=1, stride=1, centred=True, dense=True)
        if draw(st.booleans()):
            g = self._emit(Step("sigmoid", (g,)), (c, 1, 1))
        else:
            g = self._module("gate", nn.Hardsigmoid, g, (c, 1, 1))
        self._emit(Step("mul", (src, g) if draw(st.booleans()) else (g, src)), self.shapes[src])

    def block_reshape(self) -> None:
        src = self._spatial_source()
        if src is None:
            return
        c, h, w = self.shapes[src]
        if self.draw(self.st.booleans()):
            self._emit(Step("reshape", (src,), (h, w)), (c, h, w))
        else:
            self._emit(Step("transpose", (src,)), (c, h, w))

    def block_shared_linear(self) -> None:
        """One ``nn.Linear(f, f)`` called twice (on a pooled, flattened map if need be), at times
        with a residual add around it."""
        src = self.last
        if len(self.shapes[src]) == 3:
            c = self.shapes[src][0]
            src = self._emit(Step("global_pool", (src,)), (c, 1, 1))
            src = self._emit(Step("flatten", (src,)), (c,))
        (features,) = self.shapes[src]
        name = self._name("shared_fc")
        bias = self.draw(self.st.booleans())
        self.makers[name] = lambda: nn.Linear(features, features, bias=bias)
        self._maybe_hook(name)
        v = self._emit(Step("module", (src,), name), (features,))
        if self.draw(self.st.booleans()):
            v = self.act(v)
        v = self._emit(Step("module", (v,), name), (features,))
        if self.draw(self.st.booleans()):
            self.add(v, src)  # a residual over features (1-D values with an unbatched input)

    def block_head(self) -> None:
        src = self.last
        if len(self.shapes[src]) == 3:
            c, h, w = self.shapes[src]
            if c * h * w > 256 or self.draw(self.st.booleans()):
                src = self._emit(Step("global_pool", (src,)), (c, 1, 1))
            src = self._emit(Step("flatten", (src,)), (math.prod(self.shapes[src]),))
        (features,) = self.shapes[src]
        hidden = self.draw(self.st.integers(1, 16))
        v = self._module("fc", lambda: nn.Linear(features, hidden), src, (hidden,))
        if self.draw(self.st.booleans()):
            if self.draw(self.st.booleans()):
                v = self.act(v)
            if self.inplace and self.draw(self.st.booleans()):
                self._write(src, advance=False)  # the first layer's input, between the layers
            out = self.draw(self.st.integers(1, 10))
            self._module("fc", lambda: nn.Linear(hidden, out), v, (out,))

    # -- hostile and structural blocks of graphs() (and the opt-in flags)
    def _write(self, src: int, *, advance: bool) -> int:
        """``values[src].<op>_(...)``: an in-place write; returns the (aliasing) new value."""
        op = self.draw(self.st.sampled_from(INPLACE_OPS))
        return self._emit(Step("inplace", (src,), op), self.shapes[src], advance=advance)

    def block_inplace(self) -> None:
        """An in-place write: of the last value, between two layers, or of an earlier value."""
        draw, st = self.draw, self.st
        kind = draw(st.sampled_from(("last", "between", "earlier")))
        src = self.last
        if kind == "last" or len(self.shapes[src]) != 3:
            self._write(src, advance=True)  # the chain goes on from the written tensor
            return
        if kind == "between":
            # a = unit(v); v.op_(); b = unit(a) [+ v]: v's layer run has a write in between
            a = self.unit(src, stride=1, centred=True, kernel=draw(st.sampled_from((1, 3))))
            self._write(src, advance=False)
            b = self.unit(a, stride=1, centred=True, kernel=draw(st.sampled_from((1, 3))))
            if self.shapes[b] == self.shapes[src] and draw(st.booleans()):
                self.add(b, src)  # the written value is read again
            return
        # an earlier value (the model's input, at times): written now, maybe read again later
        j = 0 if draw(st.booleans()) else draw(st.integers(0, src))
        self._write(j, advance=False)
        if j != src and self.shapes[j] == self.shapes[src] and draw(st.booleans()):
            self.add(src, j)

    def block_identity(self) -> None:
        """``nn.Identity`` or an eval-mode ``nn.Dropout`` (hook targets that canonicalization
        would otherwise remove)."""
        src = self.last
        kind = self.draw(self.st.sampled_from(("identity", "dropout", "dropout2d")))
        if kind == "dropout2d" and (self.unbatched or len(self.shapes[src]) != 3):
            kind = "dropout"
        make = {"identity": nn.Identity, "dropout": lambda: nn.Dropout(0.5)}.get(
            kind, lambda: nn.Dropout2d(0.25)
        )
        self._module("drop" if kind != "identity" else "id", make, src, self.shapes[src])

    def block_bn_only(self) -> None:
        """A BatchNorm that follows no convolution (after an activation, a sum, a pool or on
        the input itself)."""
        src = self._spatial_source()
        if src is None:
            return
        if self.draw(self.st.booleans()):
            src = self.act(src)
        self.bn(src)

    def block_fork_residual(self) -> None:
        """``h = act([bn](conv(x))); out = [f](conv(h)) + h``: a prunable unit (C_in == C_out,
        stride 1) whose activation forks into the next residual; the branch is a 1x1 or 3x3
        conv, the shortcut ``h`` or a 1x1 projection of it; at times a padded conv follows."""
        src = self._spatial_source()
        if src is None:
            return
        draw, st = self.draw, self.st
        c = self.shapes[src][0]
        h = self.conv(src, out=c, kernel=draw(st.sampled_from((1, 3))), stride=1, centred=True)
        if draw(st.integers(0, 3)) > 0:
            h = self.bn(h)
        h = self.act(h)
        variant = draw(st.sampled_from(("identity", "identity", "projection")))
        out = c if variant == "identity" else draw(st.integers(1, self.max_channels))
        v = self.unit(h, out=out, kernel=draw(st.sampled_from((1, 3))), stride=1, centred=True)
        if draw(st.booleans()):
            v = self.act(v)
        short = h
        if variant == "projection":
            short = self.unit(h, out=out, kernel=1, stride=1, centred=True, dense=True)
        v = self.add(*((v, short) if draw(st.booleans()) else (short, v)))
        if draw(st.booleans()):
            v = self.act(v)
        if draw(st.booleans()):
            self.unit(v, kernel=3, stride=1, centred=True)  # a padded conv after the sum

    def block_multi_branch(self) -> None:
        """A sum of three or four branches of one input (RepVGG / MobileOne training form):
        kxk conv (+BN), 1x1 conv (+BN), BatchNorm alone, identity."""
        src = self._spatial_source()
        if src is None:
            return
        draw, st = self.draw, self.st
        c = self.shapes[src][0]
        stride = draw(st.sampled_from((1, 1, 2)))
        same = stride == 1 and draw(st.integers(0, 3)) > 0
        out = c if same else draw(st.integers(1, self.max_channels))
        kinds = ("kxk", "1x1", "bn", "identity") if same else ("kxk", "1x1")
        n = draw(st.integers(3, 4))
        branches = [draw(st.sampled_from(kinds)) for _ in range(n)]
        values = []
        for kind in branches:
            if kind in ("kxk", "1x1"):
                k = draw(st.sampled_from((3, 3, 5))) if kind == "kxk" else 1
                v = self.conv(src, out=out, kernel=k, stride=stride, centred=True)
                if draw(st.integers(0, 3)) > 0:
                    v = self.bn(v)
                values.append(v)
            elif kind == "bn":
                values.append(self.bn(src))
            else:
                values.append(src)
        total = values[0]
        for v in values[1:]:
            total = self.add(total, v)
        if draw(st.booleans()):
            self.act(total)
