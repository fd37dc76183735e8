"""Prices and error tables of a layer's low-rank options: what :func:`.allocate` chooses from.

:class:`ErrorCache` holds the exact spectral errors and SVD energies per weight; :class:`Pricer`
prices a ``(k, j)`` pair in the budget's metric (parameters, MACs or a latency table's
prediction of its two ops); :func:`options` builds one layer's menu from both.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from fxcompress.latency import LatencyTable, OpSpec
from fxcompress.lowrank.allocation import LayerOptions, Option
from fxcompress.lowrank.factorize import max_rank, paying_rank, residual_energy, spectral_errors
from fxcompress.lowrank.rewrite import Site

__all__ = [
    "ErrorCache",
    "Pricer",
    "dense_spec",
    "macs",
    "options",
    "pair_specs",
    "params",
    "rank_grid",
    "weights",
]


class ErrorCache:
    """Exact spectral errors and SVD energies per weight, reusable across :func:`decompose` calls.

    Entries are keyed by the weight's bytes, shape and dtype, so a cache can be shared by calls
    on the same model at several budgets and methods (each table is computed once).

    Examples
    --------
    >>> cache = ErrorCache()
    >>> w = torch.diag(torch.tensor([2.0, 1.0]))
    >>> cache.errors(w, 1, [1]), len(cache)
    ((0.5,), 1)
    """

    def __init__(self) -> None:
        self._errors: dict[tuple[str, int], dict[int, float]] = {}
        self._energy: dict[str, tuple[float, ...]] = {}

    def __len__(self) -> int:
        return len(self._errors) + len(self._energy)

    @staticmethod
    def _key(weight: torch.Tensor) -> str:
        raw = weight.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
        return f"{tuple(weight.shape)}:{weight.dtype}:{hashlib.sha1(raw).hexdigest()}"

    def errors(self, weight: torch.Tensor, k: int, ranks: Sequence[int]) -> tuple[float, ...]:
        """:func:`~.factorize.spectral_errors`, computing only the ranks not seen before."""
        table = self._errors.setdefault((self._key(weight), k), {})
        todo = sorted({int(j) for j in ranks} - table.keys())
        if todo:
            table.update(zip(todo, spectral_errors(weight, k, todo)))
        return tuple(table[int(j)] for j in ranks)

    def energy(self, weight: torch.Tensor) -> tuple[float, ...]:
        """:func:`~.factorize.residual_energy`, cached."""
        key = self._key(weight)
        if key not in self._energy:
            self._energy[key] = residual_energy(weight)
        return self._energy[key]


def rank_grid(top: int, n: int) -> tuple[int, ...]:
    """Candidate ranks ``1 .. top``: all of them if ``top <= n``, else about ``n`` of them.

    The subset mixes an even and a geometric spacing (fine steps at low rank, where the error
    changes fastest) and always contains 1 and ``top``.

    Examples
    --------
    >>> rank_grid(5, 8)
    (1, 2, 3, 4, 5)
    >>> g = rank_grid(500, 16)
    >>> g[0], g[-1], len(g) <= 16
    (1, 500, True)
    """
    if top <= n:
        return tuple(range(1, top + 1))
    half = n // 2
    lin = [1 + round(i * (top - 1) / max(n - half - 1, 1)) for i in range(n - half)]
    geo = [round(top ** (i / (half - 1))) for i in range(half)] if half > 1 else []
    return tuple(sorted({1, top, *lin, *geo}))


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]



def dense_spec(site: Site) -> OpSpec:
    """The latency table's spec of the dense layer."""
    f = site.weight_shape[0]
    if site.kind == "linear":
        return OpSpec("linear", site.input_shape, site.dtype, out_channels=f, bias=site.bias)
    return OpSpec(
        "conv", site.input_shape, site.dtype, out_channels=f, kernel_size=site.weight_shape[2:],
        stride=site.stride, padding=site.padding, dilation=site.dilation, bias=site.bias,
    )  # fmt: skip


def pair_specs(site: Site, k: int, j: int) -> tuple[OpSpec, OpSpec]:
    """The latency table's specs of the grouped encoder and the 1x1 decoder."""
    f, c = site.weight_shape[:2]
    if site.kind == "linear":
        lead = site.input_shape[:-1]
        if k == 1:
            enc = OpSpec("linear", site.input_shape, site.dtype, out_channels=j, bias=False)
        else:  # priced as the grouped 1x1 conv it equals
            enc = OpSpec(
                "conv", (math.prod(lead), c, 1), site.dtype, out_channels=k * j, kernel_size=1,
                groups=k, bias=False,
            )  # fmt: skip
        dec = OpSpec("linear", (*lead, k * j), site.dtype, out_channels=f, bias=site.bias)
        return enc, dec
    enc = OpSpec(
        "conv", site.input_shape, site.dtype, out_channels=k * j,
        kernel_size=site.weight_shape[2:], stride=site.stride, padding=site.padding,
        dilation=site.dilation, groups=k, bias=False,
    )  # fmt: skip
    mid = (site.output_shape[0], k * j, *site.output_shape[2:])
    dec = OpSpec("conv", mid, site.dtype, out_channels=f, kernel_size=1, bias=site.bias)
    return enc, dec


def weights(site: Site, k: int, j: int) -> int:
    """Weights of the pair (``k == 0``: of the dense layer), without the bias."""
    f, c, *kernel = site.weight_shape
    m = c * math.prod(kernel)
    return f * m if k == 0 else j * (m + k * f)


def params(site: Site, k: int, j: int) -> int:
    """Parameters of the pair (``k == 0``: of the dense layer), bias included."""
    return weights(site, k, j) + (site.weight_shape[0] if site.bias else 0)


def macs(site: Site, k: int, j: int) -> int:
    """Multiply-accumulates of the pair (``k == 0``: of the dense layer) at the traced shape."""
    return site.positions * weights(site, k, j)


class Pricer:
    """``price(site, k, j)``: the pair's cost in the budget's metric (``k == 0``: dense)."""

    def __init__(self, metric: str, table: LatencyTable | None) -> None:
        self.metric = metric
        self.table = table

    def __call__(self, site: Site, k: int, j: int) -> float:
        if self.metric == "params":
            return float(params(site, k, j))
        if self.metric == "macs":
            return float(macs(site, k, j))
        assert self.table is not None
        if k == 0:
            return self.table(dense_spec(site))
        return sum(self.table.many(pair_specs(site, k, j)))


def options(
    site: Site,
    weight: torch.Tensor,
    method: str,
    *,
    cache: ErrorCache,
    price: Pricer,
    max_groups: int,
    ranks: int,
) -> LayerOptions:
    """The menu of one layer: every ``(k, j)`` that pays, keyed by ``method``'s criterion."""
    c = site.weight_shape[1]
    ks = [1] if method != "alds" else _divisors(c, max_groups)
    menu: list[Option] = []
    for k in ks:
        top = paying_rank(site.weight_shape, k)
        if top < 1:
            continue
        grid = rank_grid(top, ranks)
        if method == "alds":
            keys = [-e for e in cache.errors(weight, k, grid)]
        elif method == "uniform":
            keys = [j / max_rank(site.weight_shape, k) for j in grid]
        else:
            energy = cache.energy(weight)
            keys = [-energy[j] for j in grid]
        menu += [Option(k, j, key, price(site, k, j)) for j, key in zip(grid, keys)]
    return LayerOptions(site.node, price(site, 0, 0), tuple(menu))
