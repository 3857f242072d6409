"""Verifiable tasks: a prompt, a checker, and hints layered from weak to strong.

The hints are what makes SDPO work: the teacher is the policy itself with a hint in its context,
so it scores the student's tokens as someone who half-knows the answer would. A successful
sibling rollout of the same prompt is the strongest hint of all (as in the SDPO paper), so the
rollout code may swap it in for `hints[level]`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from trainer.answers import final_number


@dataclass(frozen=True)
class Task:
    question: str
    answer: str
    hints: tuple[str, ...]  # weakest first

    def prompt(self, hint: str | None = None) -> str:
        """The user message; with `hint`, the teacher's context."""
        return self.question if hint is None else f"{self.question} Hint: {hint}"

    def reward(self, completion: str) -> float:
        """1.0 when the answer the completion states (`trainer.answers.final_number`) is right, else 0.0."""
        return float(final_number(completion) == self.answer)


def sibling_hint(completion: str) -> str:
    """Turn a successful sibling's completion into a hint for the teacher."""
    return f"A correct answer is {completion.strip()}."


class AdditionTasks:
    """`a+b` with a, b in [0, max_operand]: short answers a tiny model can learn on a CPU.

    `held_out` pairs, fixed by a seeded shuffle of all (max_operand + 1)^2 of them, are never drawn
    by `sample`: they are the evaluation split (`held_out_tasks`), disjoint from training.
    """

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

    def sample(self, rng: random.Random) -> Task:
        """A training problem (never a held-out one), drawn uniformly from the rest."""
        while True:
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            if (a, b) not in self._held_out_set:
                return self.task(a, b)

    def held_out_tasks(self) -> list[Task]:
        """The evaluation split, in a fixed order."""
        return [self.task(a, b) for a, b in self._held_out]

    @staticmethod
    def task(a: int, b: int) -> Task:
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
            task = self.task(rng.randint(0, self.max_operand), rng.randint(0, self.max_operand))
            lines += [task.prompt(task.hints[-1]), task.answer, *task.hints, sibling_hint(task.answer)]
        return lines


def make_tasks(source: str, *, max_operand: int, held_out: int = 0) -> AdditionTasks:
    if source == "addition":
        return AdditionTasks(max_operand, held_out=held_out)
    raise ValueError(f"unknown task source {source!r}")
