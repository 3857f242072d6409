"""Agentic task families: repositories an agent repairs with tools (`trainer.envs.workspace`; the
episodes themselves are `trainer.rollout.episodes`).

- `agent_code_arith`: `code_arith` in multi-file form: `calc.py` holds the function with its
  one-line body's operator left out (`return x ? 6`), `test_calc.py` the tests; the instruction
  repeats the docstring ("in calc.py, g: Return x plus 6."). The fix is one short `edit_file`
  patch; what has to be right is the operator the docstring's word asks for. Why this shape: the
  2-layer tiny model learns the tools and the workflow from a few hundred scripted episodes, but
  copying the variable and the constant out of the instruction had not clicked after 600 warm-up
  steps (a whole-file `write_file` never passed at all), so RL had no signal. The warm-up's
  scripts (`AgentCodeArith.scripted_episode`) patch in the operator the word names only with
  probability `correct_rate`, else one drawn at random, with the tests' real verdict, and after a
  failing run_tests try another operator only with probability `retry_rate`: they teach the format
  and the answer weakly, and RL sharpens from the reward which operator a word asks for and learns
  to react to a failing test (retry rather than finish). With correct_rate 0 (the answer left to RL
  alone) the first patch's operator stayed near chance (0.29-0.41 right) through 24 RL steps on three
  seeds: the tiny model's RL never found the word -> operator dependence the warm-up had not begun;
  held-out tasks are unseen (name, variable, operator, constant) combinations.
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
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from trainer.envs.base import FiniteEnvironment, ProbeCandidates, ProbeItem, split
from trainer.envs.code import score_code_many
from trainer.envs.workspace import SYSTEM_PROMPT, WorkspaceTask, test_report, workspace_task

OPERATORS = ("+", "-", "*")
# The warm-up scripts' chance of trying another operator after a failing run_tests: below 1/2, so
# the warm-up policy (and its greedy decoding) mostly gives up after a failure and RL has the
# retry to learn from the reward (configs/agent-smoke.yaml).
RETRY_RATE = 0.45
PLACEHOLDER = "?"  # agent_code_arith's calc.py: `return x ? 6`, the operator left out


class AgentCodeArith(FiniteEnvironment):
    """The 360 code_arith tasks as repositories (same held-out split as code_arith)."""

    name = "agent_code_arith"
    executes_code = True

    def __init__(self, held_out_every: int = 5, retry_rate: float = RETRY_RATE, correct_rate: float = 0.0) -> None:
        from trainer.envs.code_arith import CodeArith

        for key, rate in (("retry_rate", retry_rate), ("correct_rate", correct_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"task.options.{key}: {rate} is not a probability in [0, 1]")
        self.retry_rate, self.correct_rate = retry_rate, correct_rate

        source = CodeArith(held_out_every=held_out_every)
        self.tasks = [_arith_task(task) for task in source.tasks]
        self.train, self.held_out = split(self.tasks, held_out_every)
        self._reports: dict[tuple[str, str], tuple[str, bool]] = {}

    def score_many(self, tasks, completions, *, workers=2):
        return score_code_many(tasks, completions, workers=workers)

    def corpus(self) -> list[str]:
        lines = [SYSTEM_PROMPT]
        for task in self.tasks:
            lines += [task.prompt(), *task.hints, *(text for _, text in task.files)]
            for message in scripted_messages(task):  # as the chat template renders calls
                lines += [f"<tool_call>{json.dumps(_call_json(c))}</tool_call>" for c in message.get("tool_calls", [])]
                lines += [message["content"]] if message["role"] == "tool" else []
        return lines

    def scripted_episode(self, task: WorkspaceTask, rng: random.Random) -> list[dict[str, Any]]:
        """A warm-up episode that teaches the tools and the workflow, and the answer only weakly:
        each attempt patches in the operator the docstring's word names with probability
        `correct_rate`, else one drawn uniformly from those not yet tried (so with correct_rate 0
        the operator is independent of the word), and the run_tests observation is what the tests
        said of that file, run in the sandbox (cached per task and operator). After a failing
        run_tests the script reads the file and tries another operator with probability
        `retry_rate`, else it finishes. Sharpening word -> operator, and that a failing test is
        worth another try, are left to RL."""
        stub = dict(task.files)[task.target]
        untried, right = list(OPERATORS), _named_operator(task.instruction)
        attempts = []
        while untried:
            operator = right if right in untried and rng.random() < self.correct_rate else rng.choice(untried)
            untried.remove(operator)
            key = (task.name, operator)
            content = stub.replace(f" {PLACEHOLDER} ", f" {operator} ", 1)
            if key not in self._reports:
                self._reports[key] = test_report(task, {task.target: content})
            report, failed = self._reports[key]
            attempts.append((content, report))
            if not failed or rng.random() >= self.retry_rate:
                break
        return scripted_messages(task, attempts=attempts)

    def probe_candidates(self, size: int = 48) -> ProbeCandidates:
        """How far the warm-up has taught word -> operator, without sampling: for the first `size`
        held-out tasks, the three candidate first turns (an `edit_file` patch putting in each
        operator), the right one the operator the docstring's word names. Scored teacher-forced
        and renormalised over the three, chance is 1/3 until the dependence has begun; the agent
        docs (docs/agent.md) tell why it is worth printing."""
        items = []
        for task in self.held_out[:size]:
            stub = dict(task.files)[task.target]
            prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.prompt()}]
            candidates = [
                scripted_messages(task, [(stub.replace(f" {PLACEHOLDER} ", f" {op} ", 1), "")])[:1] for op in OPERATORS
            ]
            items.append(ProbeItem(prompt, candidates, OPERATORS.index(_named_operator(task.instruction))))
        what = f"P(first patch = the word's operator), {len(items)} held-out tasks, chance 1/3"
        return ProbeCandidates(what, tuple(items))


def _named_operator(instruction: str) -> str:
    """The operator the instruction's word names ("Return x times 6." -> "*")."""
    from trainer.envs.code_arith import OPERATORS as WORDS

    return next(symbol for word, symbol in WORDS if f" {word} " in instruction)


def _call_json(call: dict[str, Any]) -> dict[str, Any]:
    return {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}


def _arith_task(task) -> WorkspaceTask:
    made = workspace_task(
        task,
        target="calc.py",
        test_file="test_calc.py",
        tests=task.check.tests,
        instruction=f"Make the tests pass: in calc.py, {task.check.entry_point}: {_docstring(task.code)}",
    )
    # The body is the reference's with the operator replaced by a placeholder: one short edit_file
    # patch fixes it, and what the agent must get right is the operator the docstring's word names.
    body = re.sub(r" [-+*] ", f" {PLACEHOLDER} ", task.demonstration(), count=1)
    return replace(made, files=((made.target, task.code + body), *made.files[1:]))


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

    def scripted_episode(self, task: WorkspaceTask, rng: random.Random) -> list[dict[str, Any]]:
        """The warm-up episode: the reference module patched in, the tests run, finish."""
        return scripted_messages(task)


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


def demo_edit(before: str, after: str) -> tuple[str, str] | None:
    """(old, new) for the smallest `edit_file` call that turns `before` into `after`: the span
    between their common prefix and suffix, widened a character at a time to the left while `old`
    is empty or occurs more than once. None when no such patch exists (e.g. `before` is empty)."""
    head = 0
    while head < min(len(before), len(after)) and before[head] == after[head]:
        head += 1
    tail = 0
    while tail < min(len(before), len(after)) - head and before[-1 - tail] == after[-1 - tail]:
        tail += 1
    for start in range(head, -1, -1):
        old, new = before[start : len(before) - tail], after[start : len(after) - tail]
        if old and before.count(old) == 1:
            return old, new
    return None


def scripted_messages(task: WorkspaceTask, attempts: Sequence[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """A scripted episode's assistant and tool messages after the prompt (OpenAI format), for a
    supervised warm-up: for each attempt (content, observation), read the target first (retries
    only: the patch's `old` is then in the last observation), patch it into `content` with one
    `edit_file` call (`demo_edit` from the file as the previous attempt left it; `write_file` of
    the whole content where no patch exists) and run the tests (`observation`: what they said),
    then finish. `attempts` defaults to one attempt: the reference, "All tests passed.".

    Raises ValueError when attempts is None and the task has no reference."""
    if attempts is None:
        if task.reference is None:
            raise ValueError(f"{task.name} has no reference to script an episode from")
        attempts = [(task.reference, "All tests passed.")]
    current = dict(task.files)[task.target]
    steps: list[tuple[str, dict[str, str], str]] = []
    for attempt, (content, said) in enumerate(attempts):
        if attempt:  # a retry reads the file first: what the next patch's `old` must quote is in view
            steps.append(("read_file", {"path": task.target}, current))
        patch = demo_edit(current, content)
        size = len(content.encode())
        if patch is not None:
            old, new = patch
            steps.append(
                ("edit_file", {"path": task.target, "old": old, "new": new}, f"Edited {task.target} ({size} bytes).")
            )
        else:
            steps.append(
                ("write_file", {"path": task.target, "content": content}, f"Wrote {size} bytes to {task.target}.")
            )
        steps.append(("run_tests", {}, said))
        current = content
    messages: list[dict[str, Any]] = []
    for turn, (name, arguments, said) in enumerate(steps):
        call_id = f"call_{turn}_0"
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": said})
    finish = {"id": f"call_{len(steps)}_0", "type": "function", "function": {"name": "finish", "arguments": "{}"}}
    messages.append({"role": "assistant", "content": "", "tool_calls": [finish]})
    return messages
