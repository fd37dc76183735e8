"""Accuracy at measured speed on real data (scikit-learn digits), side by side with alternatives.

For each model (a CIFAR-style ResNet and a MobileNetV2-style network, trained here) and latency
budget, every compressed model gets the same fine-tuning schedule (:func:`digits.distill`: 4
epochs at lr 0.01 towards the labels and the original's outputs, ``fxcompress.Distill``;
``--finetune labels`` uses the labels alone, :func:`digits.finetune`) and the same yardstick:
the measured CPU latency of its *deployable* form (BatchNorm folded by
``optimize(m, 1.0)``) over that of the original's deployable form, one thread, timed by
:func:`fxcompress.latency.timing.paired_timing` (short runs of the two interleaved, a low
quantile of each; the spread of the per-pair ratios is reported as a noise gauge) at batch 1, batch
64 and under ``torch.compile`` (batch 1).

Main table, methods:

- ``fxc merge``: fxcompress with ``methods=("merge",)`` (the two-stage DP search space);
- ``fxc merge+prune``: ``("merge", "prune")`` (LayerMerge's search space);
- ``fxc merge+prune+drop``: ``("merge", "prune", "drop")``, the DP may also drop whole residual
  blocks (skipped with a note if the installed fxcompress has no ``"drop"`` method);
- ``layer drop``: drop whole identity-shortcut blocks only, chosen by ``planner.solve`` on
  measured block latencies and task-loss damage;
- ``torch-pruning``: Torch-Pruning L2 channel pruning, its ratio bisected to the latency;
- ``smaller from scratch``: the same architecture at a smaller width/depth from a fixed grid
  (the config measured closest below the latency), trained from scratch like the original.

fxcompress uses task-loss importance (``loss_fn=F.cross_entropy``) and chooses among the
planner's best plan and its runners-up by a trial fine-tune of each (``plan_candidates=4``,
``trial_finetune=`` one epoch of the same distillation; ``--plan-candidates 1`` turns it off);
the baselines target the ``fxc merge+prune`` row's measured batch-1 ratio. A plan that misses its
budget on measurement is re-planned once for the ratio actually reached, so every row is
fine-tuned.

Importance proxies (second table): ``fxc merge+prune`` at budgets 0.6 and 0.45 scored by output
fidelity (``loss_fn=None``), by task loss, and LayerMerge-faithfully (``candidate_finetune=``:
each candidate first trained by 16 seeded SGD steps of 16 training images at lr 0.01, then
scored by task loss), fine-tuned the same way; they keep the planner's best plan (no trial
fine-tunes), so the table compares the importance modes alone. The scoring time is
``report.stage_seconds["importance"]`` of a cold run (a fresh ``importance_checkpoint``);
scoring does not depend on the budget, so the 0.45 rows reuse the 0.6 run's scores and report
its cold time. Third table: the from-scratch grid's measured ratios.

Fine-tuning is seeded, so a relaxed model identical to one already fine-tuned in the process
(e.g. ``+drop`` planning what ``merge+prune`` planned) reuses its result (:class:`FinetuneMemo`).

Work runs in ``--jobs`` processes (default 2, one thread each; the timing inside each is one
thread too): each model's main rows, and each of its proxy modes, are a unit, the longest
first. Every finished row is appended to ``accuracy.jsonl`` (keyed by model, method, budget,
table), so an interrupted run continues with ``--resume``; ``--from-log`` only re-renders. The
script prints a rough wall-time estimate at the start (scaled by a measured training step).

    python benchmarks/bench_accuracy.py                       # everything (~20 min on 2 cores)
    python benchmarks/bench_accuracy.py --resume              # continue an interrupted run
    python benchmarks/bench_accuracy.py --from-log            # re-render md/json/png only
    python benchmarks/bench_accuracy.py --quick --models resnet   # smoke run, temp folder

Writes ``benchmarks/results/accuracy.md``, ``accuracy.json``, ``accuracy.png`` and
``accuracy.jsonl``. ``--quick``: 2 training epochs, 1 fine-tuning epoch, budget 0.6, 5 timing
pairs, 4 candidate steps, one process; weights cached in ``.cache/quick/``, output in
``$TMPDIR/accuracy_quick/`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import digits
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.depth import planner
from fxcompress.latency.timing import paired_timing

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / ".cache"
LR = 0.1  # the original's (and the from-scratch baseline's) training rate

MAIN = "main"
PROXY = "proxy"
GRID = "grid"
META = "meta"
FXC = {
    "fxc merge": ("merge",),
    "fxc merge+prune": ("merge", "prune"),
    "fxc merge+prune+drop": ("merge", "prune", "drop"),
}
TARGET = "fxc merge+prune"  # the baselines aim at this row's measured ratio
METHOD_ORDER = [
    "original",
    *FXC,
    "layer drop",
    "torch-pruning",
    "smaller from scratch",
]
PROXIES = ("output fidelity", "task loss", "task loss + candidate SGD")
PROXY_BUDGETS = (0.6, 0.45)


@dataclass(frozen=True)
class Settings:
    """Everything a run's numbers depend on besides the code (recorded in every row)."""

    run: str  # "full" or "quick"
    epochs: int  # the original and the from-scratch baseline
    finetune_epochs: int  # every compressed model
    pairs: int  # paired timings of a result against the original
    search_pairs: int  # quick timings inside the baselines' searches
    candidate_steps: int  # SGD steps per candidate, LayerMerge-faithful importance
    candidate_batch: int  # training images per such step
    cache: Path  # trained weights and importance checkpoints
    finetune: str = "distill"  # "distill" (labels + the original's outputs) or "labels"
    plan_candidates: int = 4  # main fxc rows: plans trial-fine-tuned before one is kept
    trial_epochs: int = 1  # epochs of that trial fine-tune (same schedule otherwise)

    @property
    def label(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cache")
        return d


FULL = Settings("full", 20, 4, 15, 7, 16, 16, CACHE)
QUICK = Settings("quick", 2, 1, 5, 3, 4, 16, CACHE / "quick", plan_candidates=2)


# --------------------------------------------------------------------------- timing


def deployable(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The exact, BN-folded form every method is timed in."""
    return fxcompress.optimize(model.eval(), 1.0, example_inputs=x, latency="flops", progress=False)


def ratio(ref: nn.Module, model: nn.Module, x: torch.Tensor, pairs: int) -> tuple[float, float]:
    """Latency of ``model`` over ``ref`` (interleaved runs, low quantile) and the ratios' spread."""
    t = paired_timing(ref, model, (x,), pairs=pairs, threads=1)
    return t.ratio, t.spread


class FinetuneMemo:
    """``digits.distill`` (or ``digits.finetune``) as a ``finetune=`` callback, memoised.

    Fine-tuning is seeded, so a relaxed model identical to one fine-tuned before (same graph,
    same weights: e.g. ``merge+prune+drop`` planning what ``merge+prune`` planned, or a proxy
    row choosing a main row's plan) gets that result's weights instead of training again.
    """

    def __init__(
        self,
        data: digits.DigitsData,
        epochs: int,
        teacher: nn.Module,
        how: str = "distill",
        seed: int = 0,
    ) -> None:
        self.data, self.epochs, self.teacher, self.how = data, epochs, teacher, how
        self.seed = seed
        self.done: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0

    @staticmethod
    def digest(model: nn.Module) -> str:
        h = hashlib.sha1(str(getattr(model, "code", type(model))).encode())
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def __call__(self, model: nn.Module) -> None:
        key = self.digest(model)
        if key in self.done:
            model.load_state_dict(self.done[key])
            model.eval()
            self.hits += 1
            return
        if self.how == "distill":
            digits.distill(model, self.teacher, self.data, epochs=self.epochs, seed=self.seed)
        else:
            digits.finetune(model, self.data, epochs=self.epochs, seed=self.seed)
        self.done[key] = copy.deepcopy(model.state_dict())


@dataclass
class Ctx:
    """One model's shared state: data, the trained original, its deployable (and compiled) form."""

    name: str
    data: digits.DigitsData
    model: nn.Module
    S: Settings
    ref_d: nn.Module
    ref_ms: float
    finetune: FinetuneMemo
    trial: FinetuneMemo  # the short fine-tune that tells plan candidates apart
    _ref_c: Any = None

    @property
    def x1(self) -> torch.Tensor:
        return self.data.test.x[:1]

    @property
    def x64(self) -> torch.Tensor:
        return self.data.test.x[:64]

    def ref_compiled(self) -> nn.Module:
        if self._ref_c is None:
            self._ref_c = torch.compile(self.ref_d)
        return self._ref_c

    def measure(self, result: nn.Module, row: dict, full: bool = True) -> dict:
        """Test accuracy and measured ratios of ``result`` (deployable) against the original."""
        t0 = time.perf_counter()
        res_d = deployable(result, self.x1)
        row["acc"] = 100 * digits.evaluate(result, self.data.test)
        row["ratio_b1"], row["spread_b1"] = ratio(self.ref_d, res_d, self.x1, self.S.pairs)
        if full:
            row["ratio_b64"], row["spread_b64"] = ratio(self.ref_d, res_d, self.x64, self.S.pairs)
            try:
                rc, mc = self.ref_compiled(), torch.compile(res_d)
                row["ratio_compile_b1"], _ = ratio(rc, mc, self.x1, self.S.pairs)
            except Exception as exc:  # a backend failure is a result, not a crash
                row["ratio_compile_b1"] = None
                row["compile_error"] = type(exc).__name__
        row["params"] = sum(p.numel() for p in res_d.parameters())
        row["measure_s"] = round(time.perf_counter() - t0, 1)
        return row


# --------------------------------------------------------------------------- fxcompress


def drop_available() -> bool:
    return "drop" in getattr(fxcompress.pipeline.checks, "ALL_METHODS", ())


def run_fxcompress(
    ctx: Ctx,
    budget: float,
    methods: tuple[str, ...],
    *,
    checkpoint: Callable[[], str],
    loss_fn: Callable | None = F.cross_entropy,
    candidate_finetune: Callable | None = None,
    select: bool = True,
) -> tuple[nn.Module | None, str, float | None]:
    """``optimize`` with the shared fine-tuning; returns (result, note, scoring seconds).

    ``select``: choose among ``S.plan_candidates`` plans by the trial fine-tune (``ctx.trial``).

    A budget below every plan (``InfeasibleBudget`` without a result) gives no model. A budget
    missed on *measurement* gives the fastest plan the closed loop built, which ``optimize`` has
    fine-tuned like every other result before raising. ``checkpoint()`` gives the
    ``importance_checkpoint`` of each call (a fresh path scores cold).
    """
    try:
        out = fxcompress.optimize(
            ctx.model,
            budget,
            example_inputs=ctx.x1,
            data=ctx.data.calibration(),
            loss_fn=loss_fn,
            finetune=ctx.finetune,
            methods=methods,
            progress=False,
            cache_dir=str(CACHE / "latency"),
            importance_checkpoint=checkpoint(),
            candidate_finetune=candidate_finetune,
            plan_candidates=ctx.S.plan_candidates if select else 1,
            trial_finetune=ctx.trial if select and ctx.S.plan_candidates > 1 else None,
        )
    except fxcompress.InfeasibleBudget as exc:
        if exc.result is None:
            return None, f"infeasible (lowest {exc.minimum:.2f})", None
        out = exc.result
        note = f"missed on measurement (fastest {exc.minimum:.2f}); fastest plan, fine-tuned"
        return out, note, out.meta["fxcompress"].stage_seconds.get("importance")
    return out, "", out.meta["fxcompress"].stage_seconds.get("importance")


def candidate_sgd(data: digits.DigitsData, steps: int, batch: int, lr: float = 0.01):
    """LayerMerge-faithful importance: ``steps`` seeded SGD steps on ``batch`` training images."""

    def candidate_sgd(gm: nn.Module) -> None:
        g = torch.Generator().manual_seed(0)
        params = [p for p in gm.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        with torch.random.fork_rng(devices=[]), digits.num_threads(1), torch.enable_grad():
            torch.manual_seed(0)
            gm.train()
            for _ in range(steps):
                idx = torch.randint(len(data.train), (batch,), generator=g)
                loss = F.cross_entropy(gm(data.train.x[idx]), data.train.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        gm.eval()

    return candidate_sgd


# --------------------------------------------------------------------------- layer drop


def _residual_blocks(model: nn.Module) -> list[str]:
    """Blocks whose shortcut is the identity (dropping one leaves the shapes as they are)."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, digits.BasicBlock) and isinstance(m.shortcut, nn.Identity):
            names.append(name)
        if isinstance(m, digits.InvertedResidual) and m.use_res:
            names.append(name)
    return names


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


class _Shortcut(nn.Module):
    """A dropped block: its shortcut (identity) followed by the block's final activation."""

    def __init__(self, act: bool) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.act else x


@torch.inference_mode()
def _loss(model: nn.Module, batches) -> float:
    return statistics.fmean(float(F.cross_entropy(model(x), y)) for x, y in batches)


def run_layer_drop(ctx: Ctx, target: float) -> tuple[nn.Module, str]:
    """Keep or drop each identity-shortcut block: damage = task-loss increase, price = measured."""
    model, calib = ctx.model, ctx.data.calibration()
    base = _loss(model, calib)
    blocks = _residual_blocks(model)
    segs, ms = [], {}
    for name in blocks:
        m = copy.deepcopy(model)
        _set(m, name, _Shortcut(isinstance(model.get_submodule(name), digits.BasicBlock)))
        dmg = max(0.0, _loss(m, calib) - base)
        r, _ = ratio(ctx.ref_d, deployable(m, ctx.x1), ctx.x1, ctx.S.search_pairs)
        ms[name] = max(0.0, (1 - r) * ctx.ref_ms)
        keep, drop = planner.Choice("keep", ms[name], 0.0), planner.Choice("drop", 0.0, dmg)
        segs.append(planner.ChainSpec(name, 1, (planner.Span(0, 1, (keep, drop)),)))
    problem = planner.Problem(tuple(segs), fixed_latency=max(0.0, ctx.ref_ms - sum(ms.values())))
    try:
        sol = planner.solve(problem, target * ctx.ref_ms)
    except fxcompress.InfeasibleBudget:
        sol = planner.solve(problem, planner.min_latency(problem))
    out = copy.deepcopy(model)
    dropped = [d.chain for d in sol.decisions if d.key == "drop"]
    for name in dropped:
        _set(out, name, _Shortcut(isinstance(model.get_submodule(name), digits.BasicBlock)))
    ctx.finetune(out)
    return out, f"dropped {len(dropped)}/{len(blocks)}"


# --------------------------------------------------------------------------- torch-pruning


def _tp_prune(model: nn.Module, x: torch.Tensor, amount: float) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(
        m,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=amount,
        ignored_layers=[m.fc],
    )
    pruner.step()
    return m


def run_torch_pruning(ctx: Ctx, target: float) -> tuple[nn.Module, str]:
    """Channel pruning, its ratio bisected so the deployable form meets ``target``."""
    lo, hi, best = 0.0, 0.9, None
    for _ in range(6):
        mid = (lo + hi) / 2
        pruned = deployable(_tp_prune(ctx.model, ctx.x1, mid), ctx.x1)
        r, _ = ratio(ctx.ref_d, pruned, ctx.x1, ctx.S.search_pairs)
        if r <= target:
            best, hi = mid, mid
        else:
            lo = mid
    note = ""
    if best is None:
        best, note = 0.9, "cannot reach the latency (ratio 0.9)"
    m = _tp_prune(ctx.model, ctx.x1, best)
    ctx.finetune(m)
    return m, (note or f"ratio {best:.2f}")


# --------------------------------------------------------------------------- from scratch


def _fewer(repeats: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...]:
    return tuple(
        (e, c, n, s) for (e, c, _, s), n in zip(digits.MOBILENET_STAGES, repeats, strict=True)
    )


RESNET_DEFAULT = {"width": 16, "blocks": (2, 2, 2)}
MOBILENET_DEFAULT = {"width": 1.0, "stages": digits.MOBILENET_STAGES}
GRIDS: dict[str, list[dict[str, Any]]] = {
    "resnet": [
        {"width": w, "blocks": b}
        for w in (8, 10, 12, 16)
        for b in ((1, 1, 1), (2, 1, 1), (1, 1, 2), (2, 2, 1), (2, 2, 2))
    ],
    "mobilenet": [
        {"width": w, "stages": _fewer(r)}
        for w in (0.35, 0.5, 0.75, 1.0)
        for r in ((1, 1, 1, 1, 1), (1, 1, 2, 1, 1), (1, 2, 2, 1, 1), (1, 2, 3, 2, 1))
    ],
}
DEFAULTS = {"resnet": RESNET_DEFAULT, "mobilenet": MOBILENET_DEFAULT}


def config_label(name: str, kw: dict[str, Any]) -> str:
    if name == "resnet":
        return f"width {kw['width']}, blocks {'-'.join(map(str, kw['blocks']))}"
    return f"width {kw['width']}, repeats {'-'.join(str(s[2]) for s in kw['stages'])}"


def _fresh(name: str, kw: dict[str, Any]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return digits.BUILDERS[name](**kw).eval()


def measure_grid(ctx: Ctx, log: Log) -> list[dict]:
    """Every grid config's deployable latency over the original's (random weights; logged)."""
    rows = []
    for kw in GRIDS[ctx.name]:
        label = config_label(ctx.name, kw)
        key = (ctx.name, label, 1.0, GRID)

        def measure(kw=kw, label=label) -> dict:
            m = _fresh(ctx.name, kw)
            r, spread = ratio(ctx.ref_d, deployable(m, ctx.x1), ctx.x1, ctx.S.pairs)
            return {"ratio_b1": r, "spread_b1": spread, "params": digits_params(m)}

        rows.append(log.run(key, measure))
    return rows


def digits_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run_scratch(ctx: Ctx, target: float, grid: list[dict]) -> tuple[nn.Module, str]:
    """The grid config with the largest measured ratio <= ``target``, trained from scratch."""
    measured = [
        (r["ratio_b1"], kw)
        for r, kw in zip(grid, GRIDS[ctx.name], strict=True)
        if r.get("ratio_b1") is not None
    ]
    fits = [m for m in measured if m[0] <= target]
    if fits:
        r, kw = max(fits, key=lambda m: m[0])
        note = f"{config_label(ctx.name, kw)} (grid ratio {r:.2f})"
    else:
        r, kw = min(measured, key=lambda m: m[0])
        note = f"{config_label(ctx.name, kw)}: fastest config, none reaches {target:.2f}"
    same = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    model_kw = {} if same == DEFAULTS[ctx.name] else kw
    m = digits.trained(
        ctx.name, ctx.data, epochs=ctx.S.epochs, lr=LR, cache_dir=ctx.S.cache, **model_kw
    )
    return m, note


# --------------------------------------------------------------------------- log


def row_key(row: dict) -> tuple:
    return (row["model"], row["method"], float(row["budget"]), row.get("table", MAIN))


class Log:
    """``accuracy.jsonl``: one finished row per line, appended and synced as it finishes."""

    def __init__(
        self, path: Path, resume: bool, settings: Settings | None, quiet: bool = False
    ) -> None:
        self.path = path
        self.settings = settings
        self.rows: dict[tuple, dict] = {}
        self.after: Callable[[], None] = lambda: None  # called after each new row
        if path.exists() and resume:
            self.rows = read_log(path)
            if not quiet:
                print(f"resuming: {len(self.done())} finished rows in {path}", flush=True)
        elif path.exists() and settings is not None:
            print(f"starting afresh: {path} is replaced (--resume continues it)", flush=True)
            path.unlink()

    def done(self) -> list[dict]:
        return [r for r in self.rows.values() if not r.get("skipped")]

    def get(self, key: tuple) -> dict | None:
        row = self.rows.get(key)
        if row is None or row.get("skipped"):
            return None
        if self.settings is not None and row.get("run") != self.settings.run:
            return None  # a quick row never stands in for a full one, nor the reverse
        if self.settings is not None and row.get("finetune", "labels") != self.settings.finetune:
            return None  # nor a row fine-tuned another way
        if (
            self.settings is not None
            and row.get("table") == MAIN
            and row.get("plan_candidates", 1) != self.settings.plan_candidates
        ):
            return None  # nor one that chose its plan another way
        return row

    def add(self, row: dict) -> dict:
        if self.settings is not None:
            row["run"] = self.settings.run
            row["finetune"] = self.settings.finetune
            row["plan_candidates"] = self.settings.plan_candidates
            row["trial_epochs"] = self.settings.trial_epochs
        self.rows[row_key(row)] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:  # workers of several models append to the same file
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            fcntl.flock(f, fcntl.LOCK_UN)
        print(json.dumps(row), flush=True)
        return row

    def run(self, key: tuple, fn: Callable[[], dict], **extra: Any) -> dict:
        """The logged row of ``key``, or ``fn()``'s fields as a new row (errors become notes)."""
        row = self.get(key)
        if row is not None:
            return row
        model, method, budget, table = key
        row = {"model": model, "method": method, "budget": budget, "table": table, **extra}
        t0 = time.perf_counter()
        try:
            row.update(fn())
        except Exception as exc:  # one failed row must not lose the rest of the run
            traceback.print_exc()
            row["note"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            row["skipped"] = True  # retried by --resume
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        self.add(row)
        if table != GRID:
            self.after()
        return row


def read_log(path: Path) -> dict[tuple, dict]:
    rows: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        rows[row_key(row)] = row
    return rows


# --------------------------------------------------------------------------- driver


def probe_step(name: str, data: digits.DigitsData) -> float:
    """Seconds of one training step of ``name`` (batch 64, one thread): the estimate's unit."""
    m = _fresh(name, DEFAULTS[name]).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    x, y = data.train.x[:64], data.train.y[:64]
    times = []
    with digits.num_threads(1):
        for _ in range(6):
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


# What a row costs besides its training, in training steps (batch 64) of the model itself,
# read off smoke runs: tracing, latency tables, scoring, timing and torch.compile.
OVERHEAD_STEPS = {
    "resnet": {
        "first measure": 450,  # the first torch.compile of a process
        "measure": 110,  # deployable form, accuracy, b1/b64 timings, torch.compile
        "optimize": 25,  # capture, latency table, plan, relax, merge, measured check
        "scoring": 35,  # scoring every option cold (task loss or output fidelity)
        "search": 30,  # layer drop's block timings and torch-pruning's bisection
        "grid": 6,  # one from-scratch grid config timed
        "candidate": 2,  # scoring one candidate after its SGD, besides the steps
        "candidates": 44,  # options to score, ("merge", "prune")
        "small step": 0.33,  # one step at batch 16
    },
    "mobilenet": {
        "first measure": 140,
        "measure": 50,
        "optimize": 25,
        "scoring": 210,
        "search": 20,
        "grid": 4,
        "candidate": 2.4,
        "candidates": 318,
        "small step": 0.27,
    },
}


def estimate_s(
    name: str,
    part: str,
    S: Settings,
    budgets: list[float],
    proxy_budgets: list[float],
    step_s: float,
) -> float:
    """A rough wall-time estimate of one model's ``part`` (``"main"`` or a proxy mode), seconds.

    ``step_s``: one training step of the model, measured now (so a busy machine scales it).
    """
    o, spe = OVERHEAD_STEPS[name], 17  # 1,079 training images in batches of 64
    ft = S.finetune_epochs * spe
    setup = 30  # load the trained weights, deployable form, reference timing
    if part != "main":
        if not proxy_budgets:
            return 0.0
        steps = setup + o["scoring"]  # scored cold once, reused at the other budgets
        if "candidate" in part:
            steps += o["candidates"] * (o["candidate"] + S.candidate_steps * o["small step"])
        return (steps + len(proxy_budgets) * (ft + o["optimize"] + o["measure"] / 4)) * step_s
    n_fxc = 3 if drop_available() else 2
    steps = setup + S.epochs * spe + o["first measure"]
    steps += len(GRIDS[name]) * o["grid"] * S.pairs / 15
    steps += o["scoring"]  # the main rows' task-loss scores, all methods, all budgets
    trials = (
        S.plan_candidates * (S.trial_epochs * spe + o["measure"] / 4)
        if S.plan_candidates > 1
        else 0
    )
    steps += len(budgets) * (
        n_fxc * (ft + o["optimize"] + o["measure"] + trials)
        + 2 * (ft + o["search"] + o["measure"])  # layer drop, torch-pruning
        + 0.4 * S.epochs * spe  # a smaller model from scratch (configs repeat)
        + o["measure"]
    )
    return steps * step_s


def run_model(
    name: str,
    budgets: list[float],
    proxy_budgets: list[float],
    S: Settings,
    log: Log,
    eta: Callable,
    parts: tuple[str, ...] = ("main", *PROXIES),
) -> None:
    """The rows of one model: ``"main"`` (original, grid, main table) and/or proxy modes."""
    data = digits.load_digits_split(0)
    t0 = time.perf_counter()
    model = digits.trained(name, data, epochs=S.epochs, lr=LR, cache_dir=S.cache)
    train_s = round(time.perf_counter() - t0, 1)
    x = data.test.x[:1]
    ref_d = deployable(model, x)
    ref_ms = paired_timing(ref_d, ref_d, (x,), pairs=S.pairs, threads=1).a_ms
    memo = FinetuneMemo(data, S.finetune_epochs, model, S.finetune)
    trial = FinetuneMemo(data, S.trial_epochs, model, S.finetune)
    ctx = Ctx(name, data, model, S, ref_d, ref_ms, memo, trial)
    log.after = eta
    if "main" in parts:
        run_main(ctx, budgets, log, train_s)
    for mode in PROXIES:
        if mode not in parts:
            continue
        for b in proxy_budgets:
            cold = None if b == proxy_budgets[0] else log.get((name, mode, proxy_budgets[0], PROXY))
            log.run(
                (name, mode, b, PROXY), lambda mode=mode, b=b, cold=cold: proxy(ctx, b, mode, cold)
            )


def run_main(ctx: Ctx, budgets: list[float], log: Log, train_s: float) -> None:
    """The original, the from-scratch grid and every main-table row of one model."""
    name, model, S = ctx.name, ctx.model, ctx.S
    log.run((name, "original", 1.0, MAIN), lambda: ctx.measure(model, {}), train_s=train_s)
    grid = measure_grid(ctx, log)

    ckpt_dir = S.cache / "importance"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    def fxc(label: str, b: float) -> dict:
        methods = FXC[label]
        if "drop" in methods and not drop_available():
            return {"note": "skipped: this fxcompress has no 'drop' method", "skipped": True}
        # task-loss scores are shared by every fxc row of a model (same graph, weights, data;
        # fxcompress keys them by option and checks a fingerprint of all that)
        path = str(ckpt_dir / f"digits-{name}-ce.json")
        out, note, score_s = run_fxcompress(ctx, b, methods, checkpoint=lambda: path)
        row = {"note": note, "score_s": score_s}
        if out is not None:
            ctx.measure(out, row)
            row["stage_seconds"] = out.meta["fxcompress"].stage_seconds
            row["trials"] = out.meta["fxcompress"].trials
        return row

    def baseline(fn: Callable, target: float) -> dict:
        out, note = fn(ctx, target)
        return ctx.measure(out, {"note": note, "target": target})

    for b in budgets:
        for label in FXC:
            log.run((name, label, b, MAIN), lambda label=label, b=b: fxc(label, b))
        found = log.get((name, TARGET, b, MAIN)) or {}
        target = found.get("ratio_b1") or b
        for label, fn in (
            ("layer drop", run_layer_drop),
            ("torch-pruning", run_torch_pruning),
            ("smaller from scratch", lambda c, t: run_scratch(c, t, grid)),
        ):
            log.run((name, label, b, MAIN), lambda fn=fn, t=target: baseline(fn, t))


def proxy(ctx: Ctx, b: float, mode: str, cold: dict | None) -> dict:
    """``fxc merge+prune`` at ``b`` with one importance mode.

    Scoring does not depend on the budget, so the first proxy budget of a model and mode scores
    cold (its checkpoint deleted first; a re-plan after a measured miss scores cold again into a
    temporary file, so its time is a cold one too) and later budgets reuse those scores and
    report that cold time (``cold``: the first budget's logged row).
    """
    loss_fn = None if mode == "output fidelity" else F.cross_entropy
    cand = None
    if "candidate" in mode:
        cand = candidate_sgd(ctx.data, ctx.S.candidate_steps, ctx.S.candidate_batch)
    slug = mode.replace(" + ", "-").replace(" ", "-")
    path = ctx.S.cache / "importance" / f"proxy-{ctx.name}-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    reuse = cold is not None and cold.get("score_s") is not None and path.exists()
    if not reuse:
        path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = (str(Path(tmp) / f"scores-{i}.json") for i in range(10))
        paths = iter([str(path)] if not reuse else [])

        def checkpoint() -> str:
            return next(paths, None) or (str(path) if reuse else next(fresh))

        out, note, score_s = run_fxcompress(
            ctx,
            b,
            FXC[TARGET],
            checkpoint=checkpoint,
            loss_fn=loss_fn,
            candidate_finetune=cand,
            select=False,
        )
    if reuse:
        assert cold is not None
        score_s = cold["score_s"]
        note = "; ".join(
            n for n in (f"scores (and cold time) of the {cold['budget']} run", note) if n
        )
    row = {"note": note, "score_s": score_s}
    if out is not None:
        ctx.measure(out, row, full=False)
    return row


# --------------------------------------------------------------------------- output


def _ordered(rows: list[dict], table: str, methods: list[str]) -> list[dict]:
    mine = [r for r in rows if r.get("table", MAIN) == table]
    models = list(dict.fromkeys(r["model"] for r in mine))
    rank = {m: i for i, m in enumerate(methods)}
    return sorted(
        mine,
        key=lambda r: (models.index(r["model"]), -r["budget"], rank.get(r["method"], 99)),
    )


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _selection_text(rows: list[dict]) -> str:
    counts = sorted({r.get("plan_candidates", 1) for r in rows if r.get("table") == MAIN})
    if counts in ([], [1]):
        return "The fxc rows keep the planner's best plan."
    epochs = sorted({r.get("trial_epochs", 1) for r in rows if r.get("table") == MAIN})
    return (
        f"The fxc rows choose among the planner's best plan and its runners-up "
        f"(`plan_candidates={'/'.join(map(str, counts))}`) by a trial fine-tune of "
        f"{'/'.join(map(str, epochs))} epoch(s) of that schedule, scored by the training-batch "
        "loss (`kept plan r of n tried`: r = 0 is the planner's best)."
    )


def render(rows: list[dict]) -> str:
    runs = sorted({r.get("run", "full") for r in rows})
    lines = [
        "# Accuracy at measured speed (scikit-learn digits, 32x32)",
        "",
        "Latency ratio = deployable result / deployable original (BN folded in both), one "
        "thread, the two timed in interleaved runs in the same process, a low quantile of each "
        "(`fxcompress.latency.timing.paired_timing`); `spread` is the interquartile range of the "
        "per-pair ratios over their median (a noise gauge: the machine is shared). Every "
        "compressed model gets the same fine-tuning: "
        + (
            "`digits.distill` (4 epochs at lr 0.01 towards the labels and the original's "
            "outputs, `fxcompress.Distill`)"
            if all(r.get("finetune", "labels") == "distill" for r in rows)
            else "`digits.finetune` (4 epochs at lr 0.01 on the labels)"
        )
        + ". "
        + _selection_text(rows)
        + f" The baselines aim at the `{TARGET}` row's measured batch-1 ratio (`target`).",
        "",
    ]
    if runs != ["full"]:
        lines += [f"**Settings: {', '.join(runs)}** (a `--quick` smoke run: tiny epochs).", ""]
    lines += [
        "| model | method | budget | test acc % | ratio b1 (spread) | speed-up b1 | "
        "ratio b64 | ratio compiled b1 | params | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _ordered(rows, MAIN, METHOD_ORDER):
        note = r.get("note", "")
        if r.get("trials"):
            kept = next(t for t in r["trials"] if t["chosen"])
            tried = sum(t["score"] is not None for t in r["trials"])
            kept_text = f"kept plan {kept['rank']} of {tried} tried"
            note = f"{note}; {kept_text}" if note else kept_text
        if r.get("target") is not None:
            note = f"{note}; target {r['target']:.3f}" if note else f"target {r['target']:.3f}"
        if "acc" not in r:
            lines.append(
                f"| {r['model']} | {r['method']} | {r['budget']} | - | - | - | - | - | - | {note} |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['method']} | {r['budget']} | {r['acc']:.2f} | "
            f"{r['ratio_b1']:.3f} ({r['spread_b1']:.2f}) | {1 / r['ratio_b1']:.2f}x | "
            f"{_f(r.get('ratio_b64'))} | {_f(r.get('ratio_compile_b1'))} | "
            f"{r.get('params', 0):,} | {note} |"
        )
    proxies = _ordered(rows, PROXY, list(PROXIES))
    if proxies:
        lines += [
            "",
            "## Importance proxies",
            "",
            f"`{TARGET}` with three ways of scoring a merge option, the same fine-tuning "
            "afterwards: output fidelity (`loss_fn=None`, the relative error of the outputs), "
            "task loss (`loss_fn=F.cross_entropy`, what the main table uses) and "
            "LayerMerge-faithful (each candidate first trained by `candidate_finetune=`: "
            f"{FULL.candidate_steps} seeded SGD steps of {FULL.candidate_batch} training images "
            f"at lr 0.01, {QUICK.candidate_steps} in a quick run; then scored by task loss). "
            "Scoring time = `report.stage_seconds['importance']`, measured cold (a fresh "
            "`importance_checkpoint`); scores do not depend on the budget, so later budgets "
            "reuse the first budget's scores and show its cold time.",
            "",
            "| model | importance | budget | test acc % | ratio b1 (spread) | scoring s | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in proxies:
            acc = "-" if "acc" not in r else f"{r['acc']:.2f}"
            rb1 = "-" if "acc" not in r else f"{r['ratio_b1']:.3f} ({r['spread_b1']:.2f})"
            lines.append(
                f"| {r['model']} | {r['method']} | {r['budget']} | {acc} | {rb1} | "
                f"{_f(r.get('score_s'), '.1f')} | {r.get('note', '')} |"
            )
    grid = [r for r in rows if r.get("table") == GRID and "ratio_b1" in r]
    if grid:
        lines += [
            "",
            "## Smaller-from-scratch grid",
            "",
            "Deployable latency of each configuration over the original's (random weights, "
            "batch 1); `smaller from scratch` trains the one with the largest ratio at or "
            "below the target (same epochs and rate as the original).",
            "",
            "| model | config | params | ratio b1 |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['method']} | {r['params']:,} | {r['ratio_b1']:.3f} |"
            for r in grid
        ]
    total = sum(
        r.get("wall_s", 0.0) + r.get("train_s", 0.0) for r in rows if r.get("table") != META
    )
    runs_meta = [r for r in rows if r.get("table") == META]
    wall = ""
    if runs_meta:
        m = runs_meta[-1]
        wall = f"; the last invocation took {m['wall_s'] / 60:.1f} min wall with {m['jobs']} job(s)"
    lines += [
        "",
        f"Sum of row times {total / 60:.1f} min (rows run in parallel jobs){wall}. Command: "
        "`.venv/bin/python benchmarks/bench_accuracy.py` (`--resume` continues from "
        "`results/accuracy.jsonl`, `--from-log` re-renders).",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r.get("table", MAIN) == MAIN and "acc" in r]
    models = list(dict.fromkeys(r["model"] for r in main))
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in main if r["model"] == model]
        for method in METHOD_ORDER:
            pts = sorted((1 / r["ratio_b1"], r["acc"]) for r in mine if r["method"] == method)
            if pts:
                style = "*" if method == "original" else ("s" if "fxc" in method else "o")
                ax.plot(
                    *zip(*pts),
                    marker=style,
                    label=method,
                    ls="-" if len(pts) > 1 else "",
                    color=f"C{METHOD_ORDER.index(method)}",  # one colour per method everywhere
                )
        ax.set_title(model)
        ax.set_xlabel("measured speed-up, batch 1 (deployable forms, 1 thread)")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(log_path: Path, out: Path) -> None:
    rows = list(read_log(log_path).values())
    (out / "accuracy.json").write_text(json.dumps(rows, indent=1))
    (out / "accuracy.md").write_text(render(rows))
    plot(rows, out / "accuracy.png")
    print(f"wrote {out / 'accuracy.md'}, accuracy.json, accuracy.png", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet", "mobilenet"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.8, 0.6, 0.45, 0.3])
    p.add_argument(
        "--proxy-budgets",
        nargs="*",
        type=float,
        default=None,
        help="budgets of the importance-proxy table (default 0.6 0.45; --quick: the first budget)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/)")
    p.add_argument("--resume", action="store_true", help="skip rows already in the log")
    p.add_argument("--from-log", action="store_true", help="only re-render md/json/png")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny epochs, one budget")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="work units run in parallel, one process (and one thread) each (default 2; "
        "--quick: 1, a light smoke run that leaves a busy machine's other core alone)",
    )
    p.add_argument(
        "--finetune",
        choices=("distill", "labels"),
        default="distill",
        help="fine-tuning of every compressed model: fxcompress.Distill from the original "
        "(default) or the labels alone (digits.finetune)",
    )
    p.add_argument(
        "--plan-candidates",
        type=int,
        default=None,
        help="main fxc rows: plans trial-fine-tuned (1 epoch) before one is kept (default 4; "
        "--quick: 2; 1 keeps the planner's best plan)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parts", nargs="+", default=["main", *PROXIES], help=argparse.SUPPRESS)
    args = p.parse_args()
    S = replace(QUICK if args.quick else FULL, finetune=args.finetune)
    if args.plan_candidates is not None:
        if args.plan_candidates < 1:
            p.error(f"--plan-candidates must be >= 1, got {args.plan_candidates}")
        S = replace(S, plan_candidates=args.plan_candidates)
    out = args.out or (Path(tempfile.gettempdir()) / "accuracy_quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "accuracy.jsonl"
    if args.from_log:
        if not log_path.exists():
            raise SystemExit(f"no log to render: {log_path} (run without --from-log first)")
        write_outputs(log_path, out)
        return
    budgets = args.budgets
    if args.quick and budgets == p.get_default("budgets"):
        budgets = [0.6]  # one budget unless asked otherwise
    proxy_budgets = args.proxy_budgets
    if proxy_budgets is None:
        proxy_budgets = budgets[:1] if args.quick else list(PROXY_BUDGETS)
    torch.set_num_threads(1)
    try:  # no pool of compile workers beside one-thread jobs on a 2-core machine
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    except Exception:
        pass
    log = Log(log_path, args.resume or args.worker, S, quiet=args.worker)
    data = digits.load_digits_split(0)
    t0 = time.perf_counter()
    if args.worker:
        (name,) = args.models
        parts = tuple(args.parts)
        est = sum(
            estimate_s(name, part, S, budgets, proxy_budgets, probe_step(name, data))
            for part in parts
        )
        tag = f"{name} {' + '.join(parts)}"

        def eta() -> None:
            done = (time.perf_counter() - t0) / 60
            print(f"[{tag}: {done:.1f} of ~{est / 60:.0f} min]", flush=True)

        run_model(name, budgets, proxy_budgets, S, log, eta, parts)
        return

    # work units: each model's main rows, and each of its proxy modes on its own
    step = {m: probe_step(m, data) for m in args.models}
    units = {
        (m, part): estimate_s(m, part, S, budgets, proxy_budgets, step[m])
        for m in args.models
        for part in ("main", *PROXIES)
    }
    units = {u: v for u, v in units.items() if v > 0}
    queue = sorted(units, key=units.get, reverse=True)  # the longest first
    jobs = max(1, args.jobs if args.jobs is not None else (1 if args.quick else 2))
    lanes = [0.0] * jobs
    for u in queue:
        lanes[lanes.index(min(lanes))] += units[u]
    if jobs == 1:
        lanes = [sum(units.values())]
    print(
        f"settings {S.label}; drop method {'available' if drop_available() else 'absent'}; "
        f"{jobs} job(s); estimated wall time ~{max(lanes) / 60:.0f} min (work "
        + ", ".join(
            f"{m} ~{sum(v for u, v in units.items() if u[0] == m) / 60:.0f} min"
            for m in args.models
        )
        + "; rough: less with cached weights or resumed rows, more on a busy machine)",
        flush=True,
    )
    if jobs == 1:

        def eta() -> None:
            done = (time.perf_counter() - t0) / 60
            print(f"[{done:.1f} of ~{max(lanes) / 60:.0f} min]", flush=True)

        for name in args.models:
            run_model(name, budgets, proxy_budgets, S, log, eta)
    else:
        base = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out)]
        base += ["--budgets", *map(str, budgets), "--proxy-budgets", *map(str, proxy_budgets)]
        base += ["--quick"] if args.quick else []
        base += ["--finetune", args.finetune, "--plan-candidates", str(S.plan_candidates)]
        running: list[tuple[tuple[str, str], subprocess.Popen]] = []
        failed = []
        while queue or running:
            while queue and len(running) < jobs:
                unit = queue.pop(0)
                cmd = [*base, "--models", unit[0], "--parts", unit[1]]
                running.append((unit, subprocess.Popen(cmd)))
            time.sleep(1)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                if item[1].returncode:
                    failed.append(item[0])
        if failed:
            print(f"workers failed: {failed} (their finished rows are logged; --resume)")
    wall = time.perf_counter() - t0
    log.add(
        {"model": "-", "method": "run", "budget": 0.0, "table": META, "wall_s": wall, "jobs": jobs}
    )
    write_outputs(log_path, out)
    print(f"total wall time {wall / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
