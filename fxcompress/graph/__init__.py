"""Graph capture and recognition: everything that reads or rewrites a ``torch.fx`` graph
generically.

Modules: :mod:`.capture` (tracing, input normalisation, shape propagation), :mod:`.canonicalize`
(one spelling per op), :mod:`.ops` (layer, activation, add and BatchNorm recognition, aliasing),
:mod:`.util` (cloning, ``finalize`` — the one end of every surgery — and output comparison),
:mod:`.modules` (modules the rewrites emit).
"""
