"""Strategies for chains of layers: :func:`conv_chains` and :func:`linear_chains`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxcompress.testing.drawing import (
    ACTIVATION_MODULES,
    BATCHNORM_MODULES,
    BN_EPS,
    CONV_MODULES,
    BNSpec,
    activation_module,
    check_dtype,
    divisors,
    hypothesis_strategies,
    randomise_bn,
    seeded,
)
from fxcompress.testing.hostile import INPLACE_OPS, Hook, InplaceOp, hook_strategy, register_hooks

__all__ = ["conv_chains", "linear_chains"]


def _conv_spec(
    channels: int,
    out: int,
    geometry: tuple[tuple[int, ...], ...],
    groups: int,
    bn: Any,
    act: int | None,
    bias: bool,
) -> dict[str, Any]:
    """One conv of a drawn chain; ``geometry`` is (kernel, stride, dilation, padding)."""
    kernel, stride, dilation, padding = geometry
    return {
        "in": channels,
        "out": out,
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "groups": groups,
        "bias": bias,
        "bn": bn,
        "act": act,
    }


def conv_chains(
    *,
    ndim: int = 2,
    min_convs: int = 1,
    max_convs: int = 4,
    max_channels: int = 8,
    max_kernel: int = 7,
    max_stride: int = 3,
    max_dilation: int = 3,
    groups: bool = True,
    batchnorm: bool = True,
    activations: bool = True,
    padding: str = "first",
    dtype: torch.dtype = torch.float32,
    max_extent: int | None = None,
    hooks: bool = False,
    inplace: bool = False,
    unbatched: bool = False,
) -> Any:
    """Strategy for ``(nn.Sequential of convolutions, input)`` pairs.

    Each convolution has a random kernel size (1..``max_kernel``), stride (1..``max_stride``) and
    dilation (1..``max_dilation``) drawn per spatial axis, a bias or not, and groups that are
    dense, grouped or depthwise (with a channel multiplier). Optionally an eval-mode BatchNorm
    with random running statistics and ``eps`` follows a conv, and an activation sits between
    two convs. The input is just large enough (per axis at most ``max_extent``) for the chain.

    Parameters
    ----------
    ndim : {1, 2, 3}
        Spatial axes.
    min_convs, max_convs : int
        Number of convolutions.
    max_channels : int
        Largest channel count (an unbatched chain may exceed it, see ``unbatched``).
    max_kernel, max_stride, max_dilation : int
        Upper bounds per axis.
    groups : bool
        Allow grouped and depthwise convolutions.
    batchnorm : bool
        Allow a BatchNorm after each conv.
    activations : bool
        Allow an activation (from :data:`ACTIVATION_MODULES`) between convs.
    padding : {"first", "none", "all"}
        Which convs may zero-pad: only the first (such chains merge exactly into one conv when
        there is no activation), none, or all.
    dtype : torch.dtype
        Of the parameters and the input.
    max_extent : int, optional
        Largest input size per axis (default 40, 160 and 12 for 2-D, 1-D and 3-D; 12, 24 and 8
        for an unbatched input); kernels, dilations and strides are drawn within it.
    hooks : bool
        Let a module of the chain carry a forward hook or pre-hook (:class:`Hook`), which may
        change what the module returns. Off by default.
    inplace : bool
        Let an :class:`InplaceOp` (``x.mul_(2.0)``, ``x.relu_()``, ...) sit before a conv; before
        the first one it writes the caller's input. Off by default.
    unbatched : bool
        Let the input have no batch axis: ``(C, *spatial)``, which torch's convolutions accept.
        A BatchNorm after a conv then sees ``(C, *spatial)`` as ``(N, C', ...)`` and normalises
        the first spatial axis: it is a ``BatchNorm{ndim-1}d`` (``BatchNorm1d`` for 1-D) over
        that axis's extent, and at times the conv's channel count is drawn equal to that extent,
        so that the BatchNorm looks like a per-channel one but is not. Off by default.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``(model, x)`` with ``model`` an ``nn.Sequential`` in eval mode.

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None, deadline=None)
    ... @given(conv_chains(dtype=torch.float64))
    ... def check(case):
    ...     model, x = case
    ...     assert model(x).dtype == torch.float64
    >>> check()
    """
    st = hypothesis_strategies()
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3, got ndim={ndim!r}")
    if padding not in ("first", "none", "all"):
        raise ValueError(f"padding must be 'first', 'none' or 'all', got padding={padding!r}")
    if not 1 <= min_convs <= max_convs:
        raise ValueError(f"need 1 <= min_convs <= max_convs, got {min_convs}, {max_convs}")
    drawer = _ConvChainDrawer(
        st=st,
        ndim=ndim,
        min_convs=min_convs,
        max_convs=max_convs,
        max_channels=max_channels,
        max_kernel=max_kernel,
        max_stride=max_stride,
        max_dilation=max_dilation,
        groups=groups,
        batchnorm=batchnorm,
        activations=activations,
        padding=padding,
        dtype=check_dtype(dtype),
        extent=max_extent if max_extent is not None else {1: 160, 2: 40, 3: 12}[ndim],
        unbatched_extent=max_extent if max_extent is not None else {1: 24, 2: 12, 3: 8}[ndim],
        hooks=hooks,
        inplace=inplace,
        unbatched=unbatched,
    )
    return st.composite(drawer.chain)()


@dataclass(frozen=True)
class _ConvChainDrawer:
    """The draws of :func:`conv_chains` (``st`` is ``hypothesis.strategies``), in their order."""

    st: Any
    ndim: int
    min_convs: int
    max_convs: int
    max_channels: int
    max_kernel: int
    max_stride: int
    max_dilation: int
    groups: bool
    batchnorm: bool
    activations: bool
    padding: str
    dtype: torch.dtype
    extent: int
    unbatched_extent: int
    hooks: bool
    inplace: bool
    unbatched: bool

    def chain(self, draw: Any) -> tuple[nn.Sequential, torch.Tensor]:
        """One ``(model, x)``: layers, the input's shape, extras, then the weights' seed."""
        st = self.st
        n = draw(st.integers(self.min_convs, self.max_convs))
        c_in = draw(st.integers(1, self.max_channels))
        shape: tuple[int, ...]
        if self.unbatched and draw(st.booleans()):
            specs, size = self.unbatched_layers(draw, n, c_in)
            shape = (c_in, *size)
        else:
            specs, size = self.batched_layers(draw, n, c_in)
            shape = (draw(st.integers(1, 2)), c_in, *size)
        chain_hooks = self.extras(draw, specs)
        seed = draw(st.integers(0, 2**31 - 1))
        return _build_chain(self.ndim, specs, shape, self.dtype, seed, chain_hooks)

    def may_pad(self, i: int) -> bool:
        return self.padding == "all" or (self.padding == "first" and i == 0)

    def channels(self, draw: Any, channels: int) -> tuple[int, int]:
        """Groups and output channels of a conv on ``channels`` channels."""
        st, max_channels = self.st, self.max_channels
        kind = draw(st.sampled_from(("dense", "grouped", "depthwise"))) if self.groups else "dense"
        if kind == "depthwise":
            return channels, channels * draw(st.integers(1, max(1, max_channels // channels)))
        if kind == "grouped":
            g = draw(st.sampled_from(divisors(channels)))
            return g, g * draw(st.integers(1, max(1, max_channels // g)))
        return 1, draw(st.integers(1, max_channels))

    def conv(self, draw: Any, i: int, n: int, layer: tuple[Any, ...]) -> dict[str, Any]:
        """The spec of conv ``i`` of ``n``: ``layer`` is (channels, out, geometry, groups, bn);
        the activation after it and its bias are drawn here."""
        act = None
        if self.activations and i < n - 1 and draw(self.st.booleans()):
            act = draw(self.st.integers(0, len(ACTIVATION_MODULES) - 1))
        return _conv_spec(*layer, act, draw(self.st.booleans()))

    def extras(self, draw: Any, specs: list[dict[str, Any]]) -> dict[str, tuple[Hook, ...]]:
        """In-place ops before convs and hooks on modules (only with the opt-in flags)."""
        st = self.st
        for spec in specs:
            spec["inplace"] = None
            if self.inplace and draw(st.integers(0, 2)) == 0:
                spec["inplace"] = draw(st.sampled_from(INPLACE_OPS))
        drawn: dict[str, tuple[Hook, ...]] = {}
        if self.hooks:
            for i in range(_chain_length(specs)):
                if draw(st.integers(0, 2)) == 0:
                    drawn[str(i)] = (draw(hook_strategy(st)),)
        return drawn

    def batched_layers(
        self, draw: Any, n: int, c_in: int
    ) -> tuple[list[dict[str, Any]], list[int]]:
        """Layers for an ``(N, C, *spatial)`` input, then the input's spatial size."""
        st, ndim, extent = self.st, self.ndim, self.extent
        channels = c_in
        rf = [1] * ndim
        jump = [1] * ndim
        first_pad = [0] * ndim
        specs: list[dict[str, Any]] = []
        for i in range(n):
            kernel, stride, dil, pad = [], [], [], []
            for ax in range(ndim):
                span = max(0, (extent - rf[ax]) // jump[ax])
                d = draw(st.integers(1, max(1, min(self.max_dilation, span))))
                k = draw(st.integers(1, max(1, min(self.max_kernel, span // d + 1))))
                s = draw(st.integers(1, self.max_stride))
                if jump[ax] * s > extent:
                    s = 1
                p = draw(st.integers(0, d * (k - 1))) if self.may_pad(i) else 0
                rf[ax] += (k - 1) * d * jump[ax]
                if i == 0:
                    first_pad[ax] = p
                jump[ax] *= s
                kernel.append(k)
                stride.append(s)
                dil.append(d)
                pad.append(p)
            g, out = self.channels(draw, channels)
            bn = None
            if self.batchnorm and draw(st.booleans()):
                bn = BNSpec(draw(st.sampled_from(BN_EPS)), draw(st.booleans()))
            geometry = (tuple(kernel), tuple(stride), tuple(dil), tuple(pad))
            specs.append(self.conv(draw, i, n, (channels, out, geometry, g, bn)))
            channels = out
        # input size: enough for the receptive field, plus a few positions to exercise strides
        size = []
        for ax in range(ndim):
            need = max(1, rf[ax] - 2 * first_pad[ax])
            # keep the padded intermediate maps non-empty with "all" padding as well
            size.append(min(max(need, 1) + draw(st.integers(0, 3)), max(extent, need)))
        return specs, size

    def unbatched_layers(
        self, draw: Any, n: int, c_in: int
    ) -> tuple[list[dict[str, Any]], list[int]]:
        """Layers for a ``(C, *spatial)`` input, tracking each map's exact extent."""
        st, ndim = self.st, self.ndim
        size = [draw(st.integers(1, self.unbatched_extent)) for _ in range(ndim)]
        current = list(size)
        channels = c_in
        specs: list[dict[str, Any]] = []
        for i in range(n):
            kernel, stride, dil, pad = [], [], [], []
            for ax in range(ndim):
                d = draw(st.integers(1, self.max_dilation))
                k = draw(st.integers(1, self.max_kernel))
                p = draw(st.integers(0, d * (k - 1))) if self.may_pad(i) else 0
                while current[ax] + 2 * p - d * (k - 1) < 1:  # the kernel must fit the map
                    k -= 1
                    p = min(p, d * (k - 1))
                s = draw(st.integers(1, self.max_stride))
                current[ax] = (current[ax] + 2 * p - d * (k - 1) - 1) // s + 1
                kernel.append(k)
                stride.append(s)
                dil.append(d)
                pad.append(p)
            g, out = self.channels(draw, channels)
            bn = None
            if self.batchnorm and draw(st.booleans()):
                # torch reads (C, L, ...) as (N, C', ...): the BN normalises the first spatial
                # axis; drawing C == L at times makes it look like a per-channel BN
                features = current[0]
                if features <= 2 * self.max_channels and draw(st.booleans()):
                    out = features
                    g = math.gcd(g, out)
                dims = max(1, ndim - 1)
                bn = BNSpec(draw(st.sampled_from(BN_EPS)), draw(st.booleans()), features, dims)
            geometry = (tuple(kernel), tuple(stride), tuple(dil), tuple(pad))
            specs.append(self.conv(draw, i, n, (channels, out, geometry, g, bn)))
            channels = out
        return specs, size


def _chain_length(specs: list[dict[str, Any]]) -> int:
    """Number of modules :func:`_build_chain` makes from ``specs``."""
    return sum(
        1 + (s.get("inplace") is not None) + (s["bn"] is not None) + (s["act"] is not None)
        for s in specs
    )


def _build_chain(
    ndim: int,
    specs: list[dict[str, Any]],
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
    hooks: dict[str, tuple[Hook, ...]] | None = None,
) -> tuple[nn.Sequential, torch.Tensor]:
    with seeded(seed):
        layers: list[nn.Module] = []
        for s in specs:
            if s.get("inplace") is not None:
                layers.append(InplaceOp(*s["inplace"]))
            layers.append(
                CONV_MODULES[ndim](
                    s["in"],
                    s["out"],
                    s["kernel"],
                    stride=s["stride"],
                    padding=s["padding"],
                    dilation=s["dilation"],
                    groups=s["groups"],
                    bias=s["bias"],
                )
            )
            if s["bn"] is not None:
                spec = s["bn"]
                features = spec.features if spec.features is not None else s["out"]
                bn = BATCHNORM_MODULES[spec.dims or ndim](
                    features, eps=spec.eps, affine=spec.affine
                )
                randomise_bn(bn)
                layers.append(bn)
            if s["act"] is not None:
                layers.append(activation_module(s["act"]))
        model = nn.Sequential(*layers).to(dtype).eval()
        register_hooks(model, hooks or {})
        x = torch.randn(input_shape, dtype=dtype)
    return model, x


def linear_chains(
    *,
    min_layers: int = 1,
    max_layers: int = 4,
    max_features: int = 16,
    batchnorm: bool = True,
    activations: bool = True,
    sequence: bool = True,
    dtype: torch.dtype = torch.float32,
    hooks: bool = False,
    inplace: bool = False,
    unbatched: bool = False,
) -> Any:
    """Strategy for ``(nn.Sequential of nn.Linear, input)`` pairs.

    Feature sizes are drawn in 1..``max_features``; biases are on or off; an eval-mode
    ``BatchNorm1d`` with random statistics may follow a layer and an activation may sit between
    two layers. The input is ``(batch, d_in)``, or ``(batch, length, d_in)`` when ``sequence``
    allows it and the chain has no BatchNorm (``BatchNorm1d`` normalises axis 1).

    Parameters
    ----------
    min_layers, max_layers : int
        Number of ``nn.Linear`` layers.
    max_features : int
        Largest feature count.
    batchnorm : bool
        Allow a ``BatchNorm1d`` after each layer.
    activations : bool
        Allow an activation (from :data:`ACTIVATION_MODULES`) between layers.
    sequence : bool
        Allow a ``(batch, length, d_in)`` input (chains without BatchNorm).
    dtype : torch.dtype
        Of the parameters and the input.
    hooks : bool
        Let a module of the chain carry a forward hook or pre-hook (:class:`Hook`). Off by
        default.
    inplace : bool
        Let an :class:`InplaceOp` sit before a layer (before the first one it writes the
        caller's input). Off by default.
    unbatched : bool
        Let the input be a single ``(d_in,)`` vector (chains without BatchNorm, which needs a
        batch axis). Off by default.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``(model, x)``.

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None, deadline=None)
    ... @given(linear_chains(batchnorm=False, activations=False))
    ... def check(case):
    ...     model, x = case
    ...     assert model(x).shape[-1] == model[-1].out_features
    >>> check()
    """
    st = hypothesis_strategies()
    if not 1 <= min_layers <= max_layers:
        raise ValueError(f"need 1 <= min_layers <= max_layers, got {min_layers}, {max_layers}")
    dtype = check_dtype(dtype)

    @st.composite
    def draw_chain(draw: Any) -> tuple[nn.Sequential, torch.Tensor]:
        n = draw(st.integers(min_layers, max_layers))
        sizes = [draw(st.integers(1, max_features)) for _ in range(n + 1)]
        bias = [draw(st.booleans()) for _ in range(n)]
        bns = [
            BNSpec(draw(st.sampled_from(BN_EPS)), draw(st.booleans()))
            if batchnorm and draw(st.booleans())
            else None
            for _ in range(n)
        ]
        acts = [
            draw(st.integers(0, len(ACTIVATION_MODULES) - 1))
            if activations and i < n - 1 and draw(st.booleans())
            else None
            for i in range(n)
        ]
        lead: tuple[int, ...] = (draw(st.integers(1, 3)),)
        if sequence and all(b is None for b in bns) and draw(st.booleans()):
            lead = (*lead, draw(st.integers(1, 4)))
        if unbatched and all(b is None for b in bns) and draw(st.booleans()):
            lead = ()
        writes = [
            draw(st.sampled_from(INPLACE_OPS)) if inplace and draw(st.integers(0, 2)) == 0 else None
            for _ in range(n)
        ]
        length = n + sum(b is not None for b in bns) + sum(a is not None for a in acts)
        length += sum(w is not None for w in writes)
        drawn_hooks = {
            str(i): (draw(hook_strategy(st)),)
            for i in range(length)
            if hooks and draw(st.integers(0, 2)) == 0
        }
        seed = draw(st.integers(0, 2**31 - 1))
        with seeded(seed):
            layers: list[nn.Module] = []
            for i in range(n):
                if writes[i] is not None:
                    layers.append(InplaceOp(*writes[i]))
                layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias[i]))
                if bns[i] is not None:
                    bn = nn.BatchNorm1d(sizes[i + 1], eps=bns[i].eps, affine=bns[i].affine)
                    randomise_bn(bn)
                    layers.append(bn)
                if acts[i] is not None:
                    layers.append(activation_module(acts[i]))
            model = nn.Sequential(*layers).to(dtype).eval()
            register_hooks(model, drawn_hooks)
            x = torch.randn((*lead, sizes[0]), dtype=dtype)
        return model, x

    return draw_chain()
