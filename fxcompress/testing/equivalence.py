"""The equivalence check: :func:`assert_equivalent` and its default tolerances per dtype."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxcompress.graph.util import clone_tensors, compare_outputs
from fxcompress.graph.util import default_rtol as _default_rtol

__all__ = ["assert_equivalent", "default_rtol"]


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance of :func:`assert_equivalent` for outputs of ``dtype``.

    float64: 1e-9, float32: 1e-4, float16: 1e-2, bfloat16: 5e-2 (8 significand bits against
    float16's 11); exact equality for other dtypes.

    Examples
    --------
    >>> default_rtol(torch.float64), default_rtol(torch.float32), default_rtol(torch.float16)
    (1e-09, 0.0001, 0.01)
    >>> default_rtol(torch.int64)
    0.0
    """
    return _default_rtol(dtype)


def _eval_run(model: Any, inputs: tuple[Any, ...]) -> Any:
    """Run ``model`` in eval mode without grad on copies of ``inputs``; restore its flags."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False  # not model.eval(): exported programs' modules refuse eval()
        with torch.no_grad():
            return model(*clone_tensors(inputs))  # a model may write its inputs in place
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def assert_equivalent(a: Any, b: Any, inputs: Any, *, rtol: float | None = None) -> float:
    """Assert that ``a`` and ``b`` compute the same outputs on ``inputs``.

    Both are run in eval mode without gradients (the ``training`` flags of their submodules are
    restored afterwards), each on its own copy of the input tensors. Outputs may be tensors or
    nested tuples, lists and dicts of them; the structures must match, and every tensor pair
    must have the same shape and satisfy ``max|a - b| <= rtol * max|b|`` (``b`` is the
    reference). Non-finite values must sit at the same places. Non-tensor leaves must be equal.

    Parameters
    ----------
    a, b : callable
        The model under test and the reference (modules or any callables).
    inputs : Tensor or tuple
        Positional inputs (a single tensor is one input).
    rtol : float, optional
        Relative tolerance. By default it follows the dtype of each output (the less precise of
        the pair): float64 1e-9, float32 1e-4, float16 1e-2, bfloat16 5e-2, others exact.

    Returns
    -------
    float
        The largest relative error seen (handy for reporting).

    Raises
    ------
    AssertionError
        With the largest error, the output it occurred in (e.g. ``output[1]['logits']``) and
        the element's index.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(3, 3, 1, bias=False)
    >>> x = torch.randn(1, 3, 4, 4)
    >>> assert_equivalent(conv, lambda t: nn.functional.conv2d(t, conv.weight), x) < 1e-6
    True
    >>> assert_equivalent(conv, lambda t: 2 * conv(t), x)
    Traceback (most recent call last):
    ...
    AssertionError: outputs differ at output: max relative error 0.5 > rtol 0.0001 ...
    """
    if rtol is not None and (
        isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0
    ):
        raise ValueError(f"rtol must be a non-negative number or None, got rtol={rtol!r}")
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    out_a = _eval_run(a, args)
    out_b = _eval_run(b, args)
    worst, problem = compare_outputs(out_a, out_b, rtol=rtol)
    if problem is not None:
        raise AssertionError(problem)
    return worst
