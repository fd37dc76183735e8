"""Model and data factories for the command-line tests (``--train-data _cli_data:...``).

tests/test_cli_io.py puts this directory on ``sys.path`` and names these as
``_cli_data:factory``, as a user names ``package.module:factory``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

SHAPE = (3, 8, 8)
CLASSES = 4


def build() -> nn.Module:
    """A small classifier: three conv-BN-ReLU units, pooled linear head (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES),
    ).eval()  # fmt: skip


def train_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four labelled batches of eight."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, *SHAPE, generator=g), torch.randint(0, CLASSES, (8,), generator=g))
        for _ in range(4)
    ]


def train_stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches as a one-shot generator (the CLI fetches a fresh one per epoch)."""
    yield from train_batches()


def needs_an_argument(n: int) -> list[torch.Tensor]:
    return [torch.randn(8, *SHAPE) for _ in range(n)]


def one_tensor() -> torch.Tensor:
    return torch.randn(8, *SHAPE)


not_a_function = 3
