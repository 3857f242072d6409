"""Code tasks: the model completes a function, the sandbox runs the task's own tests against it.

`score` accepts the answer as models write it: a continuation of the prompt (the body, or the
rest of the file), or a fenced block holding the whole function (then the prompt's own code,
imports and helpers, is kept in front of it, and the block's definition replaces the stub).
Reasoning models draft before they answer: blocks inside `<think>...</think>` are never the
answer (`trainer.envs.answers.without_reasoning`; evalplus/evalplus#297), and of several blocks
that define the entry point the LAST is taken, since models correct themselves (simonw/llm#717);
blocks that do not define it (usage examples, a trailing test snippet) are used only when none does.
The
tests run in the sandbox's judge process against the candidate through its plain-data bridge
(trainer.sandbox), so exiting early, patching builtins or returning an always-equal object earns
nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.envs.answers import without_reasoning
from trainer.envs.base import Score, Task, truncate
from trainer.sandbox import Check, ExecutionResult, Sandbox, default_sandbox, run_many

FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
# Limits per program: HumanEval's own runner uses 3 s; a tiny function needs far less than 512 MiB.
TIMEOUT_S = 3.0
MEMORY_MB = 512


@dataclass(frozen=True)
class CodeTask(Task):
    """code: what the model continues (signature and docstring); check: the trusted tests.

    hints: (a partial hint, the reference solution); reference: a whole correct program.
    """

    name: str
    code: str
    check: Check
    reference: str | None
    hints: tuple[str, ...]
    instruction: str = "Complete the following Python function.\n\n"
    timeout_s: float = TIMEOUT_S
    memory_mb: int = MEMORY_MB
    # What the candidate's program starts with when `code` (what the prompt shows) is an excerpt of
    # it (feature_deletion's context_lines); None: `code` itself.
    program_code: str | None = None

    def prompt(self, hint: str | None = None) -> str:
        hinted = "" if hint is None else f"Hint: {hint}\n\n"
        return f"{self.instruction}{hinted}{self.code}"

    def demonstration(self) -> str | None:
        """The continuation of `code` that makes the reference (the body), else the whole reference."""
        if self.reference is not None and self.reference.startswith(self.code):
            return self.reference[len(self.code) :]
        return self.reference

    def program(self, completion: str) -> str:
        """The program to run for `completion` (see the module docstring): the prompt's code and
        the last fenced block that defines the entry point (else the first block), or the
        completion as a continuation; reasoning left out first."""
        code = self.program_code if self.program_code is not None else self.code
        answer = without_reasoning(completion)
        blocks = FENCE.findall(answer)
        if blocks:
            defining = [b for b in blocks if re.search(rf"^\s*def {re.escape(self.check.entry_point)}\b", b, re.M)]
            return f"{code}\n\n{defining[-1] if defining else blocks[0]}"
        return code + answer

    def score(self, completion: str, *, sandbox: Sandbox | None = None) -> Score:
        result = (sandbox or default_sandbox()).run(
            self.program(completion), timeout_s=self.timeout_s, memory_mb=self.memory_mb, check=self.check
        )
        return score_of(result)


def score_of(result: ExecutionResult) -> Score:
    """Reward 1 when every test passed, else 0; the feedback names the status and what went wrong."""
    if result.passed:
        return Score(1.0, True, "All tests passed.")
    return Score(0.0, False, truncate(f"{result.status}: {result.feedback}".strip()))


def score_code_many(
    tasks: Sequence[CodeTask], completions: Sequence[str], *, workers: int, sandbox: Sandbox | None = None
) -> list[Score]:
    """Scores of completions[i] on tasks[i], `workers` sandboxes at a time (one timeout: the largest)."""
    if not tasks:
        return []
    results = run_many(
        [task.program(text) for task, text in zip(tasks, completions, strict=True)],
        workers=workers,
        timeout_s=max(task.timeout_s for task in tasks),
        memory_mb=max(task.memory_mb for task in tasks),
        checks=[task.check for task in tasks],
        sandbox=sandbox,
    )
    return [score_of(result) for result in results]


def first_assert(tests: str, entry_point: str) -> str | None:
    """The first `assert` line of a test, with `candidate` renamed to the function: a worked example."""
    for line in tests.splitlines():
        stripped = line.strip()
        if stripped.startswith("assert ") and "candidate(" in stripped:
            return stripped.replace("candidate(", f"{entry_point}(")
    return None
