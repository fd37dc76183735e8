"""Constructors and BatchNorm folding: identity convs, BN folded after or before a layer, and a
BatchNorm on its own as a depthwise 1x1 conv.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fxcompress.errors import InvalidArgument
from fxcompress.maths.channels import intervals
from fxcompress.maths.params import ConvParams, LinearParams, f64, int_tuple, spatial_dims

__all__ = ["batchnorm_as_conv", "fold_bn", "fold_bn_before", "identity"]


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
    return ConvParams(weight, None, 1, int_tuple("padding", padding, ndim), 1, channels)


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
    scale = torch.rsqrt(f64(var) + float(eps))
    if weight is not None:
        scale = scale * f64(weight)
    shift = -f64(mean) * scale
    if bias is not None:
        shift = shift + f64(bias)
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
    new_w = f64(w) * scale.to(w.device).reshape(channels, *([1] * (w.dim() - 1)))
    b = torch.zeros(channels, dtype=torch.float64) if layer.bias is None else f64(layer.bias)
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
        w64 = f64(w)
        new_w = w64 * scale.to(w.device)[None, :]
        new_b = w64 @ shift.to(w.device)
        if layer.bias is not None:
            new_b = new_b + f64(layer.bias)
        return LinearParams(new_w.to(w.dtype), new_b.to(w.dtype))
    if any(p > 0 for p in layer.padding):
        raise InvalidArgument(
            f"cannot fold a BatchNorm into the input of a conv with padding {layer.padding}: "
            "the zero padding would be applied after the BatchNorm, so the fold is not exact"
        )
    scale, shift = _bn_scale_shift(layer.in_channels, mean, var, weight, bias, eps)
    lo, _ = intervals(layer)
    channel = lo[:, None] + torch.arange(w.shape[1])[None, :]  # (C_out, C_in/groups)
    extra = [1] * (w.dim() - 2)
    w64 = f64(w)
    new_w = w64 * scale[channel].reshape(*channel.shape, *extra).to(w.device)
    new_b = (w64.sum(dim=spatial_dims(layer.ndim)) * shift[channel].to(w.device)).sum(dim=1)
    if layer.bias is not None:
        new_b = new_b + f64(layer.bias)
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
