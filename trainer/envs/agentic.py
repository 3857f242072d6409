"""Agentic task families: repositories an agent repairs with tools (`trainer.agent`).

- `agent_code_arith`: `code_arith` in multi-file form: `calc.py` holds the function's signature
  and docstring without a body, `test_calc.py` the tests; the instruction repeats the docstring
  ("in calc.py, g: Return x plus 6."), since copying it out of a read_file observation is beyond
  the 2-layer tiny model at smoke scale (a first run read calc.py and never passed). Small enough
  for that model after a supervised warm-up on scripted episodes (`scripted_messages`).
- `agent_feature_deletion`: the feature-deletion tasks (boltons) in multi-file form:
  `boltons/<module>.py` with the function's body deleted, `tests/test_<function>.py` its doctests.
  The whole module is the candidate program and the doctests its trusted check, as in
  `feature_deletion`; `edit_file` lets the agent patch the body in without rewriting the module.

Either way the reward is the target file of the final workspace run against the task's check in
the sandbox; the test file in the workspace is for reading only.
"""

from __future__ import annotations

import json
import random
from typing import Any

from trainer.agent import SYSTEM_PROMPT, WorkspaceTask, workspace_task
from trainer.envs.base import FiniteEnvironment, split
from trainer.envs.code import score_code_many


class AgentCodeArith(FiniteEnvironment):
    """The 360 code_arith tasks as repositories (same held-out split as code_arith)."""

    name = "agent_code_arith"
    executes_code = True

    def __init__(self, held_out_every: int = 5) -> None:
        from trainer.envs.code_arith import CodeArith

        source = CodeArith(held_out_every=held_out_every)
        self.tasks = [_arith_task(task) for task in source.tasks]
        self.train, self.held_out = split(self.tasks, held_out_every)

    def score_many(self, tasks, completions, *, workers=2):
        return score_code_many(tasks, completions, workers=workers)

    def corpus(self) -> list[str]:
        lines = [SYSTEM_PROMPT]
        for task in self.tasks:
            lines += [task.prompt(), *task.hints, *(text for _, text in task.files)]
            lines += [json.dumps(m) for m in scripted_messages(task)]
        return lines


def _arith_task(task) -> WorkspaceTask:
    return workspace_task(
        task,
        target="calc.py",
        test_file="test_calc.py",
        tests=task.check.tests,
        instruction=f"Make the tests pass: in calc.py, {task.check.entry_point}: {_docstring(task.code)}",
    )


def _docstring(code: str) -> str:
    return code.split('"""')[1]


class AgentFeatureDeletion(FiniteEnvironment):
    """feature_deletion's validated tasks as repositories (its held-out split)."""

    name = "agent_feature_deletion"
    executes_code = True

    def __init__(self, modules: tuple[str, ...] | None = None, held_out_every: int = 5, workers: int = 2) -> None:
        from trainer.envs.feature_deletion import MODULES, FeatureDeletion

        source = FeatureDeletion(modules=tuple(modules or MODULES), held_out_every=held_out_every, workers=workers)
        self.excluded = source.excluded
        self.tasks = [_deletion_task(task) for task in source.tasks]
        self.train, self.held_out = split(self.tasks, held_out_every)


def _deletion_task(task) -> WorkspaceTask:
    _, module, function = task.name.split(".", 2)
    marker = f"\n\n\n# The body of {function} is missing; write it.\n"
    stubbed = task.code[: task.code.rindex(marker)] + "\n"  # the module with the body gone, in place
    return WorkspaceTask(
        name=f"{task.name}@workspace",
        files=((f"boltons/{module}.py", stubbed), (f"tests/test_{function}.py", task.check.tests)),
        target=f"boltons/{module}.py",
        check=task.check,
        instruction=f"The body of `{function}` in boltons/{module}.py was deleted. Restore it so the tests pass.",
        hints=task.hints,
        reference=task.check.setup,  # the original module
        timeout_s=task.timeout_s,
        memory_mb=task.memory_mb,
    )


def scripted_messages(task: WorkspaceTask, rng: random.Random | None = None) -> list[dict[str, Any]]:
    """A correct episode's assistant and tool messages after the prompt (OpenAI format): read the
    target (the prompt does not say what the function must do: the file's docstring does), write
    the reference into it, run the tests, finish. With `rng`, half the time it also reads the test
    file. For a supervised warm-up; needs `task.reference`."""
    if task.reference is None:
        raise ValueError(f"{task.name} has no reference to script an episode from")
    steps: list[tuple[str, dict[str, Any], str]] = [("read_file", {"path": task.target}, dict(task.files)[task.target])]
    if rng is not None and rng.random() < 0.5:
        test_file = next(path for path, _ in task.files if path != task.target)
        steps.append(("read_file", {"path": test_file}, dict(task.files)[test_file]))
    steps.append(
        (
            "write_file",
            {"path": task.target, "content": task.reference},
            f"Wrote {len(task.reference.encode())} bytes to {task.target}.",
        )
    )
    steps.append(("run_tests", {}, "All tests passed."))
    messages: list[dict[str, Any]] = []
    for turn, (name, arguments, observation) in enumerate(steps):
        call_id = f"call_{turn}_0"
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": observation})
    finish = {"id": f"call_{len(steps)}_0", "type": "function", "function": {"name": "finish", "arguments": "{}"}}
    messages.append({"role": "assistant", "content": "", "tool_calls": [finish]})
    return messages
