"""Generated models: a fixed list of :class:`Step` run by a :class:`GeneratedModel`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.testing.hostile import Hook, register_hooks

__all__ = ["GeneratedModel", "Step"]


@dataclass(frozen=True)
class Step:
    """One step of a :class:`GeneratedModel`: ``values.append(op(values[i] for i in inputs))``.

    ``op`` is ``"module"`` (call the submodule named ``arg``), ``"conv_fn"`` (``F.conv2d`` on the
    model's parameters ``arg``), ``"add"``, ``"cat"``, ``"relu"`` (``F.relu``), ``"relu_method"``
    (``x.relu()``), ``"scale"`` (``x * arg``), ``"gate"`` (``x * sigmoid(x)``),
    ``"max_pool"``/``"avg_pool"`` (2x2), ``"global_pool"`` (adaptive average to 1x1),
    ``"flatten"``, ``"mul"`` (two values), ``"sigmoid"``, ``"reshape"`` (flatten the spatial
    axes and unflatten them to ``arg``), ``"transpose"`` (swap the spatial axes and back),
    ``"mean_pool"`` (``x.mean((2, 3), keepdim=True)``) or ``"inplace"`` (``x.<method>(value)``
    with ``arg = (method, value)`` from :data:`INPLACE_OPS`: writes ``values[i]`` in place and
    appends the same tensor). ``"add"`` is spelled ``a + b`` unless ``arg`` is ``"torch.add"``
    or ``"method"`` (``a.add(b)``).
    """

    op: str
    inputs: tuple[int, ...]
    arg: Any = None


class GeneratedModel(nn.Module):
    """A model that runs a fixed list of :class:`Step` (traceable by ``torch.fx``).

    ``forward(x)`` starts with ``values = [x]``, appends the result of every step and returns
    the values listed in ``outputs`` (one tensor, or a tuple when several).

    Parameters
    ----------
    modules : dict of str to nn.Module
        Submodules, called by ``"module"`` steps.
    steps : sequence of Step
        The program.
    outputs : sequence of int
        Indices into ``values`` (negative ones count from the end).
    params : dict of str to nn.Parameter, optional
        Parameters of ``"conv_fn"`` steps.
    hooks : dict of str to sequence of Hook, optional
        Hooks registered on the named submodules (shown by :meth:`program`).
    unbatched : bool
        The input has no batch axis (``(C, H, W)``): concatenation, flattening and the spatial
        reductions use negative axes.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> m = GeneratedModel(
    ...     {"conv": nn.Conv2d(2, 2, 3, padding=1)},
    ...     [Step("module", (0,), "conv"), Step("add", (0, 1)), Step("relu", (2,))],
    ... )
    >>> print(m.program())
    v1 = conv(v0)
    v2 = v0 + v1
    v3 = relu(v2)
    return v3
    >>> m(torch.randn(1, 2, 5, 5)).shape
    torch.Size([1, 2, 5, 5])
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        steps: Sequence[Step],
        outputs: Sequence[int] = (-1,),
        params: dict[str, nn.Parameter] | None = None,
        hooks: dict[str, Sequence[Hook]] | None = None,
        unbatched: bool = False,
    ) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        for name, param in (params or {}).items():
            self.register_parameter(name, param)
        self.steps = tuple(steps)
        n = len(self.steps) + 1
        self.outputs = tuple(o % n for o in outputs)
        self.unbatched = unbatched
        self.hook_specs = {name: tuple(specs) for name, specs in (hooks or {}).items() if specs}
        register_hooks(self, self.hook_specs)

    def forward(self, x: torch.Tensor) -> Any:
        values = [x]
        for step in self.steps:
            values.append(self._run(step, [values[i] for i in step.inputs]))
        if len(self.outputs) == 1:
            return values[self.outputs[0]]
        return tuple(values[i] for i in self.outputs)

    def _run(self, step: Step, args: list[torch.Tensor]) -> torch.Tensor:
        op = step.op
        if op == "module":
            return getattr(self, step.arg)(args[0])
        if op == "conv_fn":
            weight, bias, stride, padding = step.arg
            b = getattr(self, bias) if bias is not None else None
            return F.conv2d(args[0], getattr(self, weight), b, stride=stride, padding=padding)
        if op == "add":
            if step.arg == "torch.add":
                return torch.add(args[0], args[1])
            if step.arg == "method":
                return args[0].add(args[1])
            return args[0] + args[1]
        if op == "mul":
            return args[0] * args[1]
        if op == "sigmoid":
            return torch.sigmoid(args[0])
        if op == "inplace":
            method, value = step.arg
            if value is None:
                return getattr(args[0], method)()
            return getattr(args[0], method)(value)
        if op == "reshape":
            if self.unbatched:
                return args[0].flatten(-2).unflatten(-1, step.arg)
            return args[0].flatten(2).unflatten(2, step.arg)
        if op == "transpose":
            return args[0].transpose(-1, -2).contiguous().transpose(-1, -2)
        if op == "mean_pool":
            if self.unbatched:
                return args[0].mean((-2, -1), keepdim=True)
            return args[0].mean((2, 3), keepdim=True)
        if op == "cat":
            return torch.cat(args, dim=-3 if self.unbatched else 1)
        if op == "relu":
            return F.relu(args[0])
        if op == "relu_method":
            return args[0].relu()
        if op == "scale":
            return args[0] * step.arg
        if op == "gate":
            return args[0] * torch.sigmoid(args[0])
        if op == "max_pool":
            return F.max_pool2d(args[0], 2)
        if op == "avg_pool":
            return F.avg_pool2d(args[0], 2)
        if op == "global_pool":
            return F.adaptive_avg_pool2d(args[0], 1)
        if op == "flatten":
            return torch.flatten(args[0], -3 if self.unbatched else 1)
        raise ValueError(f"unknown step op {op!r}")

    def program(self) -> str:
        """The steps as pseudo-code, one line each."""
        lines = []
        for i, s in enumerate(self.steps, start=1):
            a = [f"v{j}" for j in s.inputs]
            body = {
                "module": lambda s=s, a=a: f"{s.arg}({a[0]})",
                "conv_fn": lambda s=s, a=a: f"F.conv2d({a[0]}, {s.arg})",
                "add": lambda a=a: f"{a[0]} + {a[1]}",
                "mul": lambda a=a: f"{a[0]} * {a[1]}",
                "cat": lambda a=a: f"cat([{', '.join(a)}], 1)",
                "scale": lambda s=s, a=a: f"{a[0]} * {s.arg}",
                "gate": lambda a=a: f"{a[0]} * sigmoid({a[0]})",
                "inplace": lambda s=s, a=a: (
                    f"{a[0]}.{s.arg[0]}({'' if s.arg[1] is None else s.arg[1]})"
                ),
            }.get(s.op, lambda s=s, a=a: f"{s.op}({a[0]})")()
            if s.op == "module" and s.arg in self.hook_specs:
                body += "  # " + "; ".join(h.describe() for h in self.hook_specs[s.arg])
            lines.append(f"v{i} = {body}")
        lines.append("return " + ", ".join(f"v{o}" for o in self.outputs))
        if self.unbatched:
            lines.insert(0, "# v0 has no batch axis: (C, H, W)")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return "program:\n  " + self.program().replace("\n", "\n  ")
