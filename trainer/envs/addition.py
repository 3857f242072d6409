"""`a+b` with a, b in [0, max_operand]: short answers a tiny model can learn on a CPU.

`held_out` problems, fixed by a seeded shuffle of all (max_operand + 1)^2 of them, are never drawn
by `sample`: they are the evaluation split, disjoint from training. The answer is read the way
models write it (`trainer.envs.answers.final_number`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from trainer.envs.answers import final_number
from trainer.envs.base import Environment, Score, Task, sibling_hint


@dataclass(frozen=True)
class AdditionTask(Task):
    question: str
    answer: str
    hints: tuple[str, ...]  # weakest first: parity, a range, the answer

    @property
    def reference(self) -> str:
        return self.answer

    def prompt(self, hint: str | None = None) -> str:
        """The user message; with `hint`, the teacher's context."""
        return self.question if hint is None else f"{self.question} Hint: {hint}"

    def score(self, completion: str) -> Score:
        """1.0 when the answer the completion states is right, else 0.0 (no partial credit)."""
        stated = final_number(completion)
        if stated is None:
            return Score(0.0, False, "The attempt states no number.")
        if stated == self.answer:
            return Score(1.0, True, f"{stated} is correct.")
        return Score(0.0, False, f"{stated} is wrong.")


class Addition(Environment):
    name = "addition"
    SPLIT_SEED = 20241130

    def __init__(self, max_operand: int = 19, held_out: int = 0) -> None:
        self.max_operand = max_operand
        pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
        if not 0 <= held_out <= len(pairs) // 2:
            raise ValueError(
                f"held_out={held_out}: at most half of the {len(pairs)} problems with max_operand={max_operand} "
                "may be held out"
            )
        random.Random(self.SPLIT_SEED).shuffle(pairs)
        self._held_out = sorted(pairs[:held_out])
        self._held_out_set = set(self._held_out)

    def sample(self, rng: random.Random) -> AdditionTask:
        """A training problem (never a held-out one), drawn uniformly from the rest."""
        while True:
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            if (a, b) not in self._held_out_set:
                return self.task(a, b)

    @property
    def held_out(self) -> list[AdditionTask]:
        """The evaluation split, in a fixed order."""
        return [self.task(a, b) for a, b in self._held_out]

    @staticmethod
    def task(a: int, b: int) -> AdditionTask:
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
            task = self.task(rng.randint(0, self.max_operand), rng.randint(0, self.max_operand))
            lines += [task.prompt(task.hints[-1]), task.answer, *task.hints, sibling_hint(task.answer)]
        return lines
