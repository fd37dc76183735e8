"""Damage of each merge option, measured on the network with only that segment relaxed.

Objective (stated, no hidden bonus): the damage of an option is

- with ``loss_fn``: ``max(0, L(relaxed) - L(original))``, the increase of the mean calibration
  loss (``loss_fn(outputs, targets)`` averaged over the calibration batches);
- without: the relative squared error of the outputs,
  ``sum ||f_relaxed(x) - f(x)||^2 / sum ||f(x)||^2`` over the calibration batches.

Damages add up over segments in the planner (an approximation the DP relies on).

Values of the nodes before a segment are taken from one run of the original network (prefix
re-use): each candidate only recomputes from its segment onwards. Candidates can be scored through
any :class:`concurrent.futures.Executor` (then without prefix re-use, since the prefix values
would have to be shipped), and finished scores can be kept in a JSON file to resume.

Every run sees its own copy of the calibration inputs, so a network that writes its inputs in
place neither changes the caller's batches nor makes later runs score drifting inputs. A graph
that writes any tensor in place is scored without prefix re-use: a write after a candidate's
cut would reach the recorded prefix values that the next candidates reuse.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxcompress.data import flat_tensors, split_batch
from fxcompress.depth.analysis import Analysis
from fxcompress.depth.relax import apply_choices
from fxcompress.depth.segment import Segment
from fxcompress.errors import InvalidArgument
from fxcompress.graph.aliasing import mutated_input
from fxcompress.graph.util import clone_tensors

__all__ = ["Calibration", "score_candidates"]

logger = logging.getLogger("fxcompress.importance")
#: the least time between two writes of an importance checkpoint (and one write at the end)
SAVE_EVERY_S = 1.0


#: The former name of an option to score, now the one :class:`Segment` type (relax ``chain``
#: items ``start..stop`` with ``pruned`` units removed); kept while the pipeline moves to it.


@dataclass
class Calibration:
    """Calibration batches: positional inputs and optional targets."""

    inputs: list[tuple[Any, ...]]
    targets: list[Any]

    @classmethod
    def from_data(
        cls, data: Iterable[Any] | None, example_inputs: tuple[Any, ...], *, max_batches: int
    ) -> Calibration:
        inputs: list[tuple[Any, ...]] = []
        targets: list[Any] = []
        if data is not None:
            for batch in data:
                if len(inputs) >= max_batches:
                    break
                x, y = split_batch(batch)
                inputs.append(x)
                targets.append(y)
        if not inputs:
            inputs, targets = [example_inputs], [None]
        return cls(inputs, targets)


def fingerprint(
    gm: fx.GraphModule,
    calib: Calibration,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    candidate_finetune: Callable[[fx.GraphModule], None] | None = None,
) -> str:
    """A digest of everything a damage score depends on.

    The graph's code, every parameter and buffer, the calibration batches and the names of
    ``loss_fn`` and ``candidate_finetune`` (their ``repr`` for modules). Scores saved under one
    fingerprint are never used for another.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(gm.code.encode())

    def add(value: Any) -> None:
        for t in flat_tensors(value):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    for name, t in (*gm.named_parameters(), *gm.named_buffers()):
        h.update(name.encode())
        add(t)
    for x, y in zip(calib.inputs, calib.targets):
        add(list(x))
        add(y)
    for fn in (loss_fn, candidate_finetune):
        h.update(_callable_name(fn).encode())
    return h.hexdigest()


def _callable_name(fn: Any) -> str:
    if fn is None:
        return "None"
    if isinstance(fn, torch.nn.Module):
        return repr(fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class _Scorer:
    def __init__(
        self,
        gm: fx.GraphModule,
        calib: Calibration,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    ) -> None:
        self.gm = gm
        self.calib = calib
        self.loss_fn = loss_fn if calib.targets[0] is not None else None
        self.envs: list[dict[str, Any]] = []
        self.reference: list[list[torch.Tensor]] = []
        self.base_loss = 0.0
        self.order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        # a write in place after a candidate's cut would reach the recorded prefix values that
        # later candidates reuse: such graphs are scored from their inputs
        self.reuse = not any(mutated_input(gm, n) is not None for n in gm.graph.nodes)
        with torch.inference_mode():
            for x, y in zip(calib.inputs, calib.targets):
                env: dict[str, Any] = {}
                out = _Recorder(gm, env).run(*clone_tensors(x))
                self.envs.append(env if self.reuse else {})
                self.reference.append([t.detach() for t in flat_tensors(out)])
                if self.loss_fn is not None:
                    self.base_loss += float(self.loss_fn(out, y)) / len(calib.inputs)

    def damage(self, relaxed: fx.GraphModule, first_node: str | None) -> float:
        cut = self.order.get(first_node, 0) if first_node is not None and self.reuse else -1
        total_err = 0.0
        total_ref = 0.0
        loss = 0.0
        with torch.inference_mode():
            for i, (x, y) in enumerate(zip(self.calib.inputs, self.calib.targets)):
                env = {
                    n: self.envs[i][n.name]
                    for n in relaxed.graph.nodes
                    if n.op != "output"
                    and self.order.get(n.name, cut + 1) <= cut
                    and n.name in self.envs[i]
                }
                out = fx.Interpreter(relaxed).run(*clone_tensors(x), initial_env=env)
                if self.loss_fn is not None:
                    loss += float(self.loss_fn(out, y)) / len(self.calib.inputs)
                    continue
                for a, b in zip(flat_tensors(out), self.reference[i]):
                    total_err += float((a.double() - b.double()).pow(2).sum())
                    total_ref += float(b.double().pow(2).sum())
        if self.loss_fn is not None:
            return max(0.0, loss - self.base_loss)
        return total_err / max(total_ref, 1e-30)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, store: dict[str, Any]) -> None:
        super().__init__(gm)
        self.store = store

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.store[n.name] = value
        return value


def _first_node(analysis: Analysis, cand: Segment, gm: fx.GraphModule) -> str:
    items = analysis.chain(cand.chain).items[cand.start : cand.stop]
    return items[0].input


class _Packed:
    """A GraphModule pickled to bytes, unpacked only where it is run.

    Unpickling a GraphModule re-runs torch.fx's tracer, which patches ``nn.Module.__call__`` for
    the whole process. Keeping it as bytes means a distributed scheduler that deserialises task
    arguments in a thread of the caller's process never traces concurrently with the caller.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm: fx.GraphModule | None = gm
        self.blob: bytes | None = None

    def __getstate__(self) -> dict[str, Any]:
        blob = self.blob if self.blob is not None else pickle.dumps(self.gm)
        return {"gm": None, "blob": blob}

    def load(self) -> fx.GraphModule:
        if self.gm is None:
            assert self.blob is not None
            self.gm = pickle.loads(self.blob)
        return self.gm


def _remote_damage(
    relaxed: fx.GraphModule | _Packed,
    calib: Calibration,
    reference: list[list[torch.Tensor]],
    base_loss: float,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
) -> float:
    """Score one relaxed model from scratch (used with a user-supplied executor)."""
    if isinstance(relaxed, _Packed):
        relaxed = relaxed.load()
    value = evaluate(relaxed, calib, reference, loss_fn)
    return max(0.0, value - base_loss) if loss_fn is not None else value


def evaluate(
    model: Callable[..., Any],
    calib: Calibration,
    reference: Sequence[Sequence[torch.Tensor]],
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
) -> float:
    """The mean calibration loss of ``model`` with ``loss_fn``, else the relative squared error
    ``sum ||model(x) - ref||^2 / sum ||ref||^2`` of its outputs against ``reference`` (the
    flattened outputs of the original network, one list per calibration batch)."""
    err = ref = loss = 0.0
    with torch.no_grad():
        for i, (x, y) in enumerate(zip(calib.inputs, calib.targets)):
            out = model(*clone_tensors(x))  # the model may write its inputs in place
            if loss_fn is not None:
                loss += float(loss_fn(out, y)) / len(calib.inputs)
                continue
            for a, b in zip(flat_tensors(out), reference[i]):
                err += float((a.double() - b.double()).pow(2).sum())
                ref += float(b.double().pow(2).sum())
    return loss if loss_fn is not None else err / max(ref, 1e-30)


def reference_outputs(model: Callable[..., Any], calib: Calibration) -> list[list[torch.Tensor]]:
    """The flattened outputs of ``model`` on every calibration batch (for :func:`evaluate`)."""
    with torch.no_grad():
        return [[t.detach() for t in flat_tensors(model(*clone_tensors(x)))] for x in calib.inputs]


def score_candidates(
    gm: fx.GraphModule,
    analysis: Analysis,
    candidates: Sequence[Segment],
    calib: Calibration,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    candidate_finetune: Callable[[fx.GraphModule], None] | None = None,
    executor: Executor | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """Damage of every candidate segment, keyed by its :attr:`~fxcompress.depth.segment.Segment.id`.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The canonicalised graph ``analysis`` was computed from.
    candidates : sequence of Segment
        The segments to score (each relaxed alone).
    calib : Calibration
    loss_fn : callable, optional
        ``loss_fn(outputs, targets) -> scalar``; used when the batches carry targets.
    candidate_finetune : callable, optional
        LayerMerge-faithful mode: called on each relaxed candidate (in eval mode; train it
        briefly in place, or return the trained model, which is then scored instead) before it
        is scored. Scored without prefix re-use.
    executor : concurrent.futures.Executor, optional
        Score candidates through it (e.g. a ``ProcessPoolExecutor`` or a Dask client's
        executor). Default: in this process, with prefix re-use.
    checkpoint : path, optional
        JSON file of finished scores; existing entries are reused, new ones are added as they
        finish (atomically), so an interrupted scoring resumes.
    progress : bool, optional
        Show a tqdm bar (default: only when stderr is a terminal).
    """
    from fxcompress.progress import bar

    key = fingerprint(gm, calib, loss_fn, candidate_finetune) if checkpoint is not None else ""
    done: dict[str, float] = _load(checkpoint, key)
    todo = [c for c in candidates if c.id not in done]
    if todo and candidate_finetune is None:
        gm = fold_units_for_scoring(gm, analysis)  # same function, ~30 % cheaper to run
    scorer = _Scorer(gm, calib, loss_fn)

    def relaxed_of(c: Segment) -> fx.GraphModule:
        return apply_choices(gm, analysis, [c], record_shapes=False)

    saver = _Checkpoint(checkpoint, key)
    with bar(total=len(todo), desc="scoring", enabled=progress) as pbar, saver.flushing(done):
        if executor is None:
            for c in todo:
                relaxed = relaxed_of(c)
                if candidate_finetune is not None:
                    relaxed = _finetuned(candidate_finetune, relaxed)
                    done[c.id] = _remote_damage(
                        relaxed, calib, scorer.reference, scorer.base_loss, scorer.loss_fn
                    )
                else:
                    done[c.id] = scorer.damage(relaxed, _first_node(analysis, c, gm))
                saver.update(done)
                pbar.update(1)
        else:
            futures = {}
            for c in todo:
                relaxed = relaxed_of(c)
                if candidate_finetune is not None:
                    relaxed = _finetuned(candidate_finetune, relaxed)
                futures[c.id] = executor.submit(
                    _remote_damage,
                    _Packed(relaxed),
                    calib,
                    scorer.reference,
                    scorer.base_loss,
                    scorer.loss_fn,
                )
            for cid, fut in futures.items():
                done[cid] = float(fut.result())
                saver.update(done)
                pbar.update(1)
    return {c.id: done[c.id] for c in candidates}


def _finetuned(fn: Callable[[fx.GraphModule], Any], relaxed: fx.GraphModule) -> Any:
    """A private copy of ``relaxed`` trained by ``fn`` (or the model ``fn`` returned), in eval
    mode."""
    relaxed = copy.deepcopy(relaxed)  # relaxed shares modules with the scored graph
    out = fn(relaxed)
    if out is None or out is relaxed:
        return relaxed.eval()
    if not isinstance(out, nn.Module):
        raise InvalidArgument(
            f"candidate_finetune returned {type(out).__name__}; it must train the candidate it "
            "is given in place and return None, or return the trained model (an nn.Module)"
        )
    return out.eval()


def fold_units_for_scoring(gm: fx.GraphModule, analysis: Analysis) -> fx.GraphModule:
    """A copy of ``gm`` in which each unit's BatchNorm is folded into its layer.

    Node names stay (the BN becomes an ``nn.Identity`` call), so the analysis still applies and
    relaxing a segment of the copy gives the BN-folded form of relaxing it in ``gm``.
    """
    from fxcompress.depth.analysis import units_of
    from fxcompress.graph.recognise import bn_statistics, layer_of
    from fxcompress.graph.util import shallow_clone
    from fxcompress.maths import fold_bn

    out = shallow_clone(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    seen: set[str] = set()
    for chain in analysis.chains:
        for item in chain.items:
            for unit in units_of(item):
                if unit.layer in seen:
                    continue  # branch chains repeat the units of their residual
                seen.add(unit.layer)
                layer, bn = nodes.get(unit.layer), nodes.get(unit.bn) if unit.bn else None
                if layer is None or bn is None or layer.op != "call_module":
                    continue
                params = layer_of(out, layer)
                if params is None:
                    continue
                norm = out.get_submodule(str(bn.target))
                new = fold_bn(params, **bn_statistics(norm)).to_module()
                out.add_submodule(str(layer.target), new)
                out.add_submodule(str(bn.target), nn.Identity())
    out.recompile()
    return out


def _load(path: str | os.PathLike[str] | None, key: str) -> dict[str, float]:
    if path is None or not Path(path).exists():
        return {}
    try:
        data = json.loads(Path(path).read_text())
        scores = {str(k): float(v) for k, v in data.get("scores", {}).items()}
    except (ValueError, OSError, AttributeError, TypeError) as exc:
        logger.warning("ignoring unreadable importance checkpoint %s: %s", path, exc)
        return {}
    if data.get("fingerprint") != key:
        logger.warning(
            "importance checkpoint %s was made for another model, calibration data or loss; "
            "scoring afresh and overwriting it",
            path,
        )
        return {}
    return scores


class _Checkpoint:
    """Writes the scores at most every :data:`SAVE_EVERY_S` seconds and once when scoring ends
    (also on an error, so that a resumed run skips what was scored). A write that fails warns
    once and scoring goes on in memory: a cache is never a reason for a failed run."""

    def __init__(self, path: str | os.PathLike[str] | None, key: str) -> None:
        self.path, self.key = path, key
        self.last = time.monotonic()
        self.broken = path is None

    def update(self, scores: dict[str, float], *, force: bool = False) -> None:
        if self.broken or (not force and time.monotonic() - self.last < SAVE_EVERY_S):
            return
        try:
            _save(self.path, scores, self.key)
        except OSError as exc:
            logger.warning(
                "cannot write importance checkpoint %s (%s); scoring in memory", self.path, exc
            )
            self.broken = True
        self.last = time.monotonic()

    @contextlib.contextmanager
    def flushing(self, scores: dict[str, float]) -> Iterator[None]:
        try:
            yield
        finally:
            self.update(scores, force=True)


def _save(path: str | os.PathLike[str] | None, scores: dict[str, float], key: str) -> None:
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".imp-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump({"format": 2, "fingerprint": key, "scores": dict(sorted(scores.items()))}, fh)
    os.replace(tmp, target)
