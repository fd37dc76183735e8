"""The value objects of the weight algebra: :class:`ConvParams` and :class:`LinearParams`.

Also the small helpers every module of :mod:`fxcompress.maths` shares (float64 copies, axis
tuples). The invariants of the algebra are listed in :mod:`fxcompress.maths`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxcompress.errors import InvalidArgument

__all__ = ["ConvParams", "LinearParams", "f64", "int_tuple", "spatial_dims"]


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_MODULES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def int_tuple(name: str, value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
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


def f64(t: Tensor) -> Tensor:
    """A float64 copy of ``t`` that shares no storage with it."""
    return t.detach().to(torch.float64, copy=True)


def spatial_dims(ndim: int) -> tuple[int, ...]:
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
            object.__setattr__(self, name, int_tuple(name, getattr(self, name), ndim))
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
