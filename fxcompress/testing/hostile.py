"""Hostile pieces of generated models: deterministic hooks (:class:`Hook`) and in-place writes
(:class:`InplaceOp`, :data:`INPLACE_OPS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["HOOK_KINDS", "INPLACE_OPS", "Hook", "InplaceOp", "hook_strategy", "register_hooks"]


HOOK_KINDS = ("output", "output_inplace", "observe", "input")


@dataclass(frozen=True)
class Hook:
    """A deterministic hook that the strategies register on a module of a hostile model.

    ``kind`` is one of

    - ``"output"``: a forward hook that returns ``output * scale + shift`` (replaces the output);
    - ``"output_inplace"``: a forward hook that multiplies the output by ``scale`` in place and
      returns None;
    - ``"observe"``: a forward hook that returns None and writes nothing (the function is
      unchanged, but the module has a hook);
    - ``"input"``: a forward pre-hook that replaces the first input by ``input * scale + shift``.

    Hooks are plain frozen dataclasses, so models carrying them can be deep-copied and pickled.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> relu = nn.ReLU()
    >>> _ = Hook("output", 2.0, 1.0).register(relu)
    >>> relu(torch.tensor([-1.0, 3.0]))
    tensor([1., 7.])
    >>> Hook("input", -1.0).describe()
    'pre-hook: input * -1.0'
    """

    kind: str
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in HOOK_KINDS:
            raise ValueError(f"Hook kind must be one of {HOOK_KINDS}, got kind={self.kind!r}")

    def __call__(self, module: nn.Module, args: tuple[Any, ...], *output: Any) -> Any:
        if self.kind == "input":
            return (args[0] * self.scale + self.shift, *args[1:])
        (out,) = output
        if self.kind == "output":
            return out * self.scale + self.shift
        if self.kind == "output_inplace":
            out.mul_(self.scale)
        return None

    def register(self, module: nn.Module) -> Any:
        """Register on ``module`` (a pre-hook for ``"input"``); returns the removable handle."""
        if self.kind == "input":
            return module.register_forward_pre_hook(self)
        return module.register_forward_hook(self)

    def describe(self) -> str:
        """One line for :meth:`GeneratedModel.program`."""
        if self.kind == "input":
            return f"pre-hook: input * {self.scale}" + (f" + {self.shift}" if self.shift else "")
        if self.kind == "output":
            return f"hook: output * {self.scale}" + (f" + {self.shift}" if self.shift else "")
        if self.kind == "output_inplace":
            return f"hook: output.mul_({self.scale})"
        return "hook: observe"


#: In-place tensor methods the strategies call (method name, argument or None).
INPLACE_OPS: tuple[tuple[str, float | None], ...] = (
    ("mul_", 2.0),
    ("mul_", -0.5),
    ("add_", 1.0),
    ("relu_", None),
)


class InplaceOp(nn.Module):
    """``x.<method>_(value)``: writes its input in place and returns it (a hostile layer).

    Placed first in a :func:`conv_chains` / :func:`linear_chains` model it writes the caller's
    input tensor.

    Examples
    --------
    >>> import torch
    >>> x = torch.ones(2)
    >>> InplaceOp("mul_", 3.0)(x) is x, x
    (True, tensor([3., 3.]))
    """

    def __init__(self, method: str, value: float | None = None) -> None:
        super().__init__()
        takes_value = {"mul_": True, "add_": True, "relu_": False}
        if method not in takes_value:
            raise ValueError(f"method must be 'mul_', 'add_' or 'relu_', got method={method!r}")
        if takes_value[method] != (value is not None):
            need = "a number" if takes_value[method] else "None"
            raise ValueError(f"{method} needs value={need}, got value={value!r}")
        self.method = method
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            return getattr(x, self.method)()
        return getattr(x, self.method)(self.value)

    def extra_repr(self) -> str:
        return f"{self.method}({'' if self.value is None else self.value})"


def hook_strategy(st: Any) -> Any:
    """A :class:`Hook` with its constants drawn from small fixed sets."""
    return st.builds(
        Hook,
        st.sampled_from(("output", "output", "output_inplace", "observe", "input")),
        st.sampled_from((0.5, -1.0, 2.0)),
        st.sampled_from((0.0, 0.25, -1.0)),
    )


def register_hooks(model: nn.Module, hooks: dict[str, Sequence[Hook]]) -> None:
    """Register each named submodule's hooks, in order."""
    for name, specs in hooks.items():
        module = model.get_submodule(name)
        for hook in specs:
            hook.register(module)
