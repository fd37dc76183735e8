"""Strategies for random model DAGs: :func:`models` and the richer graph fuzzer :func:`graphs`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fxcompress.testing.builder import ModelBuilder
from fxcompress.testing.drawing import check_dtype, hypothesis_strategies, randomise_bn, seeded
from fxcompress.testing.program import GeneratedModel

__all__ = ["graphs", "models"]


def models(
    *,
    max_steps: int = 6,
    max_channels: int = 8,
    min_size: int = 6,
    max_size: int = 12,
    head: bool | None = None,
    multiple_outputs: bool = False,
    dtype: torch.dtype = torch.float32,
    hooks: bool = False,
    inplace: bool = False,
    unbatched: bool = False,
) -> Any:
    """Strategy for small random 2-D CNNs as ``(GeneratedModel, input)`` pairs.

    A model is a sequence of blocks drawn from: conv (+ BatchNorm) (+ activation, in module,
    functional, method or in-place spelling); a residual block with an identity shortcut or a
    projection shortcut (1x1 conv, same stride, optional BatchNorm); a conv module called at two
    places (shared weights), once followed by a BatchNorm; a functional ``F.conv2d`` on the
    model's own parameters; elementwise ops (scaling, a sigmoid gate); two branches concatenated
    on channels; max/average pooling. An optional head pools or flattens and ends in one or two
    ``nn.Linear``. Convs are dense, grouped or depthwise, with or without bias and padding.

    Parameters
    ----------
    max_steps : int
        Largest number of blocks (at least one).
    max_channels : int
        Largest channel count of a block.
    min_size, max_size : int
        Range of the input's height and width.
    head : bool, optional
        Force a linear head on (True) or off (False); drawn when None.
    multiple_outputs : bool
        Let the model return a tuple of several intermediate values.
    dtype : torch.dtype
        Of the parameters and the input.
    hooks : bool
        Let modules carry a forward hook or pre-hook (:class:`Hook`; one in three modules on
        average), and add ``nn.Identity`` / ``nn.Dropout`` blocks to hook. A hook may change
        what its module returns, so a rewrite that drops or moves it changes the function.
        Off by default.
    inplace : bool
        Add blocks that write a value in place (``x.mul_(2.0)``, ``x.relu_()``, ...): the last
        value (the chain goes on from the written tensor), the input of a layer between that
        layer and the next one (``a = conv1(v); v.mul_(2); b = conv2(a)``), or an earlier value
        or the model's input, which may be read again later (``b + v``). The model then writes
        the caller's input at times. Off by default.
    unbatched : bool
        Let the input have no batch axis, ``(C, H, W)`` (drawn per example). BatchNorms then
        see ``(C, H, W)`` as ``(N, C', L)``: they are ``BatchNorm1d`` over ``H``, and at times
        the conv before one has ``H`` output channels, so that it looks per-channel but is not.
        Off by default.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``(model, x)``; ``print(model)`` shows the program (with its hooks).

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from fxcompress.testing import assert_equivalent
    >>> @settings(max_examples=5, database=None, deadline=None)
    ... @given(models(dtype=torch.float64))
    ... def check(case):
    ...     model, x = case
    ...     assert_equivalent(torch.fx.symbolic_trace(model), model, x)
    >>> check()
    """
    return _model_strategy(
        _MODEL_BLOCKS,
        max_steps=max_steps,
        max_channels=max_channels,
        min_size=min_size,
        max_size=max_size,
        head=head,
        multiple_outputs=multiple_outputs,
        dtype=dtype,
        rich=False,
        hooks=hooks,
        inplace=inplace,
        unbatched=unbatched,
    )


_MODEL_BLOCKS = (
    "conv",
    "conv",
    "residual",
    "projection",
    "shared",
    "conv_fn",
    "elementwise",
    "cat",
    "pool",
)
_GRAPH_BLOCKS = (
    *_MODEL_BLOCKS,
    "conv",
    "residual",
    "bottleneck",
    "squeeze_excite",
    "reshape",
    "shared_linear",
    "fork_residual",
    "multi_branch",
    "bn_only",
    "identity",
)


def graphs(
    *,
    max_steps: int = 8,
    max_channels: int = 8,
    min_size: int = 5,
    max_size: int = 12,
    head: bool | None = None,
    multiple_outputs: bool = True,
    dtype: torch.dtype = torch.float32,
    hooks: bool = False,
    inplace: bool = False,
    unbatched: bool = False,
) -> Any:
    """Strategy for random model DAGs, richer than :func:`models`: the graph fuzzer.

    Everything :func:`models` draws, plus: non-square kernels and per-axis strides, dilation,
    groups and uncentred padding; bottleneck residuals (1x1, kxk, 1x1) with identity or
    projection shortcuts; squeeze-excite gates (global pool, two 1x1 convs, sigmoid, multiply);
    reshapes (flatten/unflatten, transpose round trips); a linear layer called twice (with a
    residual around it at times); residual adds spelled ``+``, ``torch.add`` and ``Tensor.add``;
    more activation kinds (:data:`EXTRA_ACTIVATION_MODULES`, ``PReLU`` among them); residual
    forks at a prunable unit
    (``h = act(bn(conv(x))); out = f(conv(h)) + h``, the branch a 1x1 or 3x3 conv, the shortcut
    ``h`` itself or a 1x1 projection of it, at times a padded conv after the sum); BatchNorms
    that follow no convolution (on an activation, a sum, a pooled map or the input); sums of
    three or four branches (RepVGG-like ``bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)``, with
    identity and BatchNorm-only branches); and ``nn.Identity`` / ``nn.Dropout`` modules. By
    default a model may return several values.

    Parameters
    ----------
    See :func:`models` (``hooks``, ``inplace`` and ``unbatched`` as there, off by default).

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``(model, x)`` with ``model`` a :class:`GeneratedModel` in eval mode.

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from fxcompress.testing import assert_equivalent
    >>> @settings(max_examples=5, database=None, deadline=None)
    ... @given(graphs(dtype=torch.float64))
    ... def check(case):
    ...     model, x = case
    ...     assert_equivalent(torch.fx.symbolic_trace(model), model, x)
    >>> check()
    """
    return _model_strategy(
        _GRAPH_BLOCKS,
        max_steps=max_steps,
        max_channels=max_channels,
        min_size=min_size,
        max_size=max_size,
        head=head,
        multiple_outputs=multiple_outputs,
        dtype=dtype,
        rich=True,
        hooks=hooks,
        inplace=inplace,
        unbatched=unbatched,
    )


def _model_strategy(
    kinds: tuple[str, ...],
    *,
    max_steps: int,
    max_channels: int,
    min_size: int,
    max_size: int,
    head: bool | None,
    multiple_outputs: bool,
    dtype: torch.dtype,
    rich: bool,
    hooks: bool = False,
    inplace: bool = False,
    unbatched: bool = False,
) -> Any:
    st = hypothesis_strategies()
    if inplace:
        kinds = (*kinds, "inplace", "inplace")
    if hooks:
        kinds = (*kinds, "identity", "identity")  # hook targets canonicalization removes
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got max_steps={max_steps!r}")
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    dtype = check_dtype(dtype)

    @st.composite
    def draw_model(draw: Any) -> tuple[GeneratedModel, torch.Tensor]:
        b = ModelBuilder(
            draw, st, max_channels, rich=rich, hooks=hooks, inplace=inplace, unbatched=unbatched
        )
        c = draw(st.integers(1, max_channels))
        h = draw(st.integers(min_size, max_size))
        w = draw(st.integers(min_size, max_size))
        b.shapes.append((c, h, w))
        for _ in range(draw(st.integers(1, max_steps))):
            getattr(b, f"block_{draw(st.sampled_from(kinds))}")()
        extra: list[int] = []
        if multiple_outputs and len(b.shapes) > 2:
            extra = draw(st.lists(st.integers(1, len(b.shapes) - 2), max_size=2, unique=True))
        if head is True or (head is None and draw(st.booleans())):
            b.block_head()
        outputs = [*extra, b.last]
        seed = draw(st.integers(0, 2**31 - 1))
        with seeded(seed):
            modules = {name: make() for name, make in b.makers.items()}
            for m in modules.values():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    randomise_bn(m)
            params = {
                name: nn.Parameter(torch.randn(shape) / math.sqrt(max(1, math.prod(shape[1:]))))
                for name, shape in b.params.items()
            }
            model = GeneratedModel(
                modules, b.steps, outputs, params, hooks=b.hooks, unbatched=b.unbatched
            )
            model = model.to(dtype).eval()
            lead = () if b.unbatched else (b.batch,)
            x = torch.randn((*lead, c, h, w), dtype=dtype)
        return model, x

    return draw_model()
