"""`code_arith`: one-line Python functions a tiny CPU model learns in minutes, rewarded by tests run
in the sandbox. Why this family: the reward path is the real one (a program, a sandbox, tests),
while the skill (read "Return n times 7." and write `return n * 7`) is small enough for a 2-layer
model, and the held-out tasks are unseen (name, variable, operator, constant) combinations, so a
rising held-out pass rate means the model composes, not memorises.
"""

from __future__ import annotations

import itertools
import operator
import random

from trainer.envs.base import FiniteEnvironment, split
from trainer.envs.code import CodeTask, score_code_many
from trainer.sandbox import Check

OPERATORS = (("plus", "+"), ("minus", "-"), ("times", "*"))
APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
VARIABLES = ("x", "n", "a", "y")
NAMES = ("f", "g", "h")
INPUTS = (-3, 0, 2, 7, 11)


def make_task(name: str, var: str, word: str, op: str, k: int) -> CodeTask:
    code = f'def {name}({var}):\n    """Return {var} {word} {k}."""\n'
    body = f"    return {var} {op} {k}\n"
    asserts = "".join(f"    assert candidate({v}) == {APPLY[op](v, k)}\n" for v in INPUTS)
    return CodeTask(
        name=f"code_arith/{name}-{var}-{word}-{k}",
        code=code,
        check=Check(entry_point=name, tests=f"def check(candidate):\n{asserts}", call=f"check({name})"),
        reference=code + body,
        hints=(f"Use the operator {op}.", f"A correct solution:\n{code}{body}"),
        instruction="",
        timeout_s=2.0,
        memory_mb=256,
    )


class CodeArith(FiniteEnvironment):
    """3 names x 4 variables x 3 operators x 10 constants = 360 tasks, shuffled with a fixed seed;
    every 5th held out (so each constant and operator also appears in training)."""

    name = "code_arith"
    executes_code = True

    def __init__(self, held_out_every: int = 5) -> None:
        combos = itertools.product(NAMES, VARIABLES, OPERATORS, range(10))
        self.tasks = [make_task(name, var, word, op, k) for name, var, (word, op), k in combos]
        random.Random(0).shuffle(self.tasks)
        self.train, self.held_out = split(self.tasks, held_out_every)

    def score_many(self, tasks, completions, *, workers=2):
        return score_code_many(tasks, completions, workers=workers)

    def corpus(self) -> list[str]:
        return [line for task in self.tasks for line in (task.prompt(), *task.hints, task.reference or "")]
