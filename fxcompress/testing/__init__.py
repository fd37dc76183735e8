"""Property-based testing helpers: random conv/linear chains and models, and an equivalence check.

Use them to test that a deployment pipeline (``fxcompress.merge``, ``fxcompress.optimize`` with
``budget=1.0``, an export step, ...) does not change what a model computes::

    from hypothesis import given
    from fxcompress.testing import assert_equivalent, models

    @given(models())
    def test_pipeline_is_exact(case):
        model, x = case
        assert_equivalent(my_pipeline(model, x), model, x)

Every strategy draws a pair ``(model, example_input)``: the model (eval mode, in ``dtype``) and an
input tensor large enough for it. Weights are initialised from a seed that hypothesis draws, so
failures shrink and replay deterministically, and the global torch RNG is left untouched.

Hostile models are opt-in: ``hooks=True`` registers deterministic forward hooks (:class:`Hook`) on
convolutions, activations, ``nn.Identity`` / ``nn.Dropout`` and other modules, ``inplace=True``
lets the model write its input and intermediate values in place (values that are read again
later), and ``unbatched=True`` lets the input lack the batch axis (a ``(C, L)`` or ``(C, H, W)``
tensor; a BatchNorm then normalises the first spatial axis, which torch reads as channels).
:func:`graphs` also draws, by default, residual forks at prunable units, BatchNorms that follow
no convolution and sums of three or more branches (RepVGG-like blocks).

The strategies need `hypothesis <https://hypothesis.works>`_ (``pip install hypothesis``); it is
imported only when a strategy is called, so :func:`assert_equivalent` works without it.
``import fxcompress`` never imports this module.

Modules: :mod:`.equivalence` (:func:`assert_equivalent`, :func:`default_rtol`), :mod:`.chains`
(:func:`conv_chains`, :func:`linear_chains`), :mod:`.dags` (:func:`models`, :func:`graphs`),
:mod:`.program` (:class:`Step`, :class:`GeneratedModel`), :mod:`.builder` (the blocks
:func:`models` and :func:`graphs` draw), :mod:`.hostile` (:class:`Hook`, :class:`InplaceOp`),
:mod:`.drawing` (pieces every strategy shares).
"""

from __future__ import annotations

from fxcompress.testing.chains import conv_chains, linear_chains
from fxcompress.testing.dags import graphs, models
from fxcompress.testing.drawing import ACTIVATION_MODULES
from fxcompress.testing.drawing import EXTRA_ACTIVATION_MODULES as EXTRA_ACTIVATION_MODULES
from fxcompress.testing.equivalence import assert_equivalent, default_rtol
from fxcompress.testing.hostile import HOOK_KINDS, INPLACE_OPS, Hook, InplaceOp
from fxcompress.testing.program import GeneratedModel, Step

__all__ = [
    "ACTIVATION_MODULES",
    "HOOK_KINDS",
    "INPLACE_OPS",
    "GeneratedModel",
    "Hook",
    "InplaceOp",
    "Step",
    "assert_equivalent",
    "conv_chains",
    "default_rtol",
    "graphs",
    "linear_chains",
    "models",
]
