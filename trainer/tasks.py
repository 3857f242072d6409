"""The names the worker used before trainer.envs existed; `a+b` now lives in trainer/envs/addition.py.

Kept so trainer/worker.py and trainer/rollout.py run unchanged until they call trainer.envs.make_env.
"""

from __future__ import annotations

from trainer.envs.addition import Addition as AdditionTasks
from trainer.envs.addition import AdditionTask as Task
from trainer.envs.addition import sibling_hint

__all__ = ["AdditionTasks", "Task", "make_tasks", "sibling_hint"]


def make_tasks(source: str, *, max_operand: int, held_out: int = 0) -> AdditionTasks:
    if source == "addition":
        return AdditionTasks(max_operand, held_out=held_out)
    raise ValueError(f"unknown task source {source!r}")
