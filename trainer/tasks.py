"""Verifiable tasks: a prompt, a checker, and hints layered from weak to strong.

The hints are what makes SDPO work: the teacher is the policy itself with a hint in its context,
so it scores the student's tokens as someone who half-knows the answer would. A successful
sibling rollout of the same prompt is the strongest hint of all (as in the SDPO paper), so the
rollout code may swap it in for `hints[level]`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    question: str
    answer: str
    hints: tuple[str, ...]  # weakest first

    def prompt(self, hint: str | None = None) -> str:
        """The user message; with `hint`, the teacher's context."""
        return self.question if hint is None else f"{self.question} Hint: {hint}"

    def reward(self, completion: str) -> float:
        """1.0 when the completion's first number is the answer, else 0.0 (no partial credit)."""
        match = re.match(r"\s*(-?\d+)", completion)
        return float(match is not None and match.group(1) == self.answer)


def sibling_hint(completion: str) -> str:
    """Turn a successful sibling's completion into a hint for the teacher."""
    return f"A correct answer is {completion.strip()}."


class AdditionTasks:
    """`a+b` with a, b in [0, max_operand]: short answers a tiny model can learn on a CPU."""

    def __init__(self, max_operand: int = 19) -> None:
        self.max_operand = max_operand

    def sample(self, rng: random.Random) -> Task:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        total = a + b
        low = max(0, total - 3)
        return Task(
            question=f"What is {a}+{b}?",
            answer=str(total),
            hints=(
                f"The answer is {'even' if total % 2 == 0 else 'odd'}.",
                f"The answer is between {low} and {low + 6}.",
                f"The answer is {total}.",
            ),
        )

    def corpus(self) -> list[str]:
        """Text the tiny tokenizer is trained on: every question, answer and hint shape."""
        rng = random.Random(0)
        lines = []
        for _ in range(2000):
            task = self.sample(rng)
            lines += [task.prompt(task.hints[-1]), task.answer, *task.hints, sibling_hint(task.answer)]
        return lines


def make_tasks(source: str, *, max_operand: int) -> AdditionTasks:
    if source == "addition":
        return AdditionTasks(max_operand)
    raise ValueError(f"unknown task source {source!r}")
