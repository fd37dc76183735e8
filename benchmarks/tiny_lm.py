"""A small byte-level transformer language model, trained here on text available offline.

Shared by the LayerCollapse and Layer Fusion benchmarks. Everything is deterministic given the
seeds, and the default configuration trains in a few minutes on two CPU cores.

Corpus: the top-level ``.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, sorted by name; CPython 3.11 here: 168 files, 4.7 MB).
Every tenth file (index 0, 10, 20, ...) is held out for validation, so validation text comes from
modules the model never saw. Tokens are raw UTF-8 bytes (vocabulary 256), so perplexity is per
byte.

Public functions (their signatures are kept stable for other benchmarks)::

    corpus = load_corpus()                     # Corpus(train, val, vocab_size, description)
    model = TinyLM()                           # small default config, see TinyLM
    losses = train(model, corpus.train, steps=1000)
    ppl = perplexity(model, corpus.val)
    model = trained_model(corpus)              # the same, cached in benchmarks/.cache

Run ``python benchmarks/tiny_lm.py`` to train the default model and print its perplexity.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Block",
    "Corpus",
    "TinyLM",
    "batches",
    "load_corpus",
    "perplexity",
    "train",
    "trained_model",
]


@dataclass(frozen=True)
class Corpus:
    """Token streams for training and validation (1-D int64 tensors of byte values)."""

    train: Tensor
    val: Tensor
    vocab_size: int
    description: str


def load_corpus(max_train_bytes: int | None = None, *, holdout_every: int = 10) -> Corpus:
    """Read the standard library's top-level sources as a byte stream.

    Parameters
    ----------
    max_train_bytes : int, optional
        Truncate the training stream to this many bytes (``None``: everything, ~4.2 MB).
    holdout_every : int
        Every ``holdout_every``-th file (starting with the first) goes to validation.
    """
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    for i, name in enumerate(names):
        with open(os.path.join(root, name), "rb") as f:
            (val_parts if i % holdout_every == 0 else train_parts).append(f.read())
    train_bytes = b"\n".join(train_parts)
    if max_train_bytes is not None:
        train_bytes = train_bytes[:max_train_bytes]
    val_bytes = b"\n".join(val_parts)
    desc = (
        f"Python {'.'.join(map(str, sys.version_info[:3]))} stdlib top-level *.py "
        f"({len(names)} files; every {holdout_every}th held out): "
        f"{len(train_bytes):,} train bytes, {len(val_bytes):,} validation bytes, byte-level tokens"
    )
    return Corpus(_to_tensor(train_bytes), _to_tensor(val_bytes), 256, desc)


def _to_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


class Attention(nn.Module):
    """Causal multi-head self-attention written with shape-free ops (traces with torch.fx)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """The transformer feed-forward block: Linear → GELU → Linear."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A GPT-style byte-level language model: ``model(tokens[B, T]) -> logits[B, T, vocab]``.

    Parameters
    ----------
    vocab_size, context, d_model, n_layers, n_heads, d_ff : int
        Sizes; the defaults give ~0.87 M parameters (4 blocks, 128 wide, MLP hidden 512,
        64-byte context).
    seed : int
        Seed of the initial weights (the global RNG is left as it was).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 64,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 512,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.context = context
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tok = nn.Embedding(vocab_size, d_model)
            self.pos = nn.Parameter(torch.randn(context, d_model) * 0.02)
            self.blocks = nn.Sequential(
                *(Block(d_model, n_heads, d_ff) for _ in range(n_layers))
            )
            self.ln_f = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab_size)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens) + self.pos[: tokens.size(1)]
        return self.head(self.ln_f(self.blocks(x)))


def batches(data: Tensor, batch_size: int, context: int, *, seed: int) -> Callable[[], Tensor]:
    """A sampler of random windows ``[batch_size, context + 1]`` of ``data`` (own generator)."""
    if data.dim() != 1 or data.numel() <= context + 1:
        raise ValueError(f"data must be a 1-D token stream longer than {context + 1} tokens")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1)

    def draw() -> Tensor:
        starts = torch.randint(0, data.numel() - context - 1, (batch_size, 1), generator=gen)
        return data[starts + offsets]

    return draw


def train(
    model: nn.Module,
    data: Tensor,
    steps: int,
    *,
    batch_size: int = 16,
    context: int | None = None,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    warmup: int = 50,
    seed: int = 0,
    extra_loss: Callable[[nn.Module], Tensor] | None = None,
    params: list[nn.Parameter] | None = None,
    log_every: int = 0,
    groups: list[dict] | None = None,
) -> list[float]:
    """Train ``model`` in place with AdamW and a warm-up + cosine schedule; return the losses.

    Parameters
    ----------
    model : nn.Module
        Maps ``tokens[B, T]`` to ``logits[B, T, vocab]`` (a TinyLM or a GraphModule of one).
    data : Tensor
        1-D token stream (``corpus.train``).
    steps : int
        Optimiser steps (0 returns at once).
    extra_loss : callable, optional
        ``extra_loss(model) -> scalar`` added to the cross-entropy every step (e.g. a
        compression regulariser).
    params : list of Parameter, optional
        Train only these (default: every parameter with ``requires_grad``). Parameters with
        fewer than two dimensions (biases, norms, slopes) get no weight decay.
    context : int, optional
        Window length (default: ``model.context``, else 64).
    log_every : int
        Print the running loss every that many steps (0: silent).
    groups : list of dict, optional
        Extra AdamW parameter groups (e.g. ``[{"params": slopes, "lr": 0.02,
        "weight_decay": 0.0}]``); their parameters leave the default groups. The schedule
        scales every group's ``lr`` alike.

    Returns
    -------
    list of float
        The task loss (without ``extra_loss``) at every step.
    """
    if steps <= 0:
        return []
    extra = groups or []
    seen: set[int] = {id(p) for g in extra for p in g["params"]}
    chosen = [p for p in (params or model.parameters()) if p.requires_grad]
    unique = [p for p in chosen if not (id(p) in seen or seen.add(id(p)))]
    param_groups = [
        {"params": [p for p in unique if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in unique if p.dim() < 2], "weight_decay": 0.0},
        *extra,
    ]
    unique += [p for g in extra for p in g["params"]]
    opt = torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    draw = batches(data, batch_size, _context(model, context), seed=seed)
    was_training = model.training
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    try:
        for step in range(steps):
            batch = draw()
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            total = loss if extra_loss is None else loss + extra_loss(model)
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(unique, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                recent = sum(losses[-log_every:]) / log_every
                print(f"  step {step + 1}/{steps} loss {recent:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        model.train(was_training)
    return losses


def _context(model: nn.Module, context: int | None) -> int:
    """The window length: ``context`` if given, else ``model.context``, else 64."""
    if context is not None:
        return context
    return int(getattr(model, "context", 64))


@torch.no_grad()
def perplexity(
    model: nn.Module, data: Tensor, *, context: int | None = None, max_tokens: int = 65_536,
    batch_size: int = 64,
) -> float:
    """Per-token perplexity on non-overlapping windows of the first ``max_tokens`` of ``data``.

    The model is run in eval mode (its ``training`` flag is restored afterwards). ``context``
    defaults to ``model.context``, else 64.
    """
    context = _context(model, context)
    n_windows = min(max_tokens, data.numel() - 1) // context
    if n_windows == 0:
        raise ValueError(f"data has too few tokens ({data.numel()}) for context {context}")
    windows = data[: n_windows * context + 1]
    inputs = windows[:-1].view(n_windows, context)
    targets = windows[1:].view(n_windows, context)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, n_windows, batch_size):
            logits = model(inputs[i : i + batch_size])
            total += float(F.cross_entropy(
                logits.flatten(0, 1), targets[i : i + batch_size].flatten(), reduction="sum"
            ))
    finally:
        model.train(was_training)
    return math.exp(total / (n_windows * context))


CACHE = Path(__file__).parent / ".cache"


def trained_model(corpus: Corpus, steps: int = 1000, *, cache: Path | None = CACHE) -> TinyLM:
    """The default :class:`TinyLM` trained ``steps`` steps on ``corpus.train`` (seed 0).

    Weights are cached in ``cache`` (``benchmarks/.cache``; ``None``: no cache) under a key of
    the corpus, the steps and the torch version, so every benchmark starts from the same model.
    Returned in eval mode.
    """
    key = hashlib.sha1(f"{corpus.description}|{steps}|{torch.__version__}".encode()).hexdigest()
    path = None if cache is None else Path(cache) / f"tiny_lm-{key[:12]}.pt"
    model = TinyLM()
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t = time.perf_counter()
    train(model, corpus.train, steps, log_every=100)
    print(f"trained the base TinyLM for {steps} steps in {time.perf_counter() - t:.0f} s",
          flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return model.eval()


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = load_corpus()
    print(corpus.description)
    model = TinyLM()
    n = sum(p.numel() for p in model.parameters())
    print(f"TinyLM: {n:,} parameters; val perplexity before training "
          f"{perplexity(model, corpus.val):.2f}")
    t = time.perf_counter()
    train(model, corpus.train, args.steps, log_every=50)
    print(f"trained {args.steps} steps in {time.perf_counter() - t:.0f} s; "
          f"val perplexity {perplexity(model, corpus.val):.3f}")


if __name__ == "__main__":
    _main()
