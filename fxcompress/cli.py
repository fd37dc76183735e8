"""The ``fxcompress`` command line: ``optimize``, ``report``, ``latency``, ``cache``.

Examples::

    fxcompress optimize torchvision:resnet18 --budget 0.6 --input-shape 1,3,224,224 --out r18.pt2
    fxcompress optimize mypkg.models:build --budget 1.0 --input-shape 1,3,64,64 --latency flops
    fxcompress optimize mypkg.models:build --budget 0.7 --input-shape 1,3,64,64 \
        --data mypkg.data:calibration_batches --plot r.png
    fxcompress optimize mypkg.models:build --budget 0.5 --input-shape 1,3,64,64 \
        --finetune distill --train-data mypkg.data:train_batches --epochs 4 --plan-candidates 3
    fxcompress report r18.report.json --plot r18.png
    fxcompress latency --cache-dir .fxc --show
    fxcompress cache --info
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxcompress import meta
from fxcompress.errors import FxCompressError

__all__ = ["main"]

logger = logging.getLogger("fxcompress.cli")


class UsageError(Exception):
    """A bad command line: reported in one line with exit status 2."""


def _load_model(spec: str, allow_pickle: bool) -> nn.Module:
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise UsageError(f"unknown torchvision model {name!r}")
        return torchvision.models.get_model(name, weights=None).eval()
    if spec.endswith(".pt2"):
        if not Path(spec).exists():
            raise UsageError(f"no such file: {spec}")
        logger.warning(
            "%s is an exported program (aten ops): it is traced and checked, but its layers are "
            "not recognised for rewriting yet; pass the model's factory (package.module:factory) "
            "to compress it",
            spec,
        )
        return torch.export.load(spec).module()
    if spec.endswith((".pt", ".pth")):
        if not allow_pickle:
            raise UsageError(
                f"{spec} is a pickled model; loading it runs arbitrary code. Pass "
                "--allow-pickle if you trust it, or export it to .pt2"
            )
        return torch.load(spec, weights_only=False)
    if ":" in spec:
        factory = _import(spec)
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        if not isinstance(model, nn.Module):
            raise UsageError(f"{spec!r} did not give an nn.Module (got {type(model).__name__})")
        return model.eval()
    raise UsageError(
        f"model spec must be torchvision:NAME, package.module:factory or a .pt2 file, got {spec!r}"
    )


def _import(spec: str, flag: str | None = None) -> Any:
    """The object named by ``package.module:attr`` (``flag`` names the option in errors)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        what = f"{flag} " if flag else ""
        raise UsageError(f"{what}must look like package.module:factory, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        what = f"{flag} " if flag else ""
        raise UsageError(
            f"cannot load {what}{spec!r} (expected package.module:factory): {exc}"
        ) from exc


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError as exc:
        raise UsageError(f"--input-shape must look like 1,3,224,224, got {text!r}") from exc
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape must be positive integers, got {text!r}")
    return shape


def _data(path: str | None) -> Any:
    """Calibration batches from a ``.pt`` file (``weights_only``) or a ``module:factory``."""
    if path is None:
        return None
    if not path.endswith((".pt", ".pth")) and ":" in path:
        factory = _import(path, "--data")
        data = factory() if callable(factory) else factory
        if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
            raise UsageError(
                f"--data {path!r} must give an iterable of batches (inputs or (inputs, targets)), "
                f"got {type(data).__name__}"
            )
        return data
    if not Path(path).exists():
        raise UsageError(f"no such file: {path} (--data takes a .pt file or module:factory)")
    try:
        obj = torch.load(path, weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read --data {path}: {str(exc).splitlines()[0]}") from exc
    if isinstance(obj, torch.Tensor):
        return list(obj.split(16))
    if (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and all(isinstance(t, torch.Tensor) for t in obj)
    ):
        return list(zip(obj[0].split(16), obj[1].split(16)))
    raise UsageError("--data must be a .pt file holding a tensor or an (inputs, targets) pair")


class _Refactory:
    """Batches from a factory that returns a one-shot iterator: called again for each pass."""

    def __init__(self, factory: Any, first: Any) -> None:
        self._factory, self._first = factory, first

    def __iter__(self) -> Any:
        first, self._first = self._first, None
        return iter(first if first is not None else self._factory())


def _train_data(spec: str) -> Any:
    """``--train-data package.module:factory``: the factory, called with no arguments, gives an
    iterable of batches (``inputs`` or ``(inputs, targets)``), iterated once per epoch."""
    form = "package.module:factory (a function called with no arguments that returns an "
    form += "iterable of batches: inputs or (inputs, targets))"
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or spec.endswith((".pt", ".pth")):
        raise UsageError(f"--train-data must be {form}, got {spec!r}")
    factory = _import(spec, "--train-data")
    if not callable(factory):
        raise UsageError(
            f"--train-data {spec!r} is a {type(factory).__name__}, not a function; expected {form}"
        )
    try:
        data = factory()
    except TypeError as exc:
        raise UsageError(
            f"calling --train-data {spec!r} with no arguments failed ({exc}); expected {form}"
        ) from exc
    if isinstance(data, (torch.Tensor, str, bytes)) or not hasattr(data, "__iter__"):
        raise UsageError(
            f"--train-data {spec!r} returned a {type(data).__name__}; expected {form}"
        )
    if iter(data) is data:  # a generator: fetch a fresh one for every epoch
        return _Refactory(factory, data)
    return data


def _positive(flag: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} takes a positive integer, got {text!r}")
        return value

    return parse


def _check_finetune_flags(args: argparse.Namespace) -> None:
    """Refuse inconsistent fine-tuning options before any work starts."""
    if args.finetune is None:
        for flag, value in (
            ("--train-data", args.train_data),
            ("--epochs", args.epochs),
            ("--trial-epochs", args.trial_epochs),
        ):
            if value is not None:
                raise UsageError(
                    f"{flag} is an option of --finetune distill; add --finetune distill"
                )
        if args.plan_candidates > 1:
            raise UsageError(
                f"--plan-candidates {args.plan_candidates} chooses among plans by fine-tuning "
                "each: add --finetune distill --train-data package.module:factory"
            )
        return
    if args.train_data is None:
        raise UsageError(
            "--finetune distill needs --train-data package.module:factory (a function called "
            "with no arguments that returns an iterable of training batches)"
        )
    if args.trial_epochs is not None and args.plan_candidates == 1:
        raise UsageError(
            "--trial-epochs sets the fine-tune that tells --plan-candidates apart; "
            "add --plan-candidates K (K > 1)"
        )


def _finetuners(args: argparse.Namespace, teacher: nn.Module) -> tuple[Any, Any]:
    """``(finetune, trial_finetune)`` for ``optimize``: :class:`fxcompress.Distill` callbacks
    from ``--finetune distill`` and its options (``(None, None)`` without it)."""
    if args.finetune is None:
        return None, None
    from fxcompress import Distill

    data = _train_data(args.train_data)
    progress = False if args.quiet else None
    finetune = Distill(teacher, data, epochs=args.epochs or 4, progress=progress)
    trial = None
    if args.trial_epochs is not None:
        trial = Distill(teacher, data, epochs=args.trial_epochs, progress=progress)
    return finetune, trial


def _methods(spec: str) -> tuple[str, ...]:
    """``--methods merge,prune,drop`` as a tuple (checked by ``optimize``)."""
    return tuple(m.strip() for m in spec.split(",") if m.strip())


def _to(batch: Any, device: str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return tuple(_to(t, device) for t in batch)


def _check_plot_path(path: str) -> None:
    """Fail before the work starts if ``--plot`` cannot be written."""
    if not path.lower().endswith(".png"):
        raise UsageError(f"--plot writes a PNG file; use a '.png' path, got {path!r}")
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        from fxcompress.plots import MISSING_MATPLOTLIB

        raise UsageError(MISSING_MATPLOTLIB) from exc


def _plot(report: Any, path: str | None) -> None:
    if path is None:
        return
    from fxcompress.plots import plot_report

    try:
        out = plot_report(report, path)
    except ModuleNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {out}")


def _cmd_optimize(args: argparse.Namespace) -> int:
    import fxcompress
    from fxcompress.io import save

    if args.plot is not None:
        _check_plot_path(args.plot)
    _check_finetune_flags(args)
    model = _load_model(args.model, args.allow_pickle)
    x = torch.randn(*_shape(args.input_shape))
    data = _data(args.data)
    if args.device is not None:  # loaded here, so moving them touches nothing of the caller's
        model, x = model.to(args.device), x.to(args.device)
        if isinstance(data, list):
            data = [_to(batch, args.device) for batch in data]
    finetune, trial_finetune = _finetuners(args, model)
    result = fxcompress.optimize(
        model,
        args.budget,
        example_inputs=x,
        data=data,
        finetune=finetune,
        latency=args.latency,
        device=args.device,
        cache_dir=False if args.no_cache else args.cache_dir,
        methods=_methods(args.methods),
        progress=False if args.quiet else None,  # None: a bar on a terminal, else log lines
        plan_candidates=args.plan_candidates,
        trial_finetune=trial_finetune,
    )
    report = result.meta[meta.REPORT]
    print(report.to_markdown())
    if args.out:
        out = save(result, args.out, (x,))
        report_path = out.with_suffix(".report.json")
        report_path.write_text(report.to_json())
        print(f"saved {out} and {report_path}")
    _plot(report, args.plot)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fxcompress.report import Report

    if args.plot is not None:
        _check_plot_path(args.plot)
    path = Path(args.report)
    if not path.exists():
        raise UsageError(f"no such file: {path}")
    try:
        d = json.loads(path.read_text())
    except ValueError as exc:
        raise UsageError(f"{path} is not a JSON report: {exc}") from exc
    if not isinstance(d, dict) or "budget" not in d:
        raise UsageError(f"{path} is not a report written by fxcompress optimize --out")
    report = Report.from_dict(d)
    print(report.to_markdown())
    _plot(report, args.plot)
    return 0


def _cmd_latency(args: argparse.Namespace) -> int:
    from fxcompress.cache import resolve_cache_dir
    from fxcompress.latency.table import LatencyTable

    table = LatencyTable(
        mode="measure",
        device=args.device,
        cache_dir=resolve_cache_dir(args.cache_dir) or False,
        progress=False if args.quiet else None,
    )
    if args.model:
        import fxcompress
        from fxcompress.depth.options import enumerate_options, option_latency

        model = _load_model(args.model, args.allow_pickle)
        x = torch.randn(*_shape(args.input_shape))
        gm = fxcompress.canonicalize(fxcompress.capture(model, x))
        analysis = fxcompress.analyze(gm)
        for opt in enumerate_options(analysis, prune=True):
            option_latency(opt, analysis, table, "float32")
        if table.cache_path is not None:  # else the cache is unusable (warned): nothing to keep
            table.save()
    print(f"cache: {table.cache_path}  entries: {len(table.entries)}")
    if args.show:
        for key, ms in sorted(table.entries.items(), key=lambda kv: -kv[1])[:50]:
            print(f"{ms:10.4f} ms  {key}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from fxcompress.cache import cache_info, clear_cache

    if args.clear:
        removed = clear_cache(args.cache_dir)
        print(f"removed {removed} files from {cache_info(args.cache_dir).path}")
    if args.info or not args.clear:
        info = cache_info(args.cache_dir)
        state = "" if info.exists else "  (not created yet)"
        print(f"path: {info.path}{state}")
        print(f"files: {info.files}")
        print(f"size: {info.bytes / 2**20:.2f} MB of at most {info.max_bytes / 2**20:.0f} MB")
    return 0


def _common(default: Any) -> argparse.ArgumentParser:
    """``-v`` and ``--quiet``, accepted before and after the subcommand (a subcommand's copy
    has ``default=SUPPRESS``, so it does not undo the same flag given before it)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log progress (INFO)"
    )
    common.add_argument(
        "--quiet",
        action="store_true",
        default=default,
        help="no progress: no bars on a terminal, no per-stage lines elsewhere",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fxcompress", description=__doc__.splitlines()[0], parents=[_common(False)]
    )
    sub = p.add_subparsers(dest="command", required=True)
    flags = _common(argparse.SUPPRESS)

    o = sub.add_parser(
        "optimize", help="compress a model under a latency budget", parents=[flags]
    )
    o.add_argument(
        "model",
        help="torchvision:NAME | package.module:factory | file.pt2 (loaded, not yet compressed)",
    )
    o.add_argument("--budget", type=float, required=True, help="fraction of latency in (0, 1]")
    o.add_argument("--input-shape", required=True, help="e.g. 1,3,224,224")
    o.add_argument(
        "--data",
        help="calibration data: a .pt file holding a tensor or (inputs, targets), or "
        "package.module:factory returning an iterable of batches",
    )
    o.add_argument("--latency", default="measure", choices=["measure", "flops"])
    o.add_argument(
        "--methods",
        default="merge,prune",
        help="comma-separated: merge, prune, drop (drop whole residual branches); or lowrank "
        "alone (default: merge,prune)",
    )
    o.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cpu)")
    o.add_argument(
        "--cache-dir",
        default=None,
        help="cache directory of latency tables and importance scores (default: the user "
        "cache, see fxcompress cache --info)",
    )
    o.add_argument("--no-cache", action="store_true", help="no on-disk cache: work in memory")
    o.add_argument("--out", default=None, help="write the result as a .pt2 program")
    o.add_argument("--plot", default=None, help="also write the report's plots to this .png")
    o.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .pt models")
    o.add_argument(
        "--finetune",
        choices=["distill"],
        default=None,
        help="fine-tune the relaxed model before the final merge: distill = train it to match "
        "the original's outputs (fxcompress.Distill); needs --train-data",
    )
    o.add_argument(
        "--train-data",
        default=None,
        help="package.module:factory: a function called with no arguments that returns an "
        "iterable of training batches (inputs or (inputs, targets)), iterated once per epoch",
    )
    o.add_argument(
        "--epochs", type=_positive("--epochs"), default=None, help="fine-tuning epochs (default 4)"
    )
    o.add_argument(
        "--plan-candidates",
        type=_positive("--plan-candidates"),
        default=1,
        help="fine-tune the best plan and up to K-1 runners-up briefly and keep the one that "
        "trains best (default 1: the planner's best plan); needs --finetune",
    )
    o.add_argument(
        "--trial-epochs",
        type=_positive("--trial-epochs"),
        default=None,
        help="epochs of each trial fine-tune with --plan-candidates (default: --epochs)",
    )
    o.set_defaults(func=_cmd_optimize)

    r = sub.add_parser("report", help="render a saved JSON report as Markdown", parents=[flags])
    r.add_argument("report", help="a .report.json written by optimize --out")
    r.add_argument("--plot", default=None, help="also write the report's plots to this .png")
    r.set_defaults(func=_cmd_report)

    _add_latency_and_cache(sub, flags)
    return p


def _add_latency_and_cache(sub: Any, flags: argparse.ArgumentParser) -> None:
    """The ``latency`` and ``cache`` subcommands."""
    lat = sub.add_parser("latency", help="build or inspect a latency table", parents=[flags])
    lat.add_argument("model", nargs="?", help="measure every merge option of this model")
    lat.add_argument("--input-shape", default="1,3,224,224")
    lat.add_argument("--device", default="cpu")
    lat.add_argument("--cache-dir", default=None, help="the table's directory (default: the cache)")
    lat.add_argument("--show", action="store_true", help="list the slowest entries")
    lat.add_argument("--allow-pickle", action="store_true")
    lat.set_defaults(func=_cmd_latency)

    c = sub.add_parser("cache", help="inspect or clear the on-disk cache", parents=[flags])
    c.add_argument("--info", action="store_true", help="show its path, files and size (default)")
    c.add_argument("--clear", action="store_true", help="delete its latency and importance files")
    c.add_argument("--cache-dir", default=None, help="another directory than the default cache")
    c.set_defaults(func=_cmd_cache)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    # off a terminal, progress is one logged line per stage: shown unless --quiet
    stages = logging.getLogger("fxcompress.progress")
    previous = stages.level
    if not args.quiet:
        stages.setLevel(logging.INFO)
    try:
        return int(args.func(args))
    except (UsageError, FxCompressError) as exc:
        print(f"fxcompress: error: {exc}", file=sys.stderr)
        return 2
    finally:
        stages.setLevel(previous)


if __name__ == "__main__":
    sys.exit(main())
