"""The cheapest way to merge a linear run of layers: a partition chosen by dynamic programming.

A *linear run* is a sequence of layers ``L0, ..., L(n-1)`` of one kind (all convolutions or all
linear layers) in which each layer reads only the previous one's output, with nothing non-linear
in between. Any contiguous part ``Li .. L(j-1)`` then composes exactly into one layer (when its
geometry allows, see :func:`fxcompress.maths.compose`), and the run may be split into parts
that are each merged into one layer.

Merging is not monotone in the length of a part, so pairwise greedy merging misses the best
split. An inverted residual without activations (1×1 expand ``C -> tC``, depthwise 3×3,
1×1 project ``tC -> C``) costs ``t·C·(2C + 9)`` multiply-accumulates per position; either pair
merged is a dense 3×3 with ``9·t·C²``, costlier than the pair, but the whole run is one dense
3×3 ``C -> C`` with ``9·C²``, cheaper than the three layers for every ``t >= 1``.

:func:`cheapest_partition` finds the split of least total cost over positions ``0..n``
(``best[stop] = min over start of best[start] + cost(start, stop)``), with ``O(n²)`` calls of
the part cost; it is pure Python and knows nothing about layers. The cost of a part comes from
the composed layer: :func:`layer_macs` (multiply-accumulates at the traced shape, the default of
:func:`fxcompress.merge`) or :func:`latency_cost` (a :class:`~fxcompress.latency.LatencyTable`'s
price of the layer as an :class:`~fxcompress.latency.OpSpec`).

Examples
--------
The inverted residual above with ``C = 8``, ``t = 6``, priced per output position (parts are
half-open ranges of layer indices):

>>> costs = {(0, 1): 8 * 48, (1, 2): 48 * 9, (2, 3): 48 * 8,     # the layers alone
...          (0, 2): 9 * 8 * 48, (1, 3): 9 * 48 * 8,             # either pair merged
...          (0, 3): 9 * 8 * 8}                                  # the whole run
>>> cheapest_partition(3, lambda start, stop: costs[start, stop])
((0, 3),)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Sequence

import torch

from fxcompress.errors import InvalidArgument
from fxcompress.latency import LatencyTable, OpSpec
from fxcompress.maths import ConvParams, LinearParams

__all__ = [
    "LayerCost",
    "cheapest_partition",
    "composed_geometry",
    "latency_cost",
    "layer_macs",
    "layer_spec",
]

Part = tuple[int, int]

#: ``cost(layer, input_shape, output_shape) -> float``: the price of running ``layer`` (a
#: :class:`~fxcompress.maths.ConvParams` or
#: :class:`~fxcompress.maths.LinearParams`, whose
#: tensors may live on the ``meta`` device) on an input of ``input_shape``, giving
#: ``output_shape``. ``math.inf`` means "never build this layer".
LayerCost = Callable[[ConvParams | LinearParams, tuple[int, ...], tuple[int, ...]], float]


def cheapest_partition(
    n: int,
    cost: Callable[[int, int], float],
    *,
    joined: Collection[int] = (),
    fewest_parts: bool = False,
) -> tuple[Part, ...]:
    """Split ``range(n)`` into contiguous parts of least total ``cost``.

    Partitions are compared by, in order: how many boundaries in ``joined`` they cut, then
    the total cost and the number of parts (fewer parts first: one layer fewer is one kernel
    launch fewer at the same cost), or with ``fewest_parts`` the number of parts, then the cost.
    The all-singletons partition is always a candidate, so without ``joined`` the result never
    costs more than keeping every layer apart.

    Parameters
    ----------
    n : int
        Number of layers, ``>= 0``.
    cost : callable
        ``cost(start, stop)`` is the cost of layers ``start .. stop - 1`` merged into one layer:
        a real number, ``math.inf`` if they cannot be merged. Called once for each of the
        ``n·(n+1)/2`` parts. Singletons must cost a finite amount.
    joined : collection of int
        Boundaries ``k`` (in ``1 .. n-1``, the boundary between layers ``k-1`` and ``k``) that
        should not be cut, e.g. because a planner chose to merge across them; cut only when no
        partition keeps them whole.
    fewest_parts : bool
        Merge as much as geometry allows, whatever it costs (cost only breaks ties).

    Returns
    -------
    tuple of (int, int)
        The parts ``(start, stop)``, half-open, in order, covering ``0 .. n``.

    Raises
    ------
    InvalidArgument
        If ``n`` or ``joined`` is out of range, or ``cost`` returns something other than a real
        number, NaN, or an infinite cost for a single layer.

    Examples
    --------
    >>> pair_cheaper = {(0, 1): 4, (1, 2): 4, (2, 3): 4, (0, 2): 5, (1, 3): 9, (0, 3): 13}
    >>> cheapest_partition(3, lambda i, j: pair_cheaper[i, j])
    ((0, 2), (2, 3))
    >>> cheapest_partition(3, lambda i, j: pair_cheaper[i, j], joined={2})
    ((0, 3),)
    >>> cheapest_partition(3, lambda i, j: pair_cheaper[i, j], fewest_parts=True)
    ((0, 3),)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgument(f"n must be an int >= 0 (the number of layers), got {n!r}")
    keep = frozenset(joined)
    bad = sorted(
        (k for k in keep if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < n),
        key=repr,
    )
    if bad:
        raise InvalidArgument(
            f"joined must hold boundaries 1..{n - 1} (between layers k-1 and k), got {bad!r}"
        )
    # best[stop] = (key, start of the last part) for the layers 0 .. stop-1; a key is
    # (cuts of joined boundaries, cost, parts), or (cuts, parts, cost) with fewest_parts
    best: list[tuple[tuple[float, ...], int]] = [((0, 0, 0), -1)]
    for stop in range(1, n + 1):
        choice: tuple[tuple[float, ...], int] | None = None
        for start in range(stop - 1, -1, -1):
            value = _checked(cost, start, stop)
            if value == math.inf:
                continue  # these layers cannot be one layer
            cut = 1 if start in keep else 0
            step = (cut, 1, value) if fewest_parts else (cut, value, 1)
            key = tuple(a + b for a, b in zip(best[start][0], step))
            if choice is None or key < choice[0]:
                choice = (key, start)
        assert choice is not None  # the singleton (stop - 1, stop) is finite
        best.append(choice)
    parts: list[Part] = []
    stop = n
    while stop > 0:
        start = best[stop][1]
        parts.append((start, stop))
        stop = start
    return tuple(reversed(parts))


def _checked(cost: Callable[[int, int], float], start: int, stop: int) -> float:
    value = cost(start, stop)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise InvalidArgument(
            f"cost({start}, {stop}) returned {value!r}; a part's cost must be a real number "
            "(math.inf if the layers cannot be merged)"
        )
    if stop - start == 1 and math.isinf(value):
        raise InvalidArgument(
            f"cost({start}, {stop}) returned {value!r} for a single layer; a layer kept as it "
            "is must have a finite cost"
        )
    return float(value)


def composed_geometry(
    first: ConvParams | LinearParams, second: ConvParams | LinearParams
) -> ConvParams | LinearParams:
    """The layer :func:`~fxcompress.maths.compose` (or ``compose_linear``) would return,
    with weights of the right shape on the ``meta`` device: its geometry without computing anything.

    A part's cost needs only its geometry; composing real weights for each of the ``O(n²)``
    candidate parts of a run would cost far more than the DP. The rules are those of
    :func:`~fxcompress.maths.compose`: per axis, stride ``s1·s2``, padding ``p1 + s1·p2``,
    taps at offsets ``d1·t + s1·d2·u`` on the grid of their gcd (the dilation); groups the
    largest block-diagonal structure containing the composed channel connectivity; a bias if
    either has one. A property test checks that both agree.

    Raises
    ------
    InvalidArgument
        Whenever :func:`~fxcompress.maths.compose` would: different numbers of axes or
        channels, or a positive padding of ``second`` that is not expressible on the input.

    Examples
    --------
    >>> import torch
    >>> expand = ConvParams(torch.ones(48, 8, 1, 1), torch.ones(48), 1, 0, 1)
    >>> dw = ConvParams(torch.ones(48, 1, 3, 3), torch.ones(48), 2, 0, 1, groups=48)
    >>> g = composed_geometry(expand, dw)
    >>> g.kernel_size, g.stride, g.groups, g.weight.device.type
    ((3, 3), (2, 2), 1, 'meta')
    """
    bias = first.bias is not None or second.bias is not None
    if isinstance(first, LinearParams) or isinstance(second, LinearParams):
        if not (isinstance(first, LinearParams) and isinstance(second, LinearParams)):
            raise InvalidArgument(
                f"cannot compose {type(first).__name__} with {type(second).__name__}"
            )
        if first.out_features != second.in_features:
            raise InvalidArgument(
                f"first.out_features={first.out_features} != "
                f"second.in_features={second.in_features}"
            )
        shape = (second.out_features, first.in_features)
        return LinearParams(
            _meta(shape, first), _meta(shape[:1], first) if bias else None
        )
    if first.ndim != second.ndim:
        raise InvalidArgument(f"cannot compose a {first.ndim}-d conv with a {second.ndim}-d conv")
    if first.out_channels != second.in_channels:
        raise InvalidArgument(
            f"first.out_channels={first.out_channels} != second.in_channels={second.in_channels}"
        )
    stride, padding, dilation, kernel = [], [], [], []
    for ax in range(first.ndim):
        k1, s1, p1, d1 = (first.kernel_size[ax], first.stride[ax], first.padding[ax],
                          first.dilation[ax])
        k2, s2, p2, d2 = (second.kernel_size[ax], second.stride[ax], second.padding[ax],
                          second.dilation[ax])
        if p2 > 0 and (first.bias is not None or p1 < d1 * (k1 - 1)):
            raise InvalidArgument(
                f"second conv has padding {second.padding}: zero padding of the intermediate "
                "map is not representable by one convolution of the input"
            )
        step1, step2 = (d1 if k1 > 1 else 0), (s1 * d2 if k2 > 1 else 0)
        dil = math.gcd(step1, step2) or 1
        stride.append(s1 * s2)
        padding.append(p1 + s1 * p2)
        dilation.append(dil)
        kernel.append(step1 // dil * (k1 - 1) + step2 // dil * (k2 - 1) + 1)
    groups = _composed_groups(first, second)
    c_out, c_in = second.out_channels, first.in_channels
    return ConvParams(
        _meta((c_out, c_in // groups, *kernel), first),
        _meta((c_out,), first) if bias else None,
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        groups,
    )


def _meta(shape: tuple[int, ...], like: ConvParams | LinearParams) -> torch.Tensor:
    return torch.empty(shape, dtype=like.weight.dtype, device="meta")


def _composed_groups(first: ConvParams, second: ConvParams) -> int:
    """Largest ``g`` whose block diagonal contains the channel connectivity of second∘first.

    Output channels of one group of ``second`` read one interval of ``first``'s outputs, which
    reads the union of the input intervals of ``first``'s groups it overlaps: one interval
    ``[lo, hi)`` per group of ``second``.
    """
    c_in, c_mid, c_out = first.in_channels, first.out_channels, second.out_channels
    mid1, in1 = c_mid // first.groups, c_in // first.groups  # per group of first
    out2, mid2 = c_out // second.groups, c_mid // second.groups  # per group of second
    reads = []  # (first output, last output, lo, hi) per group of second
    for b in range(second.groups):
        lo = (b * mid2 // mid1) * in1
        hi = (((b + 1) * mid2 - 1) // mid1 + 1) * in1
        reads.append((b * out2, (b + 1) * out2 - 1, lo, hi))
    common = math.gcd(c_out, c_in)
    for g in sorted((g for g in range(1, common + 1) if common % g == 0), reverse=True):
        per_out, width = c_out // g, c_in // g
        if all(
            lo >= (last // per_out) * width and hi <= (first_o // per_out + 1) * width
            for first_o, last, lo, hi in reads
        ):
            return g
    return 1  # pragma: no cover - g = 1 always fits


def layer_macs(
    layer: ConvParams | LinearParams,
    input_shape: Sequence[int],
    output_shape: Sequence[int],
) -> float:
    """Multiply-accumulates of ``layer`` producing ``output_shape`` (biases count zero).

    A convolution costs ``prod(output_shape) · C_in / groups · prod(kernel)`` (batched or not),
    a linear layer ``prod(output_shape) · in_features``: the count of
    :meth:`fxcompress.latency.OpSpec.macs` and of the report's MAC totals.

    Examples
    --------
    >>> import torch
    >>> dw = ConvParams(torch.ones(8, 1, 3, 3), None, stride=1, padding=1, dilation=1, groups=8)
    >>> layer_macs(dw, (1, 8, 5, 5), (1, 8, 5, 5))
    1800.0
    >>> layer_macs(LinearParams(torch.ones(4, 3), None), (2, 3), (2, 4))
    24.0
    """
    per_output = int(layer.weight.shape[1])
    if isinstance(layer, ConvParams):
        per_output *= math.prod(layer.kernel_size)
    return float(math.prod(int(s) for s in output_shape) * per_output)


def layer_spec(layer: ConvParams | LinearParams, input_shape: Sequence[int]) -> OpSpec:
    """``layer`` applied to ``input_shape`` as an :class:`~fxcompress.latency.OpSpec`.

    An unbatched convolution input ``(C, *spatial)`` is priced as a batch of one.

    Examples
    --------
    >>> import torch
    >>> conv = ConvParams(torch.ones(4, 2, 3, 3), torch.ones(4), 2, 1, 1, groups=1)
    >>> layer_spec(conv, (1, 2, 8, 8)).output_shape()
    (1, 4, 4, 4)
    """
    dtype = str(layer.weight.dtype).removeprefix("torch.")
    shape = tuple(int(s) for s in input_shape)
    if isinstance(layer, LinearParams):
        return OpSpec(
            "linear",
            shape,
            dtype=dtype,
            out_channels=layer.out_features,
            bias=layer.bias is not None,
        )
    if len(shape) == layer.ndim + 1:
        shape = (1, *shape)
    return OpSpec(
        "conv",
        shape,
        dtype=dtype,
        out_channels=layer.out_channels,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
    )


def latency_cost(table: LatencyTable) -> LayerCost:
    """A :data:`LayerCost` pricing each layer by ``table``, e.g. ``merge(gm, cost=...)``.

    Each candidate layer is looked up (``"measure"`` tables time it once, then cache it) as the
    :class:`~fxcompress.latency.OpSpec` of :func:`layer_spec`, without an activation: the
    activation after a run is the same however the run is split.

    Examples
    --------
    >>> import torch
    >>> table = LatencyTable(mode="flops")
    >>> price = latency_cost(table)
    >>> conv = ConvParams(torch.ones(8, 8, 1, 1), None, 1, 0, 1)
    >>> price(conv, (1, 8, 16, 16), (1, 8, 16, 16)) == table(layer_spec(conv, (1, 8, 16, 16)))
    True
    """
    if not isinstance(table, LatencyTable):
        raise InvalidArgument(
            f"table must be a LatencyTable, got {table!r:.80} of type {type(table).__name__}"
        )

    def cost(
        layer: ConvParams | LinearParams,
        input_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
    ) -> float:
        return table(layer_spec(layer, input_shape))

    return cost
