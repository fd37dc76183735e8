"""Tensor maths and allocation of fxcompress.lowrank, against independent references.

The references are written here from the definitions: truncated SVDs of the channel groups
(``torch.linalg.svd`` per block), spectral norms with ``torch.linalg.matrix_norm(ord=2)`` and,
for the allocation, brute force over every combination of options.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fxcompress.errors import InfeasibleBudget, InvalidArgument
from fxcompress.lowrank import (
    LayerOptions,
    Option,
    allocate,
    factorize,
    max_rank,
    paying_rank,
    rank_grid,
    reconstruct,
    residual_energy,
    spectral_errors,
)


@st.composite
def weights(draw, dtype=torch.float64):
    """A random weight ``(f, c, *kernel)`` (no kernel: linear), a group count k dividing c."""
    nd = draw(st.integers(0, 3))
    k = draw(st.integers(1, 4))
    c = k * draw(st.integers(1, 4))
    f = draw(st.integers(1, 12))
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(f, c, *kernel, generator=g, dtype=dtype)
    if draw(st.booleans()):  # a decaying spectrum, like trained layers
        scale = torch.logspace(0, -3, f, dtype=dtype).reshape(f, *([1] * (w.dim() - 1)))
        w = w * scale
    return w, k


def truncated(w: torch.Tensor, k: int, j: int) -> torch.Tensor:
    """Reference: each block of c/k consecutive channels replaced by its rank-j SVD (folded)."""
    folded = w.reshape(w.shape[0], -1).double()
    blocks = folded.chunk(k, dim=1)  # consecutive channels are consecutive columns
    out = []
    for b in blocks:
        u, s, vh = torch.linalg.svd(b, full_matrices=False)
        out.append(u[:, :j] @ torch.diag(s[:j]) @ vh[:j])
    return torch.cat(out, dim=1)


def rel_spectral(w: torch.Tensor, approx: torch.Tensor) -> float:
    folded = w.reshape(w.shape[0], -1).double()
    norm = torch.linalg.matrix_norm(folded, ord=2)
    return float(torch.linalg.matrix_norm(folded - approx, ord=2) / norm)


@given(weights())
def test_full_rank_reconstruction_is_exact(case):
    w, k = case
    enc, dec = factorize(w, k, max_rank(w.shape, k))
    assert enc.shape[0] == dec.shape[1]
    assert torch.allclose(reconstruct(enc, dec, k), w, rtol=0, atol=1e-10 * float(w.abs().max()))


@given(weights(), st.integers(1, 12))
@example((torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)), 1), 1)
def test_factors_compute_the_groups_truncated_svd(case, j):
    w, k = case
    j = min(j, max_rank(w.shape, k))
    enc, dec = factorize(w, k, j)
    low = reconstruct(enc, dec, k).reshape(w.shape[0], -1)
    assert torch.allclose(low, truncated(w, k, j), atol=1e-10 * float(w.abs().max()))


@given(weights(), st.lists(st.integers(0, 14), min_size=1, max_size=5))
@example((torch.zeros(3, 4, dtype=torch.float64), 2), [1])  # all-zero weight: error 0
@example((torch.randn(40, 4, 1, dtype=torch.float64), 2), [1])  # f > k * rank: Gram side
def test_spectral_error_is_the_measured_error(case, ranks):
    w, k = case
    got = spectral_errors(w, k, ranks)
    for j, err in zip(ranks, got):
        if float(w.abs().max()) == 0:
            assert err == 0.0
            continue
        want = rel_spectral(w, truncated(w, k, j)) if j > 0 else 1.0
        assert err == pytest.approx(want, rel=1e-7, abs=1e-10)


@given(weights(), st.integers(1, 12))
def test_spectral_error_lies_between_the_paper_bounds(case, j):
    """max_i s_{i,j+1} / ||W|| <= error <= sqrt(k) max_i s_{i,j+1} / ||W||  (Theorem 1)."""
    w, k = case
    j = min(j, max_rank(w.shape, k))
    folded = w.reshape(w.shape[0], -1)
    norm = float(torch.linalg.matrix_norm(folded, ord=2))
    tails = [torch.linalg.svdvals(b) for b in folded.chunk(k, dim=1)]
    worst = max((float(s[j]) if j < s.numel() else 0.0) for s in tails) / norm
    err = spectral_errors(w, k, [j])[0]
    assert worst * (1 - 1e-9) - 1e-12 <= err <= math.sqrt(k) * worst * (1 + 1e-9) + 1e-12


@given(weights())
def test_spectral_error_decreases_with_rank(case):
    w, k = case
    errs = spectral_errors(w, k, range(max_rank(w.shape, k) + 1))
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(errs))
    assert errs[-1] == 0.0


@given(weights())
def test_residual_energy_matches_truncation(case):
    w, _ = case
    folded = w.reshape(w.shape[0], -1)
    energy = residual_energy(w)
    total = float((folded**2).sum())
    for j in range(len(energy)):
        approx = truncated(w, 1, j) if j else torch.zeros_like(folded)
        assert energy[j] == pytest.approx(float(((folded - approx) ** 2).sum()) / total, abs=1e-9)


@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(1, 3))
def test_paying_rank_is_the_last_rank_with_fewer_weights(dims, nd):
    f, c = dims[0], dims[-1] * 2
    kernel = [2] * (nd - 1)
    shape = (f, c, *kernel)
    m = c * math.prod(kernel)
    for k in (1, 2):
        top = paying_rank(shape, k)
        fewer = [j for j in range(1, max_rank(shape, k) + 1) if j * (m + k * f) < f * m]
        assert top == (max(fewer) if fewer else 0)


@given(st.integers(1, 600), st.integers(2, 40))
@example(3, 2)  # one even step: no division by zero
def test_rank_grid_spans_one_to_top(top, n):
    grid = rank_grid(top, n)
    assert grid == tuple(sorted(set(grid)))
    assert grid[0] == 1
    assert grid[-1] == top
    assert len(grid) <= max(n, 2) or grid == tuple(range(1, top + 1))


def test_bad_groups_and_ranks_are_rejected():
    w = torch.randn(4, 6, 3)
    with pytest.raises(InvalidArgument, match="divisor of the 6 input channels"):
        factorize(w, 4, 1)
    with pytest.raises(InvalidArgument, match=r"rank j must be an int in \[1, 4\]"):
        factorize(w, 2, 5)
    with pytest.raises(InvalidArgument, match="ranks must be >= 0"):
        spectral_errors(w, 1, [-1])


# --------------------------------------------------------------------------- allocation


@st.composite
def instances(draw):
    layers = []
    for i in range(draw(st.integers(1, 4))):
        dense = draw(st.integers(1, 30))
        opts = tuple(
            Option(1, n + 1, -draw(st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.7, 0.9])),
                   draw(st.integers(0, 35)))
            for n in range(draw(st.integers(0, 3)))
        )  # fmt: skip
        layers.append(LayerOptions(f"l{i}", dense, opts))
    fixed = draw(st.integers(0, 10))
    budget = draw(st.integers(0, 80))
    return layers, fixed, budget


def brute_force(layers, fixed, budget):
    """The least achievable maximum error (dense: 0) within the budget, or None."""
    best = None
    for combo in itertools.product(*[(None, *layer.options) for layer in layers]):
        cost = fixed + sum(layer.dense if o is None else o.cost for layer, o in zip(layers, combo))
        if cost > budget:
            continue
        worst = max((-o.key for o in combo if o is not None), default=0.0)
        best = worst if best is None else min(best, worst)
    return best


@given(instances())
@example(([LayerOptions("a", 10, (Option(1, 1, -0.5, 10),))], 0, 10))  # equal cost: dense
def test_minmax_allocation_is_optimal(case):
    layers, fixed, budget = case
    want = brute_force(layers, fixed, budget)
    if want is None:
        with pytest.raises(InfeasibleBudget) as info:
            allocate(layers, budget, fixed=fixed)
        assert info.value.minimum > budget
        return
    alloc = allocate(layers, budget, fixed=fixed)
    chosen = [layer.dense if o is None else o.cost for layer, o in zip(layers, alloc.choices)]
    assert alloc.cost == fixed + sum(chosen) <= budget
    worst = max((-o.key for o in alloc.choices if o is not None), default=0.0)
    assert worst == pytest.approx(want)
    for layer, o in zip(layers, alloc.choices):
        assert o is None or o in layer.options


def test_allocation_rejects_nan_costs():
    with pytest.raises(InvalidArgument, match="NaN"):
        allocate([LayerOptions("a", 1, (Option(1, 1, -0.5, math.nan),))], 1.0)
