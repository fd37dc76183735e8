"""Distillation fine-tuning: it moves the student towards the teacher, and has library manners."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress import Distill, InvalidArgument
from fxcompress.distill import distillation_loss


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    ).eval()


def _batches(n: int = 6, targets: bool = True) -> list:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 3, 6, 6, generator=g) for _ in range(n)]
    if not targets:
        return xs
    return [(x, torch.randint(0, 5, (8,), generator=g)) for x in xs]


def _kl(student: nn.Module, teacher: nn.Module, batches: list) -> float:
    with torch.no_grad():
        return sum(
            float(
                distillation_loss(
                    student(b[0] if isinstance(b, tuple) else b),
                    teacher(b[0] if isinstance(b, tuple) else b),
                    "kl",
                    1.0,
                )
            )
            for b in batches
        )


def test_distillation_brings_a_damaged_student_towards_the_teacher() -> None:
    teacher, batches = _teacher(), _batches()
    student = copy.deepcopy(teacher)
    student[2] = nn.Identity()  # an activation removed, as a relaxed model has
    before = _kl(student, teacher, batches)
    Distill(teacher, batches, epochs=20, lr=0.05, alpha=1.0)(student)
    after = _kl(student, teacher, batches)
    assert after < 0.5 * before, (before, after)


def test_labels_only_matter_when_alpha_is_below_one() -> None:
    teacher, batches = _teacher(), _batches()
    a, b = copy.deepcopy(teacher), copy.deepcopy(teacher)
    Distill(teacher, batches, epochs=1, alpha=1.0)(a)
    Distill(teacher, [x for x, _ in batches], epochs=1, alpha=0.5)(b)  # no targets: KD only
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c = copy.deepcopy(teacher)
    Distill(teacher, batches, epochs=1, alpha=0.5)(c)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_the_caller_teacher_and_global_state_are_left_alone() -> None:
    teacher = _teacher().train()
    weights = copy.deepcopy(teacher.state_dict())
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    student = copy.deepcopy(teacher)
    Distill(teacher, _batches(), epochs=2)(student)
    assert teacher.training
    assert all(torch.equal(weights[k], v) for k, v in teacher.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    assert not student.training


def test_equal_inputs_give_equal_weights_and_frozen_parameters_stay_frozen() -> None:
    teacher = _teacher()
    runs = []
    for _ in range(2):
        student = copy.deepcopy(teacher).append(nn.Dropout(0.3))
        student[0].weight.requires_grad_(False)
        frozen = student[0].weight.clone()
        Distill(teacher, _batches(), epochs=2, lr=0.05)(student)
        assert torch.equal(student[0].weight, frozen)
        assert not student[0].weight.requires_grad
        runs.append(student.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@given(
    epochs=st.sampled_from([0, -1, 1.5, True, "2"]),
)
@example(epochs=0)
def test_bad_epochs_are_named(epochs: object) -> None:
    with pytest.raises(InvalidArgument, match="epochs"):
        Distill(_teacher(), _batches(), epochs=epochs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"temperature": -1.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"kind": "l1"}, "kind"),
    ],
)
def test_bad_settings_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(InvalidArgument, match=name):
        Distill(_teacher(), _batches(), **kwargs)


def test_bad_teacher_data_and_empty_data_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="teacher"):
        Distill(lambda x: x, _batches())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="iterable of batches"):
        Distill(_teacher(), torch.randn(4, 3, 6, 6))
    with pytest.raises(InvalidArgument, match="no batches"):
        Distill(_teacher(), [])(copy.deepcopy(_teacher()))


def test_mse_kind_handles_non_logit_outputs() -> None:
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    student = copy.deepcopy(teacher)
    student[1] = nn.Identity()
    batches = _batches(targets=False)

    def mse() -> float:
        with torch.no_grad():
            return sum(float(F.mse_loss(student(x), teacher(x))) for x in batches)

    before = mse()
    Distill(teacher, batches, epochs=20, lr=0.05, kind="mse")(student)
    assert mse() < 0.5 * before


def test_optimize_takes_it_as_its_finetune_step() -> None:
    teacher, batches = _teacher(), _batches()
    plain = fxcompress.optimize(
        teacher, 0.7, data=batches, latency="flops", progress=False, loss_fn=F.cross_entropy
    )
    tuned = fxcompress.optimize(
        teacher,
        0.7,
        data=batches,
        latency="flops",
        progress=False,
        loss_fn=F.cross_entropy,
        finetune=Distill(teacher, batches, epochs=10, lr=0.05, alpha=1.0),
    )
    # same plan, so the fine-tuned result differs only by training; it is closer to the teacher
    assert plain.meta["fxcompress"].decisions == tuned.meta["fxcompress"].decisions
    assert _kl(tuned, teacher, batches) < _kl(plain, teacher, batches)


def test_it_also_serves_as_the_per_candidate_finetune_of_importance_scoring() -> None:
    teacher, batches = _teacher(), _batches()
    weights = copy.deepcopy(teacher.state_dict())
    plain = fxcompress.make_plan(teacher, 0.7, data=batches, latency="flops", progress=False)
    tuned = fxcompress.make_plan(
        teacher,
        0.7,
        data=batches,
        latency="flops",
        progress=False,
        candidate_finetune=Distill(teacher, batches, epochs=3, alpha=1.0, kind="mse"),
    )
    # each candidate was trained towards the teacher's outputs on the scoring batches before its
    # output-fidelity damage was measured, so the best plan's damage shrinks
    assert tuned.damage < plain.damage or plain.damage == 0.0
    assert all(torch.equal(weights[k], v) for k, v in teacher.state_dict().items())
