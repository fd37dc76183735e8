"""Tensor maths of the ALDS decomposition: grouped SVD factors and their exact spectral error.

A layer's weight of shape ``(f, c, *kernel)`` (a linear layer is the case of no kernel axes) is
*folded* to the matrix ``W`` of shape ``(f, c * prod(kernel))`` whose columns run over input
channels first, then kernel taps. Cutting the ``c`` input channels into ``k`` groups of
``c / k`` consecutive channels cuts ``W`` into ``k`` consecutive column blocks
``W = [W_1 ... W_k]``. Each block keeps its best rank-``j`` approximation
``W_i ~ U_i S_i V_i`` (truncated SVD), split evenly as ``(U_i S_i^1/2) (S_i^1/2 V_i)``:

- the *encoder* stacks the ``S_i^1/2 V_i`` as a grouped convolution with ``k`` groups and
  ``k * j`` output channels, on the original kernel (stride, padding and dilation unchanged,
  no bias);
- the *decoder* places the ``U_i S_i^1/2`` side by side as a 1x1 convolution from ``k * j``
  channels to ``f`` (it takes the original bias).

The error of the pair is ``E = W - [U_1 S_1 V_1 ... U_k S_k V_k]`` and its relative spectral
norm ``||E||_2 / ||W||_2`` is computed exactly here (not bounded): the blocks' residuals are
``E_i = U_i' S_i' V_i'`` over the discarded singular triplets, the ``V_i'`` have orthonormal rows,
so ``E E^T = sum_i U_i' S_i'^2 U_i'^T`` and ``||E||_2^2`` is the largest eigenvalue of that
``f x f`` matrix (or, when smaller, of the Gram matrix of the stacked ``U_i' S_i'``).

Everything is computed in float64; factors are cast back to the weight's dtype. Nothing here
touches a graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fxcompress.errors import InvalidArgument

__all__ = [
    "factorize",
    "fold",
    "max_rank",
    "paying_rank",
    "reconstruct",
    "residual_energy",
    "spectral_errors",
]


def fold(weight: Tensor) -> Tensor:
    """The weight as an ``(f, c * prod(kernel))`` float64 matrix (a copy).

    Examples
    --------
    >>> fold(torch.ones(4, 3, 2, 2)).shape
    torch.Size([4, 12])
    """
    if weight.dim() < 2:
        raise InvalidArgument(f"weight must have at least 2 dims (f, c, ...), got {weight.shape}")
    return weight.detach().to(torch.float64, copy=True).reshape(weight.shape[0], -1)


def _check_groups(weight: Tensor, k: int) -> None:
    c = int(weight.shape[1])
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or c % k:
        raise InvalidArgument(
            f"groups k must be a positive divisor of the {c} input channels, got k={k!r}"
        )


def max_rank(weight_shape: Sequence[int], k: int) -> int:
    """The rank of one channel group's block: ``min(f, c / k * prod(kernel))``.

    Examples
    --------
    >>> max_rank((64, 32, 3, 3), 4)
    64
    >>> max_rank((64, 32, 1, 1), 4)
    8
    """
    f, c, *kernel = (int(s) for s in weight_shape)
    return min(f, c // k * math.prod(kernel))


def paying_rank(weight_shape: Sequence[int], k: int) -> int:
    """The largest rank ``j`` whose pair has fewer weights than the layer, 0 if none.

    The pair has ``j * (c * prod(kernel) + k * f)`` weights against ``f * c * prod(kernel)``;
    both count multiply-accumulates per output position the same way.

    Examples
    --------
    >>> paying_rank((64, 64, 3, 3), 1)  # j * (576 + 64) < 36864
    57
    >>> paying_rank((4, 2), 1)
    1
    """
    f, c, *kernel = (int(s) for s in weight_shape)
    m = c * math.prod(kernel)
    dense = f * m
    per = m + k * f
    return min(max_rank(weight_shape, k), (dense - 1) // per)


def _group_svd(weight: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``U (k, f, r)``, ``S (k, r)``, ``Vh (k, r, m)`` of the ``k`` column blocks, float64."""
    _check_groups(weight, k)
    w = fold(weight)
    f = w.shape[0]
    blocks = w.reshape(f, k, -1).transpose(0, 1)  # consecutive channels = consecutive columns
    return torch.linalg.svd(blocks, full_matrices=False)


def factorize(weight: Tensor, k: int, j: int) -> tuple[Tensor, Tensor]:
    """Encoder and decoder weights of the rank-``j``, ``k``-group decomposition.

    Parameters
    ----------
    weight : Tensor
        ``(f, c, *kernel)``; ``(f, c)`` for a linear layer.
    k : int
        Number of groups of consecutive input channels; divides ``c``.
    j : int
        Rank kept per group, ``1 <= j <= max_rank(weight.shape, k)``.

    Returns
    -------
    encoder : Tensor
        ``(k * j, c / k, *kernel)``: the weight of a grouped conv with ``groups=k``.
    decoder : Tensor
        ``(f, k * j)``: the weight of the 1x1 conv (or linear map) that follows.

    Examples
    --------
    >>> w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    >>> enc, dec = factorize(w, 2, max_rank(w.shape, 2))
    >>> enc.shape, dec.shape
    (torch.Size([12, 2, 3, 3]), torch.Size([6, 12]))
    >>> torch.allclose(reconstruct(enc, dec, 2), w)
    True
    """
    r = max_rank(weight.shape, k) if weight.dim() >= 2 else 0
    _check_groups(weight, k)
    if isinstance(j, bool) or not isinstance(j, int) or not 1 <= j <= r:
        raise InvalidArgument(f"rank j must be an int in [1, {r}] for k={k}, got j={j!r}")
    u, s, vh = _group_svd(weight, k)
    root = s[:, :j].sqrt()
    dec = (u[:, :, :j] * root[:, None, :]).transpose(0, 1).reshape(weight.shape[0], k * j)
    enc = (vh[:, :j, :] * root[:, :, None]).reshape(k * j, weight.shape[1] // k, *weight.shape[2:])
    return enc.to(weight.dtype), dec.to(weight.dtype)


def reconstruct(encoder: Tensor, decoder: Tensor, k: int) -> Tensor:
    """The weight ``(f, c, *kernel)`` the pair computes (float64): ``[D_1 E_1 ... D_k E_k]``.

    Examples
    --------
    >>> enc, dec = torch.ones(2, 3, 1), torch.ones(5, 2)
    >>> reconstruct(enc, dec, 2).shape
    torch.Size([5, 6, 1])
    """
    kj, cg, *kernel = encoder.shape
    f = decoder.shape[0]
    j = kj // k
    e = encoder.detach().to(torch.float64).reshape(k, j, -1)  # (k, j, cg * kernel)
    d = decoder.detach().to(torch.float64).reshape(f, k, j).transpose(0, 1)  # (k, f, j)
    blocks = d @ e  # (k, f, cg * kernel)
    return blocks.transpose(0, 1).reshape(f, k * cg, *kernel)


def spectral_errors(weight: Tensor, k: int, ranks: Sequence[int]) -> tuple[float, ...]:
    """Exact ``||W - W_hat||_2 / ||W||_2`` of the folded weight, for each rank in ``ranks``.

    ``W_hat`` keeps the best rank-``j`` approximation of each of the ``k`` channel groups.
    A rank at or above ``max_rank`` is exact (error 0); an all-zero weight has error 0.

    Examples
    --------
    >>> w = torch.diag(torch.tensor([4.0, 2.0, 1.0]))
    >>> spectral_errors(w, 1, [1, 2, 3])
    (0.5, 0.25, 0.0)
    """
    _check_groups(weight, k)
    ranks = [int(j) for j in ranks]
    if any(j < 0 for j in ranks):
        raise InvalidArgument(f"ranks must be >= 0, got {ranks}")
    u, s, _ = _group_svd(weight, k)
    r = s.shape[1]
    if k == 1:
        norm = float(s[0, 0]) if r else 0.0
        return tuple(float(s[0, j]) / norm if j < r and norm > 0 else 0.0 for j in ranks)
    # columns U_i S_i, grouped by their rank index: level t holds the k columns of rank t
    scaled = (u * s[:, None, :]).permute(2, 1, 0)  # (r, f, k)
    f = scaled.shape[1]
    wanted = sorted({j for j in ranks if j < r} | {0}, reverse=True)
    top: dict[int, float] = {}
    if f <= k * r:  # accumulate E E^T = sum over the discarded levels, from the last one down
        gram = torch.zeros(f, f, dtype=torch.float64)
        done = r
        for j in wanted:
            block = scaled[j:done].permute(1, 0, 2).reshape(f, -1)
            gram += block @ block.T
            done = j
            top[j] = float(torch.linalg.eigvalsh(gram)[-1])
    else:  # the Gram matrix of the discarded columns is smaller
        cols = scaled.permute(1, 0, 2).reshape(f, -1)  # (f, r * k), level-major
        full = cols.T @ cols
        for j in wanted:
            top[j] = float(torch.linalg.eigvalsh(full[j * k :, j * k :])[-1])
    norm = math.sqrt(max(top[0], 0.0))  # ||W||^2 = ||sum_i U_i S_i^2 U_i^T||
    if norm == 0.0:
        return tuple(0.0 for _ in ranks)
    return tuple(math.sqrt(max(top[j], 0.0)) / norm if j < r else 0.0 for j in ranks)


def residual_energy(weight: Tensor) -> tuple[float, ...]:
    """``sum_{i > j} s_i^2 / sum_i s_i^2`` of the folded weight for ``j = 0 .. rank``.

    The share of the squared Frobenius norm that a rank-``j`` SVD (one group) discards; the
    SVD-energy baseline keeps, in every layer, the least rank whose share is below a threshold.

    Examples
    --------
    >>> residual_energy(torch.diag(torch.tensor([3.0, 1.0])))
    (1.0, 0.1, 0.0)
    """
    s2 = torch.linalg.svdvals(fold(weight)) ** 2
    total = float(s2.sum())
    if total == 0.0:
        return tuple(0.0 for _ in range(s2.numel() + 1))
    tail = [*torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).tolist(), 0.0]
    return tuple(min(1.0, t / total) for t in tail)
