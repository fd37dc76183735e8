"""Tensor maths of LayerCollapse: the activation blend, chain composition, costs and bounds.

No graph code here. A *chain* is a list of layers ``L0, L1, ..., Lm`` (all :class:`LinearParams`
or all :class:`ConvParams`; every layer after the first is pointwise) with an activation site
between consecutive layers. Once the sites are linear, any run ``Li..Lj`` composes exactly into
one layer; :func:`best_partition` chooses the runs that make the chain smallest.

Error bound of linearising sites (``blend_a(z) = act(z) + a (z - act(z))`` replaced by ``z``):
for the activations in :data:`GATED`, ``|act(z) - z| <= c |z|`` elementwise, so by telescoping
over the sites ``k`` of a chain (the prefix up to site ``k`` is unchanged, the rest is linear)::

    ||y - y_collapsed|| <= sum_k |1 - a_k| * c_k * ||T_k||_2 * ||z_k||

with ``z_k`` the input of site ``k``'s blend and ``T_k`` the product of the weight matrices
after it up to the end of the chain. :func:`tail_norms` computes the ``||T_k||_2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fxcompress.graph.recognise import ACTIVATIONS
from fxcompress.maths import (
    ConvParams,
    LinearParams,
    compose,
    compose_linear,
    conv_to_dense_weight,
)

__all__ = [
    "GATED",
    "Blend",
    "Cost",
    "best_partition",
    "compose_run",
    "deviation_constant",
    "is_pointwise",
    "layer_cost",
    "merged_cost",
    "spectral_norm",
    "tail_norms",
]

Layer = LinearParams | ConvParams

#: Activations ``act`` with ``|act(z) - z| <= c |z|`` (``act(z) = z * g(z)`` with ``g`` in
#: ``[0, 1]``, or a clamp towards zero); the blend towards the identity is meaningful for them.
GATED = frozenset(
    {"relu", "relu6", "leaky_relu", "gelu", "silu", "mish", "hardswish", "elu", "hardtanh", "tanh"}
)


def deviation_constant(activation: str, kwargs: dict[str, Any]) -> float:
    """The smallest ``c`` with ``|act(z) - z| <= c |z|`` for every real ``z``.

    It is 1 for every activation in :data:`GATED` (``relu(z) - z = -min(z, 0)``;
    ``gelu(z) - z = -z Phi(-z)``; ``silu(z) - z = -z sigmoid(-z)``; a clamp or ``tanh`` moves
    towards zero), except ``elu`` with ``alpha`` where it is ``max(1, |alpha - 1|)`` (slope of
    ``elu(z) - z`` at ``0-``) and ``leaky_relu`` with slope ``s`` where it is ``|1 - s|``.

    Examples
    --------
    >>> deviation_constant("gelu", {}), deviation_constant("elu", {"alpha": 3.0})
    (1.0, 2.0)
    """
    if activation == "elu":
        return max(1.0, abs(float(kwargs.get("alpha", 1.0)) - 1.0))
    if activation == "leaky_relu":
        return abs(1.0 - float(kwargs.get("negative_slope", 0.01)))
    return 1.0


class Blend(nn.Module):
    """``slope * x + (1 - slope) * act(x)``: the activation at slope 0, the identity at slope 1.

    Generalises LayerCollapse's PReLU (a ReLU blend at slope ``a`` *is* ``PReLU(a)``) to any
    activation. ``slope`` is a learnable scalar.

    Parameters
    ----------
    activation : str
        A canonical activation name of :data:`fxcompress.graph.recognise.ACTIVATIONS`.
    kwargs : dict
        Its constant keyword arguments (e.g. ``{"approximate": "tanh"}`` for GELU).
    slope : float
        Initial slope.

    Examples
    --------
    >>> b = Blend("relu", slope=0.25)
    >>> b(torch.tensor([-4.0, 2.0]))
    tensor([-1.,  2.], grad_fn=<AddBackward0>)
    """

    def __init__(
        self,
        activation: str,
        kwargs: dict[str, Any] | None = None,
        slope: float = 0.0,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            known = sorted(ACTIVATIONS)
            raise ValueError(f"unknown activation {activation!r}; expected one of {known}")
        self.activation = activation
        self.kwargs = dict(kwargs or {})
        self.slope = nn.Parameter(torch.tensor(float(slope), dtype=dtype))
        self.penalty_weight = 1.0  # set by collapse.prepare: relative saving of this site

    def forward(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation](x, **self.kwargs)
        # written so that slope 0 gives act and slope 1 gives x bit for bit
        return self.slope * x + (1 - self.slope) * act

    def extra_repr(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.activation}{args}, slope={float(self.slope.detach()):.4g}"


def is_pointwise(layer: Layer) -> bool:
    """A linear layer, or a convolution with 1x1 kernel and no padding (stride is fine)."""
    if isinstance(layer, LinearParams):
        return True
    return all(k == 1 for k in layer.kernel_size) and all(p == 0 for p in layer.padding)


def matrix(layer: Layer) -> Tensor:
    """The float64 ``(out, in)`` matrix of a pointwise layer (grouped convs made dense)."""
    if isinstance(layer, LinearParams):
        return layer.weight.detach().to(torch.float64)
    dense = conv_to_dense_weight(layer).detach().to(torch.float64)
    return dense.reshape(dense.shape[0], dense.shape[1])


def _f64(layer: Layer) -> Layer:
    return layer.to(dtype=torch.float64)


def compose_run(layers: Sequence[Layer]) -> Layer:
    """One layer equal to ``layers[-1](...(layers[0](x)))``, composed in float64, cast back.

    Examples
    --------
    >>> a = LinearParams(torch.randn(5, 3), torch.randn(5))
    >>> b = LinearParams(torch.randn(2, 5), None)
    >>> x = torch.randn(4, 3)
    >>> torch.allclose(compose_run([a, b]).apply(x), b.apply(a.apply(x)), atol=1e-5)
    True
    """
    if not layers:
        raise ValueError("compose_run needs at least one layer")
    dtype = layers[0].weight.dtype
    out = _f64(layers[0])
    for nxt in layers[1:]:
        if isinstance(out, LinearParams) and isinstance(nxt, LinearParams):
            out = compose_linear(out, _f64(nxt))
        elif isinstance(out, ConvParams) and isinstance(nxt, ConvParams):
            out = compose(out, _f64(nxt))
        else:
            raise ValueError(f"cannot compose {type(out).__name__} with {type(nxt).__name__}")
    return out.to(dtype=dtype)


@dataclass(frozen=True, order=True)
class Cost:
    """Parameters and multiply-accumulates (per call, from the traced shapes)."""

    params: int
    macs: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs)


def layer_cost(layer: Layer, positions: int) -> Cost:
    """Cost of one layer applied at ``positions`` output positions (tokens or pixels)."""
    w = layer.weight.numel()
    b = 0 if layer.bias is None else layer.bias.numel()
    return Cost(w + b, w * positions)


def merged_cost(layers: Sequence[Layer], positions: int) -> Cost:
    """Cost of ``compose_run(layers)`` without composing (dense estimate for grouped convs).

    ``positions`` is the number of output positions of the last layer.
    """
    first, last = layers[0], layers[-1]
    if isinstance(first, LinearParams):
        w = first.in_features * last.out_features
        out = last.out_features
    else:
        w = first.in_channels * last.out_channels * math.prod(first.kernel_size)
        out = last.out_channels
    has_bias = any(layer.bias is not None for layer in layers)
    return Cost(w + (out if has_bias else 0), w * positions)


def best_partition(
    costs: Sequence[Cost], merged: dict[tuple[int, int], Cost]
) -> list[tuple[int, int]]:
    """Split ``0..n-1`` into runs ``(i, j)`` (inclusive) of least total parameters.

    ``costs[i]`` is layer ``i`` alone; ``merged[(i, j)]`` is the cost of the run composed into one
    layer. A run is eligible only if it has fewer parameters *and* no more MACs than its layers
    kept apart. Ties go to fewer layers (each layer is a kernel launch).

    Examples
    --------
    >>> best_partition([Cost(10, 10), Cost(10, 10), Cost(10, 10)],
    ...                {(0, 1): Cost(5, 5), (1, 2): Cost(25, 25), (0, 2): Cost(16, 16)})
    [(0, 1), (2, 2)]
    """
    n = len(costs)
    best: list[tuple[int, int, int]] = [(0, 0, -1)] + [(0, 0, 0)] * n  # (params, layers, start)
    for j in range(n):
        options = []
        for i in range(j + 1):
            run = costs[i] if i == j else merged.get((i, j))
            if run is None:
                continue
            if i < j:
                apart = sum(costs[i : j + 1], Cost(0, 0))
                if not (run.params < apart.params and run.macs <= apart.macs):
                    continue
            prev = best[i]
            options.append((prev[0] + run.params, prev[1] + 1, i))
        best[j + 1] = min(options)
    runs = []
    j = n
    while j > 0:
        i = best[j][2]
        runs.append((i, j - 1))
        j = i
    return runs[::-1]


def tail_norms(layers: Sequence[Layer]) -> list[float]:
    """``||W_m ... W_k||_2`` for ``k = 1..m`` (spectral norm of the weights after site ``k``).

    Site ``k`` sits between ``layers[k-1]`` and ``layers[k]``; all of ``layers[1:]`` must be
    pointwise.

    Examples
    --------
    >>> tail_norms([LinearParams(torch.eye(2), None), LinearParams(2 * torch.eye(2), None),
    ...             LinearParams(3 * torch.eye(2), None)])
    [6.0, 3.0]
    """
    out: list[float] = []
    tail: Tensor | None = None
    for layer in reversed(layers[1:]):
        m = matrix(layer)
        tail = m if tail is None else tail @ m
        out.append(spectral_norm(tail))
    return out[::-1]


def spectral_norm(m: Tensor) -> float:
    """``||m||_2``: the square root of the largest eigenvalue of the smaller Gram matrix.

    A symmetric eigensolver on ``m m^T`` (or ``m^T m``) is several times cheaper than the SVD
    behind ``matrix_norm(ord=2)`` for the wide matrices of transformer MLPs (768 x 3072).

    Examples
    --------
    >>> spectral_norm(torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))
    4.0
    """
    m = m.detach().to(torch.float64)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))
