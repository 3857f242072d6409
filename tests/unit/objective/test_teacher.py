"""`trainer.teacher.EMATeacher`: the SDPO teacher that trails the student."""

import pytest
import torch
from torch import nn

from trainer.objective.teacher import EMATeacher


def test_ema_teacher_update_moves_rate_of_the_way_to_the_student():
    student = nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]]))
        student.bias.fill_(0.0)
    teacher = EMATeacher(student, rate=0.25)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[5.0, -2.0]]))
        student.bias.fill_(4.0)
    teacher.update()
    assert teacher.module.weight.tolist() == [[0.75 * 1 + 0.25 * 5, 0.75 * 2 + 0.25 * -2]]
    assert teacher.module.bias.tolist() == [1.0]
    assert student.weight.tolist() == [[5.0, -2.0]]  # the student is untouched
    assert not any(p.requires_grad for p in teacher.module.parameters())
    assert teacher(torch.tensor([[1.0, 1.0]])).item() == pytest.approx(2.0 + 1.0 + 1.0)


def test_ema_teacher_rejects_bad_rate():
    with pytest.raises(ValueError, match="rate=0"):
        EMATeacher(nn.Linear(1, 1), rate=0)


def test_ema_teacher_never_copies_a_non_finite_student():
    student = nn.Linear(2, 1)
    teacher = EMATeacher(student, rate=0.5)
    before = teacher.module.weight.clone()
    with torch.no_grad():
        student.weight[0, 1] = float("nan")
    assert teacher.update() is False
    assert torch.equal(teacher.module.weight, before)
    with torch.no_grad():
        student.weight[0, 1] = 1.0
    assert teacher.update() is True and torch.isfinite(teacher.module.weight).all()
