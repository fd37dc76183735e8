"""Exact algebra of convolution and linear layers: composition, parallel sums, BatchNorm folding.

Every function here is pure tensor maths on small value objects (:class:`ConvParams`,
:class:`LinearParams`); no graph code. The invariants are:

* **Exactness.** Each result is one layer that computes exactly what the original layers compute,
  for every input (of any spatial size the originals accept), up to floating-point rounding:
  ``compose(a, b).apply(x) == b.apply(a.apply(x))``,
  ``add_parallel(a, b).apply(x) == a.apply(x) + b.apply(x)``, and so on.
* **Convention.** A convolution with ``N`` spatial axes computes, per axis, output position ``i``
  from input positions ``i * stride - padding + t * dilation`` (``t = 0 .. k-1``); positions
  outside ``[0, n)`` read zero. ``padding`` is symmetric per axis and may be negative, which
  crops that many positions from each side before convolving.
* **Precision.** All arithmetic is done in float64; a result is cast back to the dtype (and
  device) of the first operand's weight.
* **Purity.** Inputs are never mutated, and results never share storage with inputs.
* **Composability.** ``compose(first, second)`` needs ``second.padding <= 0``, except on axes
  where ``first`` itself maps an all-padding window to zero (no bias and
  ``padding >= dilation * (kernel - 1)``, e.g. a zero-pad identity): elsewhere zeros padded onto
  the intermediate map are not a convolution of the input. ``add_parallel(a, b)`` needs
  equal strides and ``2 * padding - dilation * (kernel - 1)`` equal per axis, i.e. equal output
  sizes for every input size. Anything else is rejected, never approximated.
* **Small results.** The dilation of a result is the gcd of all tap offsets, so dilated or
  strided chains stay dilated and compact; its ``groups`` is the largest block-diagonal channel
  structure implied *structurally* by the operands' groups (never by numerical zeros).

Errors are :class:`~fxcompress.errors.InvalidArgument`, a :class:`ValueError`.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxcompress.errors import InvalidArgument

__all__ = [
    "ConvParams",
    "LinearParams",
    "add_parallel",
    "batchnorm_as_conv",
    "compose",
    "compose_linear",
    "conv_to_dense_weight",
    "fold_bn",
    "fold_bn_before",
    "identity",
]

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_MODULES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _int_tuple(name: str, value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Normalise an int or a sequence of ints to a tuple of ``ndim`` Python ints."""
    bad = InvalidArgument(f"{name} must be an int or {ndim} ints (one per axis), got {value!r}")
    if isinstance(value, bool):
        raise bad
    try:
        return (operator.index(value),) * ndim  # type: ignore[arg-type]
    except TypeError:
        pass
    try:
        items = tuple(value)  # type: ignore[arg-type]
        if len(items) != ndim or any(isinstance(v, bool) for v in items):
            raise bad
        return tuple(operator.index(v) for v in items)
    except TypeError:
        raise bad from None


def _f64(t: Tensor) -> Tensor:
    """A float64 copy of ``t`` that shares no storage with it."""
    return t.detach().to(torch.float64, copy=True)


def _spatial_dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(2, ndim + 2))


@dataclass(frozen=True, eq=False, repr=False)
class ConvParams:
    """A convolution ``y = conv(x)`` with ``N = weight.dim() - 2`` spatial axes, ``N`` in 1..3.

    Output position ``i`` along an axis reads input positions
    ``i * stride - padding + t * dilation`` for ``t = 0 .. k-1``; input positions outside
    ``[0, n)`` read zero. ``padding`` is symmetric per axis and may be negative: a negative
    padding crops that many positions from each side of the input before convolving.

    Parameters
    ----------
    weight : Tensor
        Shape ``(C_out, C_in // groups, *kernel_size)``.
    bias : Tensor or None
        Shape ``(C_out,)``.
    stride, padding, dilation : tuple of int
        One entry per spatial axis (an int is broadcast). ``stride`` and ``dilation`` are >= 1.
    groups : int
        Divides ``C_out``; ``C_in = groups * weight.shape[1]``.

    Raises
    ------
    ValueError
        If a shape or a hyper-parameter is inconsistent; the message names it.

    Examples
    --------
    >>> p = ConvParams(torch.ones(4, 1, 3, 3), None, stride=1, padding=-1, dilation=1, groups=4)
    >>> p.in_channels, p.out_channels, p.kernel_size, p.padding
    (4, 4, (3, 3), (-1, -1))
    >>> p.output_size((10, 9))
    (6, 5)
    >>> p.apply(torch.ones(1, 4, 10, 9)).shape
    torch.Size([1, 4, 6, 5])
    """

    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1

    def __post_init__(self) -> None:
        w = self.weight
        if not isinstance(w, Tensor):
            raise InvalidArgument(f"weight must be a Tensor, got {type(w).__name__}")
        if w.dim() not in (3, 4, 5):
            raise InvalidArgument(
                f"weight must have 3, 4 or 5 dims (C_out, C_in/groups, *kernel), "
                f"got shape {tuple(w.shape)}"
            )
        ndim = w.dim() - 2
        if any(s < 1 for s in w.shape):
            raise InvalidArgument(f"weight has an empty dimension: shape {tuple(w.shape)}")
        for name in ("stride", "padding", "dilation"):
            object.__setattr__(self, name, _int_tuple(name, getattr(self, name), ndim))
        if any(s < 1 for s in self.stride):
            raise InvalidArgument(f"stride must be >= 1 on every axis, got {self.stride}")
        if any(d < 1 for d in self.dilation):
            raise InvalidArgument(f"dilation must be >= 1 on every axis, got {self.dilation}")
        groups = self.groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise InvalidArgument(f"groups must be a positive int, got {groups!r}")
        if w.shape[0] % groups:
            raise InvalidArgument(f"groups={groups} does not divide out_channels={w.shape[0]}")
        b = self.bias
        if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (w.shape[0],)):
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise InvalidArgument(f"bias must be None or of shape ({w.shape[0]},), got {shape}")

    def __repr__(self) -> str:
        return (
            f"ConvParams(weight={tuple(self.weight.shape)} {self.weight.dtype}, "
            f"bias={self.bias is not None}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups})"
        )

    @property
    def ndim(self) -> int:
        """Number of spatial axes ``N``."""
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        """``C_out``."""
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        """``C_in = groups * weight.shape[1]``."""
        return int(self.weight.shape[1]) * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """Number of taps per spatial axis."""
        return tuple(int(k) for k in self.weight.shape[2:])

    @classmethod
    def from_module(cls, conv: nn.Module) -> ConvParams:
        """Read the parameters of an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.

        The tensors are copied (detached), so the result does not alias the module.

        Parameters
        ----------
        conv : nn.Conv1d or nn.Conv2d or nn.Conv3d
            With ``padding_mode="zeros"``. A string padding is resolved: ``"valid"`` is 0 and
            ``"same"`` is ``dilation * (k - 1) / 2`` where that is an integer on every axis.

        Raises
        ------
        ValueError
            For another module type, another ``padding_mode``, or a ``"same"`` padding that
            would be asymmetric.

        Examples
        --------
        >>> m = nn.Conv2d(2, 4, (3, 5), padding="same", dilation=(1, 2))
        >>> ConvParams.from_module(m).padding
        (1, 4)
        """
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise InvalidArgument(
                f"expected nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}"
            )
        if conv.padding_mode != "zeros":
            raise InvalidArgument(
                f"only padding_mode='zeros' is supported, got {conv.padding_mode!r}"
            )
        kernel = tuple(conv.kernel_size)
        dilation = tuple(conv.dilation)
        padding: tuple[int, ...]
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                padding = (0,) * len(kernel)
            elif conv.padding == "same":
                total = [d * (k - 1) for d, k in zip(dilation, kernel)]
                if any(t % 2 for t in total):
                    raise InvalidArgument(
                        f"padding='same' with kernel_size={kernel} and dilation={dilation} "
                        f"needs asymmetric padding (total {tuple(total)}), which ConvParams "
                        "cannot express"
                    )
                padding = tuple(t // 2 for t in total)
            else:
                raise InvalidArgument(f"unknown padding string {conv.padding!r}")
        else:
            padding = tuple(conv.padding)
        bias = None if conv.bias is None else conv.bias.detach().clone()
        return cls(
            weight=conv.weight.detach().clone(),
            bias=bias,
            stride=tuple(conv.stride),
            padding=padding,
            dilation=dilation,
            groups=conv.groups,
        )

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for the spatial input size ``input_size``.

        Raises
        ------
        ValueError
            If the input is too small to produce one output position on some axis.

        Examples
        --------
        >>> p = ConvParams(torch.ones(1, 1, 3), None, stride=2, padding=1, dilation=1)
        >>> p.output_size((7,))
        (4,)
        """
        sizes = tuple(int(n) for n in input_size)
        if len(sizes) != self.ndim:
            raise InvalidArgument(f"input_size must have {self.ndim} entries, got {sizes}")
        out = []
        for n, k, s, p, d in zip(sizes, self.kernel_size, self.stride, self.padding, self.dilation):
            span = n + 2 * p - d * (k - 1)
            if n < 1 or span < 1:
                raise InvalidArgument(
                    f"input size {sizes} is too small for kernel {self.kernel_size}, "
                    f"padding {self.padding}, dilation {self.dilation}"
                )
            out.append((span - 1) // s + 1)
        return tuple(out)

    def apply(self, x: Tensor) -> Tensor:
        """Reference forward pass (negative padding is applied as a crop).

        Parameters
        ----------
        x : Tensor
            ``(B, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``, same dtype as the weight.

        Examples
        --------
        >>> p = ConvParams(torch.ones(1, 1, 1), None, stride=1, padding=-1, dilation=1)
        >>> p.apply(torch.arange(5.0).reshape(1, 1, 5))
        tensor([[[1., 2., 3.]]])
        """
        ndim = self.ndim
        if x.dim() not in (ndim + 1, ndim + 2):
            raise InvalidArgument(
                f"input must have {ndim + 1} or {ndim + 2} dims, got shape {tuple(x.shape)}"
            )
        self.output_size(tuple(x.shape[-ndim:]))
        crops = tuple(
            slice(-p, n + p) if p < 0 else slice(None)
            for p, n in zip(self.padding, x.shape[-ndim:])
        )
        if any(p < 0 for p in self.padding):
            x = x[(..., *crops)]
        return _CONV_FUNCTIONS[ndim](
            x,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=tuple(max(p, 0) for p in self.padding),
            dilation=self.dilation,
            groups=self.groups,
        )

    def to_module(self) -> nn.Module:
        """An ``nn.Conv{N}d`` holding copies of these tensors.

        Raises
        ------
        ValueError
            If some padding is negative (``nn.Conv{N}d`` cannot crop).

        Examples
        --------
        >>> m = nn.Conv1d(3, 6, 3, padding=1, groups=3)
        >>> m2 = ConvParams.from_module(m).to_module()
        >>> x = torch.randn(2, 3, 8)
        >>> torch.equal(m(x), m2(x))
        True
        """
        if any(p < 0 for p in self.padding):
            raise InvalidArgument(
                f"nn.Conv{self.ndim}d cannot express negative padding {self.padding}"
            )
        module = _CONV_MODULES[self.ndim](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            module.weight.copy_(self.weight)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> ConvParams:
        """The same convolution with tensors converted to ``dtype`` and/or ``device``.

        Examples
        --------
        >>> ConvParams(torch.ones(1, 1, 1), None, 1, 0, 1).to(torch.float64).weight.dtype
        torch.float64
        """
        return ConvParams(
            self.weight.to(device=device, dtype=dtype),
            None if self.bias is None else self.bias.to(device=device, dtype=dtype),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


@dataclass(frozen=True, eq=False, repr=False)
class LinearParams:
    """A linear layer ``y = x @ weight.T + bias``.

    Parameters
    ----------
    weight : Tensor
        Shape ``(out_features, in_features)``.
    bias : Tensor or None
        Shape ``(out_features,)``.

    Examples
    --------
    >>> p = LinearParams(torch.eye(3), torch.ones(3))
    >>> p.apply(torch.zeros(2, 3))
    tensor([[1., 1., 1.],
            [1., 1., 1.]])
    """

    weight: Tensor
    bias: Tensor | None

    def __post_init__(self) -> None:
        w = self.weight
        if not isinstance(w, Tensor) or w.dim() != 2:
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise InvalidArgument(f"weight must be a 2-d Tensor (out, in), got {shape}")
        b = self.bias
        if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (w.shape[0],)):
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise InvalidArgument(f"bias must be None or of shape ({w.shape[0]},), got {shape}")

    def __repr__(self) -> str:
        return (
            f"LinearParams(weight={tuple(self.weight.shape)} {self.weight.dtype}, "
            f"bias={self.bias is not None})"
        )

    @property
    def in_features(self) -> int:
        """Input width."""
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        """Output width."""
        return int(self.weight.shape[0])

    @classmethod
    def from_module(cls, linear: nn.Module) -> LinearParams:
        """Copy the parameters of an ``nn.Linear``.

        Examples
        --------
        >>> LinearParams.from_module(nn.Linear(4, 2)).weight.shape
        torch.Size([2, 4])
        """
        if not isinstance(linear, nn.Linear):
            raise InvalidArgument(f"expected nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.weight.detach().clone(), bias)

    def apply(self, x: Tensor) -> Tensor:
        """Reference forward pass, ``F.linear(x, weight, bias)``."""
        return F.linear(x, self.weight, self.bias)

    def to_module(self) -> nn.Linear:
        """An ``nn.Linear`` holding copies of these tensors.

        Examples
        --------
        >>> LinearParams(torch.eye(2), None).to_module()
        Linear(in_features=2, out_features=2, bias=False)
        """
        module = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            module.weight.copy_(self.weight)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> LinearParams:
        """The same layer with tensors converted to ``dtype`` and/or ``device``."""
        return LinearParams(
            self.weight.to(device=device, dtype=dtype),
            None if self.bias is None else self.bias.to(device=device, dtype=dtype),
        )


# --------------------------------------------------------------------------------------------
# Channel structure.
#
# A grouped conv connects output channel o to the contiguous input interval
# [lo(o), lo(o) + C_in/groups) with lo(o) = (o // (C_out/groups)) * (C_in/groups). Sums and
# compositions of such layers still connect each output to one contiguous interval (the union of
# overlapping intervals, resp. of consecutive ones), so (lo, hi) per output channel describes the
# structural connectivity exactly, and the largest block-diagonal `groups` follows from it.
# --------------------------------------------------------------------------------------------


def _intervals(p: ConvParams) -> tuple[Tensor, Tensor]:
    """Per output channel, the half-open interval of input channels it is connected to."""
    cout_g = p.out_channels // p.groups
    cin_g = p.in_channels // p.groups
    lo = (torch.arange(p.out_channels) // cout_g) * cin_g
    return lo, lo + cin_g


def _largest_groups(lo: Tensor, hi: Tensor, in_channels: int) -> int:
    """Largest ``g`` such that every output's interval lies inside its diagonal block."""
    out_channels = lo.numel()
    common = math.gcd(out_channels, in_channels)
    outs = torch.arange(out_channels)
    for g in sorted((g for g in range(1, common + 1) if common % g == 0), reverse=True):
        block = outs // (out_channels // g)
        width = in_channels // g
        if bool(((lo >= block * width) & (hi <= (block + 1) * width)).all()):
            return g
    return 1  # pragma: no cover - g = 1 always satisfies the test


def _embed_channels(w: Tensor, lo: Tensor, cin_r: int) -> Tensor:
    """Place ``w`` (``C, cin_g, *k``) into ``(C, cin_r, *k)`` at in-channel offsets ``lo % cin_r``.

    ``lo[c]`` is the first input channel of channel ``c``; the caller guarantees that
    ``[lo, lo + cin_g)`` does not cross a multiple of ``cin_r``.
    """
    rows, cin_g = int(w.shape[0]), int(w.shape[1])
    if cin_g == cin_r:
        return w
    offset = lo % cin_r
    index = offset[:, None] + torch.arange(cin_g)[None, :]
    index = index.reshape(rows, cin_g, *([1] * (w.dim() - 2))).expand_as(w).to(w.device)
    out = torch.zeros((rows, cin_r, *w.shape[2:]), dtype=w.dtype, device=w.device)
    return out.scatter(1, index, w)


def conv_to_dense_weight(p: ConvParams) -> Tensor:
    """The ``(C_out, C_in, *kernel)`` weight of ``p`` as an ungrouped convolution.

    Structurally absent (cross-group) connections are zero; dtype and device are unchanged.

    Examples
    --------
    >>> p = ConvParams(torch.ones(2, 1, 1), None, stride=1, padding=0, dilation=1, groups=2)
    >>> conv_to_dense_weight(p)[..., 0]
    tensor([[1., 0.],
            [0., 1.]])
    """
    lo, _ = _intervals(p)
    return _embed_channels(p.weight.detach().clone(), lo, p.in_channels)


# --------------------------------------------------------------------------------------------
# Constructors and BatchNorm folding.
# --------------------------------------------------------------------------------------------


def identity(
    channels: int,
    ndim: int,
    *,
    padding: int | Sequence[int] = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ConvParams:
    """The depthwise identity convolution (one tap per axis, weight 1, no bias, stride 1).

    A negative ``padding`` gives a cropped identity: output position ``i`` is input position
    ``i - padding``. ``add_parallel(conv, identity(C, N))`` folds a residual skip.

    Examples
    --------
    >>> skip = identity(3, 2, padding=-1)
    >>> skip.kernel_size, skip.padding, skip.groups
    ((1, 1), (-1, -1), 3)
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise InvalidArgument(f"channels must be a positive int, got {channels!r}")
    if ndim not in (1, 2, 3):
        raise InvalidArgument(f"ndim must be 1, 2 or 3, got {ndim!r}")
    weight = torch.ones((channels, 1, *([1] * ndim)), dtype=dtype, device=device)
    return ConvParams(weight, None, 1, _int_tuple("padding", padding, ndim), 1, channels)


def _bn_scale_shift(
    channels: int,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` in float64 with ``bn(x) = x * scale + shift`` per channel."""
    for name, t in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise InvalidArgument(
                f"BatchNorm {name} must have shape ({channels},), got {tuple(t.shape)}"
            )
    if not eps >= 0:
        raise InvalidArgument(f"eps must be >= 0, got {eps!r}")
    scale = torch.rsqrt(_f64(var) + float(eps))
    if weight is not None:
        scale = scale * _f64(weight)
    shift = -_f64(mean) * scale
    if bias is not None:
        shift = shift + _f64(bias)
    return scale, shift


def fold_bn(
    layer: ConvParams | LinearParams,
    *,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> ConvParams | LinearParams:
    """Fold an eval-mode BatchNorm that runs *after* ``layer`` into ``layer``.

    With ``scale = weight / sqrt(var + eps)`` per output channel: ``W <- W * scale`` and
    ``b <- (b - mean) * scale + bias``. ``weight``/``bias`` of None mean ``affine=False``.
    The result always has a bias.

    Examples
    --------
    >>> lin = LinearParams(torch.eye(2), None)
    >>> f = fold_bn(lin, mean=torch.ones(2), var=torch.full((2,), 4.0), weight=None,
    ...             bias=torch.zeros(2), eps=0.0)
    >>> f.weight, f.bias
    (tensor([[0.5000, 0.0000],
            [0.0000, 0.5000]]), tensor([-0.5000, -0.5000]))
    """
    w = layer.weight
    channels = int(w.shape[0])
    scale, shift = _bn_scale_shift(channels, mean, var, weight, bias, eps)
    new_w = _f64(w) * scale.to(w.device).reshape(channels, *([1] * (w.dim() - 1)))
    b = torch.zeros(channels, dtype=torch.float64) if layer.bias is None else _f64(layer.bias)
    new_b = b.to(w.device) * scale.to(w.device) + shift.to(w.device)
    new_w, new_b = new_w.to(w.dtype), new_b.to(w.dtype)
    if isinstance(layer, LinearParams):
        return LinearParams(new_w, new_b)
    return ConvParams(new_w, new_b, layer.stride, layer.padding, layer.dilation, layer.groups)


def fold_bn_before(
    layer: ConvParams | LinearParams,
    *,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> ConvParams | LinearParams:
    """Fold an eval-mode BatchNorm on ``layer``'s *input* channels into ``layer``.

    ``layer(bn(x)) == fold_bn_before(layer, ...)(x)``. For a convolution this is exact only
    without zero padding (zeros padded after the BatchNorm are not the BatchNorm of anything), so
    every padding must be ``<= 0``.

    Raises
    ------
    ValueError
        If the convolution has a positive padding, or the statistics have the wrong shape.

    Examples
    --------
    >>> conv = ConvParams(torch.ones(1, 2, 1), None, stride=1, padding=0, dilation=1)
    >>> f = fold_bn_before(conv, mean=torch.zeros(2), var=torch.ones(2),
    ...                    weight=torch.tensor([2.0, 3.0]), bias=torch.ones(2), eps=0.0)
    >>> f.weight.flatten().tolist(), f.bias.tolist()
    ([2.0, 3.0], [2.0])
    """
    w = layer.weight
    if isinstance(layer, LinearParams):
        scale, shift = _bn_scale_shift(layer.in_features, mean, var, weight, bias, eps)
        w64 = _f64(w)
        new_w = w64 * scale.to(w.device)[None, :]
        new_b = w64 @ shift.to(w.device)
        if layer.bias is not None:
            new_b = new_b + _f64(layer.bias)
        return LinearParams(new_w.to(w.dtype), new_b.to(w.dtype))
    if any(p > 0 for p in layer.padding):
        raise InvalidArgument(
            f"cannot fold a BatchNorm into the input of a conv with padding {layer.padding}: "
            "the zero padding would be applied after the BatchNorm, so the fold is not exact"
        )
    scale, shift = _bn_scale_shift(layer.in_channels, mean, var, weight, bias, eps)
    lo, _ = _intervals(layer)
    channel = lo[:, None] + torch.arange(w.shape[1])[None, :]  # (C_out, C_in/groups)
    extra = [1] * (w.dim() - 2)
    w64 = _f64(w)
    new_w = w64 * scale[channel].reshape(*channel.shape, *extra).to(w.device)
    new_b = (w64.sum(dim=_spatial_dims(layer.ndim)) * shift[channel].to(w.device)).sum(dim=1)
    if layer.bias is not None:
        new_b = new_b + _f64(layer.bias)
    return ConvParams(
        new_w.to(w.dtype),
        new_b.to(w.dtype),
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
    )


def batchnorm_as_conv(
    ndim: int,
    *,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> ConvParams:
    """An eval-mode BatchNorm as a depthwise 1x1 convolution with ``ndim`` spatial axes.

    BatchNorm is a per-channel affine map ``x * scale + shift`` (``scale = weight /
    sqrt(var + eps)``, ``shift = bias - mean * scale``): a diagonal 1x1 convolution, with
    ``groups = C``, weight ``scale`` and bias ``shift``. It applies to inputs whose channel
    axis is the BatchNorm's (axis 1, i.e. batched ``(N, C, *spatial)`` inputs). As a
    convolution it can be summed with parallel branches (:func:`add_parallel`, structural
    re-parameterisation of RepVGG-style blocks) or composed with neighbouring convolutions.
    The result has the dtype and device of ``mean``.

    Raises
    ------
    ValueError
        If ``ndim`` is not 1, 2 or 3, ``mean`` is not one-dimensional, or the statistics'
        shapes or ``eps`` are invalid.

    Examples
    --------
    >>> mean, var = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.25])
    >>> conv = batchnorm_as_conv(2, mean=mean, var=var, weight=None, bias=None, eps=0.0)
    >>> conv.kernel_size, conv.groups, conv.weight.flatten().tolist(), conv.bias.tolist()
    ((1, 1), 2, [0.5, 2.0], [-0.5, 4.0])
    """
    if ndim not in (1, 2, 3) or isinstance(ndim, bool):
        raise InvalidArgument(f"ndim must be 1, 2 or 3, got {ndim!r}")
    if not isinstance(mean, Tensor) or mean.dim() != 1 or mean.numel() < 1:
        shape = tuple(mean.shape) if isinstance(mean, Tensor) else type(mean).__name__
        raise InvalidArgument(f"BatchNorm mean must be a non-empty 1-d Tensor, got {shape}")
    channels = int(mean.shape[0])
    scale, shift = _bn_scale_shift(channels, mean, var, weight, bias, eps)
    dtype, device = mean.dtype, mean.device
    w = scale.reshape(channels, 1, *([1] * ndim)).to(dtype=dtype, device=device)
    return ConvParams(w, shift.to(dtype=dtype, device=device), 1, 0, 1, channels)


# --------------------------------------------------------------------------------------------
# Composition and parallel sums.
# --------------------------------------------------------------------------------------------


def compose(first: ConvParams, second: ConvParams) -> ConvParams:
    """One convolution equal to ``second(first(x))`` for every input ``x``.

    Per axis, with ``first = (k1, s1, p1, d1)`` and ``second = (k2, s2, p2, d2)``, the result
    has stride ``s1 * s2``, padding ``p1 + s1 * p2`` and taps at offsets
    ``d1 * t + s1 * d2 * u``; its dilation is the gcd of those offsets (so
    ``gcd(d1, s1 * d2)``, where an axis with a single tap does not constrain it). The weight is
    ``W[o, i] = sum_{m, u} W2[o, m, u] * shift(W1[m, i], s1 * d2 * u)`` and the bias is
    ``b2 + sum_{m, u} W2[o, m, u] * b1[m]`` (None only if both biases are None).
    The result's ``groups`` is the largest block-diagonal structure of the composed channel
    connectivity: depthwise after depthwise stays depthwise, dense anywhere makes it dense.

    Parameters
    ----------
    first : ConvParams
        Any padding, including negative (a crop).
    second : ConvParams
        ``second.in_channels == first.out_channels`` and the same number of spatial axes.
        ``padding <= 0`` (a crop) on every axis, or ``padding > 0`` on an axis where ``first``
        has no bias and ``first.padding >= first.dilation * (first.kernel_size - 1)``: then
        every intermediate position that ``second`` pads is one that ``first`` computes as zero
        from padding alone, so the padding moves onto the input exactly.

    Raises
    ------
    ValueError
        If ``second`` has a positive padding other than in the case above: its zeros would be
        padded onto the intermediate map, and such a zero is not a convolution of the input, so
        no single convolution is equal. Also for mismatched channels or numbers of axes.

    Examples
    --------
    >>> f64 = torch.float64
    >>> a = ConvParams(torch.randn(4, 1, 3, 3, dtype=f64), torch.randn(4, dtype=f64), 1, 1, 1, 4)
    >>> b = ConvParams(torch.randn(4, 1, 3, 3, dtype=f64), None, 2, 0, 1, groups=4)
    >>> c = compose(a, b)
    >>> c.kernel_size, c.stride, c.padding, c.groups
    ((5, 5), (2, 2), (1, 1), 4)
    >>> x = torch.randn(1, 4, 9, 9, dtype=f64)
    >>> torch.allclose(c.apply(x), b.apply(a.apply(x)))
    True
    """
    if first.ndim != second.ndim:
        raise InvalidArgument(f"cannot compose a {first.ndim}-d conv with a {second.ndim}-d conv")
    if first.out_channels != second.in_channels:
        raise InvalidArgument(
            f"first.out_channels={first.out_channels} != second.in_channels={second.in_channels}"
        )
    for ax, pad2 in enumerate(second.padding):
        reach = first.dilation[ax] * (first.kernel_size[ax] - 1)
        if pad2 > 0 and (first.bias is not None or first.padding[ax] < reach):
            why = "has a bias" if first.bias is not None else f"pads {first.padding[ax]} < {reach}"
            raise InvalidArgument(
                f"second conv has padding {second.padding}: zero padding of the intermediate map "
                f"is not representable by one convolution of the input (the first conv {why}, "
                "so it does not compute zeros there); use padding <= 0 on the second conv"
            )
    ndim = first.ndim
    k1, k2 = first.kernel_size, second.kernel_size
    stride, padding, dilation, ratio1, ratio2, kernel = [], [], [], [], [], []
    for ax in range(ndim):
        s1, d1, d2 = first.stride[ax], first.dilation[ax], second.dilation[ax]
        step1 = d1 if k1[ax] > 1 else 0
        step2 = s1 * d2 if k2[ax] > 1 else 0
        dil = math.gcd(step1, step2) or 1
        stride.append(s1 * second.stride[ax])
        padding.append(first.padding[ax] + s1 * second.padding[ax])
        dilation.append(dil)
        ratio1.append(step1 // dil)
        ratio2.append(step2 // dil)
        kernel.append(ratio1[-1] * (k1[ax] - 1) + ratio2[-1] * (k2[ax] - 1) + 1)

    # Channel structure of the result.
    c_in, c_mid, c_out = first.in_channels, first.out_channels, second.out_channels
    lo1, hi1 = _intervals(first)
    g2 = second.groups
    mid_g = c_mid // g2
    mid_lo = (torch.arange(c_out) // (c_out // g2)) * mid_g
    lo, hi = lo1[mid_lo], hi1[mid_lo + mid_g - 1]
    groups = _largest_groups(lo, hi, c_in)
    cin_r = c_in // groups

    dtype, device = first.weight.dtype, first.weight.device
    w1 = _embed_channels(_f64(first.weight), lo1, cin_r)  # (C_mid, cin_r, *k1)
    w2 = _f64(second.weight).to(device)  # (C_out, C_mid/g2, *k2)
    w1_blocks = w1.reshape(g2, mid_g, -1)
    out = torch.zeros((c_out, cin_r, *kernel), dtype=torch.float64, device=device)
    for taps in itertools.product(*(range(k) for k in k2)):
        w2_tap = w2[(slice(None), slice(None), *taps)].reshape(g2, c_out // g2, mid_g)
        term = torch.bmm(w2_tap, w1_blocks).reshape(c_out, cin_r, *k1)
        where = tuple(
            slice(u * r2, u * r2 + r1 * (k - 1) + 1, max(r1, 1))
            for u, r1, r2, k in zip(taps, ratio1, ratio2, k1)
        )
        out[(slice(None), slice(None), *where)] += term

    bias = None
    if first.bias is not None or second.bias is not None:
        bias = torch.zeros(c_out, dtype=torch.float64, device=device)
        if second.bias is not None:
            bias += _f64(second.bias).to(device)
        if first.bias is not None:
            w2_sum = w2.sum(dim=_spatial_dims(ndim))  # (C_out, C_mid/g2)
            b1 = _f64(first.bias).to(device)[mid_lo[:, None] + torch.arange(mid_g)[None, :]]
            bias += (w2_sum * b1).sum(dim=1)
        bias = bias.to(dtype)
    return ConvParams(out.to(dtype), bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def add_parallel(a: ConvParams, b: ConvParams, *more: ConvParams) -> ConvParams:
    """One convolution equal to ``a(x) + b(x) + ...`` for every input ``x``.

    Per axis, operand ``j`` reads offsets ``-p_j + t * d_j`` relative to ``i * stride``; all tap
    sets are embedded in one kernel with padding ``max_j p_j`` and dilation the gcd of the
    dilations and of the offset differences (an axis with a single tap does not constrain it).
    ``groups`` is the largest block-diagonal structure containing every operand's channel
    connectivity. The sum is taken in float64 over all operands at once (a structural
    re-parameterisation such as RepVGG's ``conv3x3 + conv1x1 + BN`` is one call), then cast to
    the dtype of ``a``. On the ``meta`` device only the geometry is computed (to price a
    candidate without summing weights).

    Raises
    ------
    ValueError
        If the channels, the number of axes or the strides differ, or if the operands do not
        produce the same output size for every input size, i.e. ``2 * p - d * (k - 1)`` differs
        on some axis.

    Examples
    --------
    Fold a residual skip into a centred 3x3 convolution:

    >>> conv = ConvParams(torch.randn(3, 3, 3, 3, dtype=torch.float64), None, 1, 1, 1)
    >>> skip = add_parallel(conv, identity(3, 2))
    >>> skip.kernel_size, skip.padding, skip.groups
    ((3, 3), (1, 1), 1)
    >>> x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    >>> torch.allclose(skip.apply(x), conv.apply(x) + x)
    True

    A RepVGG block (3x3 + 1x1 + identity) is one 3x3 convolution:

    >>> one = ConvParams(torch.randn(3, 3, 1, 1, dtype=torch.float64), None, 1, 0, 1)
    >>> rep = add_parallel(conv, one, identity(3, 2, dtype=torch.float64))
    >>> torch.allclose(rep.apply(x), conv.apply(x) + one.apply(x) + x)
    True
    """
    operands = (a, b, *more)
    for p in operands[1:]:
        if p.ndim != a.ndim:
            raise InvalidArgument(f"cannot add a {a.ndim}-d conv and a {p.ndim}-d conv")
        if (p.in_channels, p.out_channels) != (a.in_channels, a.out_channels):
            raise InvalidArgument(
                f"channels differ: {a.in_channels}->{a.out_channels} vs "
                f"{p.in_channels}->{p.out_channels}"
            )
        if p.stride != a.stride:
            raise InvalidArgument(f"strides differ: {a.stride} vs {p.stride}")
    ndim = a.ndim
    padding, dilation, kernel = [], [], []
    places: list[list[tuple[int, int, int]]] = [[] for _ in operands]
    for ax in range(ndim):
        for p in operands[1:]:
            size_a = 2 * a.padding[ax] - a.dilation[ax] * (a.kernel_size[ax] - 1)
            size_p = 2 * p.padding[ax] - p.dilation[ax] * (p.kernel_size[ax] - 1)
            if size_a != size_p:
                raise InvalidArgument(
                    f"output sizes differ on axis {ax}: 2*padding - dilation*(kernel-1) is "
                    f"{size_a} vs {size_p} (padding {a.padding[ax]} vs {p.padding[ax]}, "
                    f"dilation {a.dilation[ax]} vs {p.dilation[ax]}, kernel "
                    f"{a.kernel_size[ax]} vs {p.kernel_size[ax]})"
                )
        pad = max(p.padding[ax] for p in operands)
        steps = [p.dilation[ax] if p.kernel_size[ax] > 1 else 0 for p in operands]
        dil = 0
        for p, step in zip(operands, steps):
            dil = math.gcd(dil, math.gcd(step, pad - p.padding[ax]))
        dil = dil or 1
        padding.append(pad)
        dilation.append(dil)
        extent = max(
            pad - p.padding[ax] + p.dilation[ax] * (p.kernel_size[ax] - 1) for p in operands
        )
        kernel.append(extent // dil + 1)
        for j, (p, step) in enumerate(zip(operands, steps)):
            places[j].append(((pad - p.padding[ax]) // dil, step // dil, p.kernel_size[ax]))

    lo, hi = _intervals(a)
    for p in operands[1:]:
        lo_p, hi_p = _intervals(p)
        lo, hi = torch.minimum(lo, lo_p), torch.maximum(hi, hi_p)
    groups = _largest_groups(lo, hi, a.in_channels)
    cin_r = a.in_channels // groups

    dtype, device = a.weight.dtype, a.weight.device
    if device.type == "meta":  # geometry only (e.g. to price candidates): nothing to sum
        return ConvParams(
            torch.empty((a.out_channels, cin_r, *kernel), dtype=dtype, device=device),
            None
            if all(p.bias is None for p in operands)
            else torch.empty(a.out_channels, dtype=dtype, device=device),
            a.stride,
            tuple(padding),
            tuple(dilation),
            groups,
        )
    out = torch.zeros((a.out_channels, cin_r, *kernel), dtype=torch.float64, device=device)
    for p, place in zip(operands, places):
        lo_p, _ = _intervals(p)
        w = _embed_channels(_f64(p.weight).to(device), lo_p, cin_r)
        where = tuple(
            slice(start, start + step * (k - 1) + 1, max(step, 1)) for start, step, k in place
        )
        out[(slice(None), slice(None), *where)] += w

    bias = None
    if any(p.bias is not None for p in operands):
        bias = torch.zeros(a.out_channels, dtype=torch.float64, device=device)
        for p in operands:
            if p.bias is not None:
                bias += _f64(p.bias).to(device)
        bias = bias.to(dtype)
    return ConvParams(out.to(dtype), bias, a.stride, tuple(padding), tuple(dilation), groups)


def compose_linear(first: LinearParams, second: LinearParams) -> LinearParams:
    """One linear layer equal to ``second(first(x))``: ``W = W2 @ W1``, ``b = W2 @ b1 + b2``.

    Raises
    ------
    ValueError
        If ``first.out_features != second.in_features``.

    Examples
    --------
    >>> f = LinearParams(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0]))
    >>> s = LinearParams(torch.tensor([[3.0], [4.0]]), None)
    >>> c = compose_linear(f, s)
    >>> c.weight.tolist(), c.bias.tolist()
    ([[3.0, 6.0], [4.0, 8.0]], [3.0, 4.0])
    """
    if first.out_features != second.in_features:
        raise InvalidArgument(
            f"first.out_features={first.out_features} != second.in_features={second.in_features}"
        )
    dtype, device = first.weight.dtype, first.weight.device
    w1 = _f64(first.weight)
    w2 = _f64(second.weight).to(device)
    bias = None
    if first.bias is not None or second.bias is not None:
        bias = torch.zeros(second.out_features, dtype=torch.float64, device=device)
        if first.bias is not None:
            bias += w2 @ _f64(first.bias)
        if second.bias is not None:
            bias += _f64(second.bias).to(device)
        bias = bias.to(dtype)
    return LinearParams((w2 @ w1).to(dtype), bias)
