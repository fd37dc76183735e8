"""Graph capture and recognition: everything that reads or rewrites a ``torch.fx`` graph
generically.

Modules: :mod:`.capture` (tracing, input normalisation, shape propagation), :mod:`.canonicalize`
(one spelling per op), :mod:`.recognise` (layer, activation, add and BatchNorm recognition),
:mod:`.aliasing` (in-place writes and views: which nodes share storage), :mod:`.util` (cloning,
``finalize`` — the one end of every surgery — and output comparison), :mod:`.modules` (modules
the rewrites emit).
"""
