"""Similarity of two layers or blocks: weight cosine and linear CKA of activations.

- **Weight cosine**: the cosine of the angle between the two flattened parameter vectors (after
  alignment), in [-1, 1]. Data-free.
- **Linear CKA** (centred kernel alignment, Kornblith et al. 2019) of two activation matrices
  ``X`` (n × p) and ``Y`` (n × q) over the same n calibration examples:
  ``<K, L>_F / (‖K‖_F ‖L‖_F)`` with ``K = Xc Xcᵀ``, ``L = Yc Ycᵀ`` and ``Xc``, ``Yc`` the
  column-centred matrices; in [0, 1], invariant to permutations, rotations and scaling of the
  features, so it needs no alignment. Each example's activation is flattened whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx

from fxcompress.data import split_batch
from fxcompress.graph.util import clone_tensors

__all__ = ["linear_cka", "record", "weight_cosine"]


def weight_cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Cosine similarity of the concatenated, flattened tensors ``a`` and ``b``.

    Examples
    --------
    >>> import torch
    >>> weight_cosine([torch.ones(2, 2)], [2 * torch.ones(2, 2)])
    1.0
    """
    x = torch.cat([t.detach().double().reshape(-1) for t in a])
    y = torch.cat([t.detach().double().reshape(-1) for t in b])
    denom = float(x.norm() * y.norm())
    return float(x @ y) / denom if denom > 0 else 0.0


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two activation matrices with one row per example.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(50, 8, generator=g)
    >>> q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    >>> round(linear_cka(x, 3 * x @ q + 1), 6)  # rotation, scaling and shift invariant
    1.0
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    xc = x.double().reshape(x.shape[0], -1)
    yc = y.double().reshape(y.shape[0], -1)
    xc = xc - xc.mean(0, keepdim=True)
    yc = yc - yc.mean(0, keepdim=True)
    k = xc @ xc.T
    ell = yc @ yc.T
    denom = float(k.norm() * ell.norm())
    return float((k * ell).sum()) / denom if denom > 0 else 0.0


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str], store: dict[str, list]) -> None:
        super().__init__(gm)
        self.names = names
        self.store = store

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            tensor = value[0] if isinstance(value, (tuple, list)) else value
            if isinstance(tensor, torch.Tensor):
                self.store.setdefault(n.name, []).append(
                    tensor.detach().double().reshape(tensor.shape[0], -1)
                )
        return value


def record(
    gm: fx.GraphModule,
    names: Iterable[str],
    data: Iterable[Any],
    *,
    batches: int,
    max_examples: int = 256,
) -> dict[str, torch.Tensor]:
    """Outputs of the named nodes on the first ``batches`` batches of ``data`` (eval, no grad).

    Each value is an (examples × features) float64 matrix, at most ``max_examples`` rows. For a
    node returning a tuple (``nn.MultiheadAttention``), its first element is recorded.
    """
    wanted = set(names)
    store: dict[str, list] = {}
    flags = [m.training for m in gm.modules()]
    gm.eval()
    seen = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(data):
                if i >= batches or seen >= max_examples:
                    break
                inputs, _ = split_batch(batch)
                _Recorder(gm, wanted, store).run(*clone_tensors(inputs))
                first = store[next(iter(store))][-1] if store else None
                seen += 0 if first is None else first.shape[0]
    finally:
        for m, flag in zip(gm.modules(), flags):
            m.training = flag
    return {k: torch.cat(v)[:max_examples] for k, v in store.items()}
