"""Real data and small trained models for the accuracy benchmarks.

scikit-learn's handwritten digits (1,797 real 8x8 greyscale images, ten classes) upsampled to
32x32, split once per seed into train / validation / test, and two CIFAR-style networks with
BatchNorm that train to convergence on a CPU in a few minutes:

- :func:`resnet_digits`: a ResNet of basic blocks (three stages, widths w, 2w, 4w);
- :func:`mobilenet_digits`: a MobileNetV2 of inverted residuals with ReLU6.

Training is seeded and leaves the global RNG state and thread count as it found them. Trained
weights are cached in ``benchmarks/.cache/`` keyed by the whole configuration, so re-runs are fast.

Scripts in ``benchmarks/`` import it as ``import digits`` (the script's folder is on the path)::

    from digits import load_digits_split, trained, evaluate, finetune_schedule
    data = load_digits_split(seed=0)
    model = trained("resnet", data)   # trains once (~30 s on one core), then cached
    evaluate(model, data.test)            # fraction of test images right (about 0.99)
    fxcompress.optimize(model, 0.6, data=data.calibration(), finetune=finetune_schedule(data))
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CACHE = Path(__file__).parent / ".cache"
NUM_CLASSES = 10


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Split:
    """Images ``x`` (N, 1, size, size) scaled to [0, 1] and labels ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in order, as ``(inputs, targets)`` batches."""
        for i in range(0, len(self.y), batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size]


@dataclass(frozen=True)
class DigitsData:
    """A fixed train / validation / test split of the digits, and its seed."""

    train: Split
    val: Split
    test: Split
    seed: int
    size: int

    def calibration(
        self, batches: int = 4, batch_size: int = 32
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``batches`` fixed ``(inputs, targets)`` batches drawn from the training split only."""
        g = torch.Generator().manual_seed(self.seed + 1)
        idx = torch.randperm(len(self.train), generator=g)[: batches * batch_size]
        return [
            (self.train.x[idx[i : i + batch_size]], self.train.y[idx[i : i + batch_size]])
            for i in range(0, len(idx), batch_size)
        ]

    def key(self) -> dict[str, int]:
        return {"data_seed": self.seed, "size": self.size}


def load_digits_split(
    seed: int = 0, size: int = 32, val_fraction: float = 0.1, test_fraction: float = 0.3
) -> DigitsData:
    """The digits upsampled (bilinear) to ``size`` x ``size``, split stratified by class.

    The split depends only on ``seed``: every class is shuffled with it and cut into
    test / validation / train parts of the given fractions.
    """
    from sklearn.datasets import load_digits  # benchmark-only dependency

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(raw.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(test_fraction * len(idx))
        n_val = round(val_fraction * len(idx))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    splits = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks).sort().values
        splits[name] = Split(x[idx], y[idx])
    return DigitsData(splits["train"], splits["val"], splits["test"], seed=seed, size=size)


# --------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetDigits(nn.Module):
    """CIFAR-style ResNet: stem conv, three stages of basic blocks, global pool, linear."""

    def __init__(
        self,
        width: int = 16,
        blocks: Sequence[int] = (2, 2, 2),
        in_ch: int = 1,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, n in enumerate(blocks):
            cout = width * 2**stage
            for i in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expand, channels, repeats, stride) per stage, MobileNetV2's table cut down for 32x32 inputs
MOBILENET_STAGES = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 1), (4, 64, 2, 2), (4, 96, 1, 1))


class MobileNetDigits(nn.Module):
    """MobileNetV2-style network: stem conv, inverted residual stages, 1x1 head conv, linear."""

    def __init__(
        self,
        width: float = 1.0,
        stages: Sequence[tuple[int, int, int, int]] = MOBILENET_STAGES,
        head: int = 256,
        in_ch: int = 1,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(8, round(c * width / 8) * 8)

        cin = ch(16)
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, cin, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6()
        )
        blocks: list[nn.Module] = []
        for expand, c, n, s in stages:
            for i in range(n):
                blocks.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, expand))
                cin = ch(c)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6()
        )
        self.fc = nn.Linear(head, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_digits(width: int = 16, blocks: Sequence[int] = (2, 2, 2)) -> ResNetDigits:
    """A CIFAR-style ResNet (basic blocks, BatchNorm) for 1x32x32 digits; random weights."""
    return ResNetDigits(width, tuple(blocks))


def mobilenet_digits(
    width: float = 1.0, stages: Sequence[tuple[int, int, int, int]] = MOBILENET_STAGES
) -> MobileNetDigits:
    """A MobileNetV2-style network (inverted residuals, ReLU6, BatchNorm); random weights."""
    return MobileNetDigits(width, tuple(tuple(s) for s in stages))  # type: ignore[misc]


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet": resnet_digits,
    "mobilenet": mobilenet_digits,
}


# --------------------------------------------------------------------------- training


def _augment(x: torch.Tensor, g: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random translations of up to ``shift`` pixels (zero padding), one per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    return padded[batch, torch.arange(x.shape[1])[None, :, None, None], rows, cols]


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: unchanged), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    model: nn.Module,
    data: DigitsData,
    epochs: int = 20,
    lr: float = 0.1,
    *,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    seed: int = 0,
    augment: bool = True,
    threads: int | None = 1,
) -> nn.Module:
    """Train ``model`` in place on ``data.train`` (SGD + Nesterov, cosine schedule); return it.

    Seeded: the same model, data and arguments give the same weights. The global RNG state and
    thread count are restored afterwards and the model is left in eval mode. One thread by
    default: on a shared 2-core machine, two threads run these small layers many times slower.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    n = len(data.train)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    with torch.random.fork_rng(devices=[]), num_threads(threads):
        torch.manual_seed(seed)
        model.train()
        batches = TrainBatches(data, batch_size, seed, augment=augment)
        for _ in range(epochs):
            for x, y in batches:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    return model


def finetune(
    model: nn.Module, data: DigitsData, epochs: int = 4, lr: float = 0.01, seed: int = 0
) -> nn.Module:
    """The fine-tuning schedule every compressed model gets: a short, low-rate :func:`train`."""
    return train(model, data, epochs=epochs, lr=lr, seed=seed)


class TrainBatches:
    """The training split as shuffled, augmented ``(inputs, targets)`` batches, re-iterable.

    Each pass is a new seeded permutation (and new random translations), like :func:`train`'s
    epochs; two instances with equal arguments yield the same passes in the same order.
    """

    def __init__(
        self, data: DigitsData, batch_size: int = 64, seed: int = 0, *, augment: bool = True
    ) -> None:
        self.data, self.batch_size, self.augment = data, batch_size, augment
        self.g = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.data.train) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.data.train), generator=self.g)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = self.data.train.x[idx]
            yield (_augment(x, self.g) if self.augment else x), self.data.train.y[idx]


def distill(
    model: nn.Module,
    teacher: nn.Module,
    data: DigitsData,
    epochs: int = 4,
    lr: float = 0.01,
    seed: int = 0,
    threads: int | None = 1,
) -> nn.Module:
    """:func:`finetune`'s schedule with the labels *and* the teacher's outputs as targets.

    ``fxcompress.Distill`` (KL at temperature 4, weight 0.9, plus 0.1 cross-entropy) over
    :class:`TrainBatches`: same epochs, rate, batches and augmentation as :func:`finetune`.
    """
    import fxcompress

    with num_threads(threads):
        fxcompress.Distill(
            teacher, TrainBatches(data, seed=seed), epochs=epochs, lr=lr, seed=seed, progress=False
        )(model)
    return model


def finetune_schedule(
    data: DigitsData, epochs: int = 4, lr: float = 0.01, seed: int = 0
) -> Callable[[nn.Module], None]:
    """:func:`finetune` as a callback for ``fxcompress.optimize(..., finetune=...)``."""

    def run(model: nn.Module) -> None:
        finetune(model, data, epochs=epochs, lr=lr, seed=seed)

    return run


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 256) -> float:
    """Fraction of ``split`` classified correctly (the model's ``training`` flag is restored)."""
    was = model.training
    model.eval()
    right = sum(int((model(x).argmax(1) == y).sum()) for x, y in split.batches(batch_size))
    model.train(was)
    return right / len(split)


def _cache_path(config: dict, cache_dir: Path | None = None) -> Path:
    text = json.dumps(config, sort_keys=True)
    folder = CACHE if cache_dir is None else Path(cache_dir)
    return folder / f"digits-{config['model']}-{hashlib.sha1(text.encode()).hexdigest()[:12]}.pt"


def trained(
    name: str,
    data: DigitsData,
    epochs: int = 20,
    lr: float = 0.1,
    seed: int = 0,
    *,
    cache_dir: str | Path | None = None,
    **model_kw: object,
) -> nn.Module:
    """``BUILDERS[name](**model_kw)`` trained by :func:`train`; weights cached by configuration.

    The cache key is the whole configuration: ``name``, every ``model_kw`` (so a smaller
    ``width=``/``blocks=``/``stages=`` gets its own weights), ``epochs``, ``lr``, ``seed``, the
    data split and the torch version. ``cache_dir`` (default ``benchmarks/.cache``) keeps, e.g.,
    smoke-run weights apart from the real ones.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown model name={name!r}; expected one of {sorted(BUILDERS)}")
    config = {
        "model": name,
        "kw": dict(sorted(model_kw.items())),
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        **data.key(),
        "torch": torch.__version__.split("+")[0],
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BUILDERS[name](**model_kw)
    path = _cache_path(config, None if cache_dir is None else Path(cache_dir))
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train(model, data, epochs=epochs, lr=lr, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes training the same config at once
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval()


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy (the benchmarks never touch the trained original)."""
    return copy.deepcopy(model)
