"""The SDPO teacher that trails the student: an exponential moving average of its weights.

Why a separate copy: SDPO's teacher is the policy itself with a hint in its context. Scoring with
the live policy makes the targets move with every step; a slowly moving average keeps them stable
while the student changes (the smoke config uses it). The hint, not the weights, is what makes the
teacher know more than the student, so the EMA only smooths.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMATeacher"]


class EMATeacher:
    """A frozen copy of the student that trails it: `teacher <- (1 - rate) * teacher + rate * student`.

    Args:
        model: the student (the bare module, not a DDP wrapper); it is deep-copied once, so the
            teacher has the student's dtype and device.
        rate: weight of the student in each update, in (0, 1]; 1 copies the student.

    Raises:
        ValueError: `rate` outside (0, 1].

    Calling the teacher calls the copy (`teacher(input_ids=...)` -> the model's output). Buffers
    are copied, not averaged. `state_dict` is the copy's, for checkpoints.
    """

    def __init__(self, model: nn.Module, rate: float = 0.05) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"EMATeacher rate={rate} must lie in (0, 1]")
        self.student = model
        self.rate = rate
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self) -> bool:
        """One EMA step towards the student's current parameters (in place, no graph).

        Returns False, and leaves the teacher untouched, when any student parameter or buffer is
        not finite: the teacher never copies a NaN.
        """
        student_params = dict(self.student.named_parameters())
        student_buffers = dict(self.student.named_buffers())
        tensors = [*student_params.values(), *student_buffers.values()]
        if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            return False
        for name, param in self.module.named_parameters():
            param.lerp_(student_params[name].detach(), self.rate)
        for name, buffer in self.module.named_buffers():
            buffer.copy_(student_buffers[name])
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state_dict)
