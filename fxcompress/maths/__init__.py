"""Exact algebra of convolution and linear layers: composition, parallel sums, BatchNorm folding.

Modules: :mod:`.params` (:class:`ConvParams`, :class:`LinearParams`), :mod:`.channels` (group
structure), :mod:`.batchnorm` (folds), :mod:`.composition` (``compose``, ``add_parallel``).

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

from fxcompress.maths.batchnorm import batchnorm_as_conv, fold_bn, fold_bn_before, identity
from fxcompress.maths.channels import conv_to_dense_weight
from fxcompress.maths.composition import add_parallel, compose, compose_linear
from fxcompress.maths.params import ConvParams, LinearParams

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
