"""The ``fxcompress`` command line: ``optimize``, ``report``, ``latency``.

Examples::

    fxcompress optimize torchvision:resnet18 --budget 0.6 --input-shape 1,3,224,224 --out r18.pt2
    fxcompress optimize mypkg.models:build --budget 1.0 --input-shape 1,3,64,64 --latency flops
    fxcompress optimize mypkg.models:build --budget 0.7 --input-shape 1,3,64,64 \
        --data mypkg.data:calibration_batches --plot r.png
    fxcompress report r18.report.json --plot r18.png
    fxcompress latency --cache-dir .fxc --show
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

from .errors import FxCompressError

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


def _import(spec: str) -> Any:
    """The object named by ``package.module:attr``."""
    module_name, attr = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load {spec!r}: {exc}") from exc


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
        factory = _import(path)
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
        from fxcompress.plots import _MISSING

        raise UsageError(_MISSING) from exc


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
    model = _load_model(args.model, args.allow_pickle)
    x = torch.randn(*_shape(args.input_shape))
    data = _data(args.data)
    if args.device is not None:  # loaded here, so moving them touches nothing of the caller's
        model, x = model.to(args.device), x.to(args.device)
        if isinstance(data, list):
            data = [_to(batch, args.device) for batch in data]
    result = fxcompress.optimize(
        model,
        args.budget,
        example_inputs=x,
        data=data,
        latency=args.latency,
        device=args.device,
        cache_dir=args.cache_dir,
        methods=_methods(args.methods),
        progress=False if args.quiet else None,  # None: bars only on a terminal
    )
    report = result.meta["fxcompress"]
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
    fields = set(Report.__dataclass_fields__)
    report = Report(**{k: v for k, v in d.items() if k in fields})
    print(report.to_markdown())
    _plot(report, args.plot)
    return 0


def _cmd_latency(args: argparse.Namespace) -> int:
    from fxcompress.latency import LatencyTable

    table = LatencyTable(mode="measure", device=args.device, cache_dir=args.cache_dir)
    if args.model:
        import fxcompress
        from fxcompress.planning import enumerate_options, option_latency

        model = _load_model(args.model, args.allow_pickle)
        x = torch.randn(*_shape(args.input_shape))
        gm = fxcompress.canonicalize(fxcompress.capture(model, x))
        analysis = fxcompress.analyze(gm)
        for opt in enumerate_options(analysis, prune=True):
            option_latency(opt, analysis, table, "float32")
        table.save()
    print(f"cache: {table.cache_path}  entries: {len(table.entries)}")
    if args.show:
        for key, ms in sorted(table.entries.items(), key=lambda kv: -kv[1])[:50]:
            print(f"{ms:10.4f} ms  {key}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcompress", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="compress a model under a latency budget")
    o.add_argument("model", help="torchvision:NAME | package.module:factory | file.pt2")
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
    o.add_argument("--cache-dir", default=None, help="latency cache directory")
    o.add_argument("--out", default=None, help="write the result as a .pt2 program")
    o.add_argument("--plot", default=None, help="also write the report's plots to this .png")
    o.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .pt models")
    o.add_argument("--quiet", action="store_true", help="no progress bars (default: on a terminal)")
    o.set_defaults(func=_cmd_optimize)

    r = sub.add_parser("report", help="render a saved JSON report as Markdown")
    r.add_argument("report", help="a .report.json written by optimize --out")
    r.add_argument("--plot", default=None, help="also write the report's plots to this .png")
    r.set_defaults(func=_cmd_report)

    lat = sub.add_parser("latency", help="build or inspect a latency table")
    lat.add_argument("model", nargs="?", help="measure every merge option of this model")
    lat.add_argument("--input-shape", default="1,3,224,224")
    lat.add_argument("--device", default="cpu")
    lat.add_argument("--cache-dir", required=True)
    lat.add_argument("--show", action="store_true", help="list the slowest entries")
    lat.add_argument("--allow-pickle", action="store_true")
    lat.set_defaults(func=_cmd_latency)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except (UsageError, FxCompressError) as exc:
        print(f"fxcompress: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
