"""Latency-budgeted choice of a configuration per chain of a network.

The problem
-----------
A network is a set of *chains* (:class:`ChainSpec`). A chain of length ``n`` has positions
``0..n``; a *segment* (:class:`Span`) ``(start, stop)`` with ``0 <= start < stop <= n`` covers the
items ``start + 1 .. stop`` and offers one or more *choices* (:class:`Choice`). A choice has a
``key`` (chosen by the caller), a ``latency`` (ms, >= 0), a ``damage`` (>= 0) and optionally
``sub``: names of other chains whose own configuration is part of the choice (a nested branch, for
example a residual block kept un-merged whose branch is planned on its own). A *configuration* of
a chain is a partition of ``0..n`` into consecutive listed segments with one choice per segment
and, recursively, a configuration of every sub chain of every chosen choice. The *root* chains are
the chains no choice refers to; they all run, so their latencies add, and the problem's
``fixed_latency`` (the part of the network outside any chain) is added on top. The planner
minimises the total damage subject to ``total latency <= budget``.

A :class:`Solution` lists its decisions as :class:`~fxcompress.depth.segment.Segment` values, the
one shape of a segment choice in fxcompress.

Invariants of the input, checked when a :class:`Problem` is built (:class:`InvalidArgument`
otherwise): chain names are unique, segments lie in their chain and are not repeated, every
segment has at least one choice and its keys are unique, numbers are finite and non-negative,
every ``sub`` names another existing chain, a chain is referred to by choices of at most one
segment (several choices of that segment may share it), references have no cycle, and every
chain has at least one partition into its segments.

The algorithm
-------------
:func:`solve` discretises time with the bin width ``delta = (budget - fixed_latency) /
resolution``. A latency ``x`` takes ``ceil(x / delta)`` bins, rounded up in exact rational
arithmetic (``x``, ``budget`` and ``fixed_latency`` are read as the exact values of their floats,
so a latency of exactly ``k * delta`` takes ``k`` bins and no floating error can round down); a
configuration whose bins fit in ``resolution`` therefore fits the budget exactly.

Chains are processed bottom-up (sub chains first). For each, a dynamic programme over the
positions builds the *profile* ``P[t]``, the least damage of a configuration using at most ``t``
bins (non-increasing in ``t``). A choice with sub chains contributes its own latency and damage
plus the min-plus convolution of its sub chains' profiles. The root profiles are combined by
min-plus convolution (a knapsack over chains) and the answer is read at ``t = resolution``, then
back-tracked. One chain costs ``O(#choices * T)`` numpy work (``T = resolution + 1``) plus
``O(T * k)`` per min-plus convolution, where ``k <= T`` is the number of distinct damage levels of
the smaller operand.

Guarantees of :func:`solve`:

* the returned configuration satisfies ``latency <= budget`` (``latency`` is ``fixed_latency``
  plus the :func:`math.fsum` of the true latencies, never the rounded ones);
* its damage is the least among the configurations whose rounded latencies fit in
  ``resolution`` bins; in particular it is at most the exact optimum for the budget
  ``budget - m * delta``, where ``m`` is the largest number of choices in a configuration,
  and never less than the exact optimum for ``budget``;
* any budget ``>= min_latency(problem)`` gets a solution: when rounding leaves no configuration
  in ``resolution`` bins, the resolution is doubled (up to 4 times), and if that is still not
  enough, the least-damage configuration of the lowest latency is returned;
* among configurations of (up to a relative ``1e-12``) equal damage the one with the fewest bins
  is preferred, and the remaining ties are broken by a fixed order (chains by name; segments by
  ascending ``stop``; choices by ascending key), so the same input always gives the same
  :class:`Solution`.

For a fixed resolution, the damage is non-increasing in the budget. The retries above use a finer
grid, so a budget just under the point where ``resolution`` bins start to suffice can get a
*better* plan than a budget just above it.

:func:`solve_exhaustive` enumerates every configuration; it is exact and exponential, meant as a
test oracle and for tiny instances.

Modules: :mod:`.checks` (validation of numbers and JSON), :mod:`.problem` (the input and output
types), :mod:`.index` (the validated, canonically ordered view of a problem), :mod:`.extremes`
(exact lowest latency), :mod:`.dp` (the dynamic programme and :func:`solve`), :mod:`.runners_up`
(:func:`alternatives`, :func:`ranked`, :func:`pareto_front`) and :mod:`.exhaustive` (the oracle).
None imports torch.

Examples
--------
>>> conv = Span(0, 1, (Choice("keep", 2.0, 0.0), Choice("prune", 1.0, 0.5)))
>>> act = Span(1, 2, (Choice("keep", 1.0, 0.0),))
>>> fused = Span(0, 2, (Choice("merge", 2.0, 0.3),))
>>> problem = Problem((ChainSpec("body", 2, (conv, act, fused)),), fixed_latency=0.5)
>>> min_latency(problem)
2.5
>>> [(d.start, d.stop, d.key) for d in solve(problem, 3.0).decisions]
[(0, 2, 'merge')]
>>> [(d.start, d.stop, d.key) for d in solve(problem, 4.0).decisions]
[(0, 1, 'keep'), (1, 2, 'keep')]
"""

from __future__ import annotations

from fxcompress.depth.planner.dp import solve
from fxcompress.depth.planner.exhaustive import solve_exhaustive
from fxcompress.depth.planner.extremes import min_latency
from fxcompress.depth.planner.problem import ChainSpec, Choice, Problem, Solution, Span
from fxcompress.depth.planner.runners_up import alternatives, pareto_front, ranked

__all__ = [
    "ChainSpec",
    "Choice",
    "Problem",
    "Solution",
    "Span",
    "alternatives",
    "min_latency",
    "pareto_front",
    "ranked",
    "solve",
    "solve_exhaustive",
]
