"""Fine-tuning by knowledge distillation: a ready-made ``finetune`` callback for :func:`optimize`.

A relaxed model (activations removed, convolutions pruned) starts far from the original's
function; training it on the labels alone recovers less than training it to reproduce the
original's outputs as well (Hinton et al., 2015). :class:`Distill` does the latter with a plain
SGD schedule, seeded, so equal inputs give equal weights.

>>> import torch, fxcompress
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
...                       nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
>>> batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(4)]
>>> out = fxcompress.optimize(model, 0.8, data=batches, latency="flops", progress=False,
...                           finetune=fxcompress.Distill(model, batches, epochs=1))
>>> out.meta["fxcompress"].stage_seconds["finetune"] > 0
True
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.data import flat_tensors, split_batch
from fxcompress.errors import InvalidArgument
from fxcompress.graph.util import clone_tensors
from fxcompress.progress import track

__all__ = ["Distill"]

logger = logging.getLogger(__name__)

KINDS = ("kl", "mse")


def distillation_loss(student: Any, teacher: Any, kind: str, temperature: float) -> torch.Tensor:
    """How far ``student``'s outputs are from ``teacher``'s (tensors or nested containers).

    ``"kl"``: KL divergence of the temperature-softened distributions over dimension 1 (the class
    dimension of logits), scaled by ``temperature**2`` so its gradients keep their size as the
    temperature changes; ``"mse"``: mean squared error. Summed over the output tensors.
    """
    total = torch.zeros(())
    for s, t in zip(flat_tensors(student), flat_tensors(teacher)):
        if kind == "mse" or s.dim() < 2:
            term = F.mse_loss(s.float(), t.float())
        else:
            log_p = F.log_softmax(s.float() / temperature, dim=1)
            q = F.softmax(t.float() / temperature, dim=1)
            term = F.kl_div(log_p, q, reduction="sum") * temperature**2 / (s.numel() / s.shape[1])
        total = total.to(term.device) + term
    return total


class Distill:
    """Train a relaxed model to match the original's outputs (and labels, when batches have them).

    Pass an instance as ``optimize(..., finetune=Distill(model, data))``. Each call copies nothing
    back to the teacher: the teacher is a frozen private copy of the model given here, so the
    caller's model, its weights and its ``training`` flag are never touched. The teacher and the
    student each run on their own copy of every batch, so a model that writes its inputs in place
    changes neither the caller's batches nor what the other one sees.

    Parameters
    ----------
    teacher : torch.nn.Module
        The original model (copied at construction).
    data : iterable
        Training batches, iterated once per epoch: ``inputs`` or ``(inputs, targets)``. A
        ``DataLoader`` with ``shuffle=True`` reshuffles each epoch; a list is used in order.
    epochs : int, default 4
        Passes over ``data``.
    lr : float, default 0.01
        Peak learning rate of SGD with Nesterov momentum, decayed on a cosine when ``data`` has
        a length (else constant).
    temperature : float, default 4.0
        Softening of both distributions in the ``"kl"`` loss.
    alpha : float, default 0.9
        Weight of the distillation term; ``1 - alpha`` weighs ``loss_fn(outputs, targets)``.
        Batches without targets use the distillation term alone.
    loss_fn : callable, default ``torch.nn.functional.cross_entropy``
        The task loss ``loss_fn(outputs, targets)``.
    kind : {"kl", "mse"}, default "kl"
        ``"kl"`` for classifier logits (class dimension 1), ``"mse"`` for any other outputs.
    momentum, weight_decay : float
        SGD settings (defaults 0.9 and 5e-4).
    seed : int, default 0
        Seeds the random number generator during training (dropout, random layers); the
        caller's global RNG state is restored afterwards.
    progress : bool, optional
        Progress bar over the batches (``None``: when stderr is a terminal).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> student = nn.Linear(4, 3)
    >>> data = [torch.randn(16, 4) for _ in range(8)]
    >>> Distill(teacher, data, epochs=2, lr=0.05)(student)
    >>> student.training
    False
    """

    def __init__(
        self,
        teacher: nn.Module,
        data: Iterable[Any],
        *,
        epochs: int = 4,
        lr: float = 0.01,
        temperature: float = 4.0,
        alpha: float = 0.9,
        loss_fn: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
        kind: str = "kl",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        seed: int = 0,
        progress: bool | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise InvalidArgument(
                f"teacher must be an nn.Module (the original model), got {type(teacher).__name__}"
            )
        if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
            raise InvalidArgument(
                f"data must be an iterable of batches (a DataLoader or a list of (inputs, "
                f"targets)), got {type(data).__name__}"
            )
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise InvalidArgument(f"epochs must be a positive int, got {epochs!r}")
        for name, value in (("lr", lr), ("temperature", temperature)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidArgument(f"{name} must be a positive finite number, got {value!r}")
        if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise InvalidArgument(f"alpha must be a number in [0, 1], got {alpha!r}")
        if kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {KINDS}, got {kind!r}")
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.data = data
        self.epochs, self.lr, self.temperature, self.alpha = epochs, float(lr), temperature, alpha
        self.loss_fn, self.kind = loss_fn, kind
        self.momentum, self.weight_decay, self.seed = momentum, weight_decay, seed
        self.progress = progress

    def __repr__(self) -> str:
        return (
            f"Distill(epochs={self.epochs}, lr={self.lr}, temperature={self.temperature}, "
            f"alpha={self.alpha}, kind={self.kind!r}, seed={self.seed})"
        )

    def __call__(self, student: nn.Module) -> None:
        """Train ``student`` in place; it is left in eval mode."""
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            logger.warning("Distill: the model has no trainable parameters; nothing to do")
            student.eval()
            return
        device = params[0].device
        teacher = self.teacher.to(device)
        opt = torch.optim.SGD(
            params,
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.momentum > 0,
            weight_decay=self.weight_decay,
        )
        per_epoch = len(self.data) if hasattr(self.data, "__len__") else None  # type: ignore[arg-type]
        steps = self.epochs * per_epoch if per_epoch else None
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
            if steps
            else (lambda s: 1.0),
        )
        seen = 0
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(self.seed)
            student.train()
            for epoch in range(self.epochs):
                batches = track(
                    self.data, desc=f"distill {epoch + 1}/{self.epochs}", enabled=self.progress
                )
                for batch in batches:
                    x, y = split_batch(batch)
                    x = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in x)
                    with torch.no_grad():
                        target = teacher(*clone_tensors(x))
                    out = student(*clone_tensors(x))
                    loss = distillation_loss(out, target, self.kind, self.temperature)
                    if y is not None and self.alpha < 1.0:
                        y = y.to(device) if isinstance(y, torch.Tensor) else y
                        loss = self.alpha * loss + (1 - self.alpha) * self.loss_fn(out, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    seen += 1
        student.eval()
        if seen == 0:
            raise InvalidArgument("Distill: data yielded no batches; pass a non-empty iterable")
        logger.info("distilled for %d steps (%d epochs)", seen, self.epochs)
