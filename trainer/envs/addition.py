"""`a+b` with a, b in [0, max_operand]: short answers a tiny model can learn on a CPU.

The smoke run's numbers depend on this exactly: prompts, hints, rewards and the rng draws per
sample are those trainer/tasks.py always had (trainer/tasks.py now re-exports these names).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from trainer.envs.base import Environment, Score, Task


@dataclass(frozen=True)
class AdditionTask(Task):
    question: str
    answer: str
    hints: tuple[str, ...]  # weakest first

    @property
    def reference(self) -> str:
        return self.answer

    def prompt(self, hint: str | None = None) -> str:
        """The user message; with `hint`, the teacher's context."""
        return self.question if hint is None else f"{self.question} Hint: {hint}"

    def score(self, completion: str) -> Score:
        """1.0 when the completion's first number is the answer, else 0.0 (no partial credit)."""
        match = re.match(r"\s*(-?\d+)", completion)
        if match is None:
            return Score(0.0, False, "The answer must start with a number.")
        if match.group(1) == self.answer:
            return Score(1.0, True, f"{match.group(1)} is correct.")
        return Score(0.0, False, f"{match.group(1)} is wrong.")


def sibling_hint(completion: str) -> str:
    """Turn a successful sibling's completion into a hint for the teacher."""
    return f"A correct answer is {completion.strip()}."


class Addition(Environment):
    name = "addition"

    def __init__(self, max_operand: int = 19) -> None:
        self.max_operand = max_operand

    def sample(self, rng: random.Random) -> AdditionTask:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        total = a + b
        low = max(0, total - 3)
        return AdditionTask(
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
