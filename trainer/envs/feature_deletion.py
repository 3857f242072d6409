"""`feature_deletion`: put a deleted function body back into a real, tested module.

The Composer 2.5 write-up's "feature deletion" tasks: remove a feature from a real codebase and
reward the model for restoring it so that the codebase's own tests pass. Source: boltons (PyPI
`boltons`), chosen because it is pure Python, offline-installable, and its modules are single
files importing only the standard library (the few imports of sibling modules sit in
`try/except ImportError` fallbacks), with doctests on most public functions: the module runs in
the sandbox as it is, and each function's own doctests are its tests.

A task: the module with one function's body removed (signature and docstring kept), followed by
that signature and docstring again, so that the model may continue the file with the body or
write the whole function in a fenced block. The tests: the function's doctests, run by `doctest`
in the sandbox's judge over the original module's namespace, the function itself reached through
the sandbox's plain-data bridge into the candidate's module. Every task is validated when made:
the original body passes and an empty body fails (tasks that do not are dropped and counted by
reason in `excluded`).
"""

from __future__ import annotations

import ast
import importlib.util
from collections import Counter
from pathlib import Path

from trainer.envs.base import FiniteEnvironment, split
from trainer.envs.code import CodeTask, score_code_many
from trainer.sandbox import Check, run_many

MODULES = ("strutils", "iterutils", "mathutils", "formatutils", "setutils", "dictutils", "statsutils", "urlutils")
DOCTEST_CHECK = """
import doctest as _doctest
import io as _io


def check(candidate):
    test = _doctest.DocTestParser().get_doctest({docstring!r}, globals(), {name!r}, {filename!r}, 0)
    report = _io.StringIO()
    runner = _doctest.DocTestRunner(verbose=False, optionflags=_doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=report.write, clear_globs=False)
    if runner.failures:
        raise AssertionError(report.getvalue())
"""


def module_source(module: str) -> tuple[str, str]:
    """(path, source) of boltons.<module> as installed."""
    spec = importlib.util.find_spec(f"boltons.{module}")
    if spec is None or spec.origin is None:
        raise ImportError("feature_deletion needs the boltons package: pip install boltons")
    return spec.origin, Path(spec.origin).read_text()


def deletion_candidates(source: str) -> list[ast.FunctionDef]:
    """Module-level functions whose docstring has doctest examples and whose body has code."""
    tree = ast.parse(source)
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and len(node.body) > 1:
            docstring = ast.get_docstring(node, clean=False)
            if docstring and ">>>" in docstring:
                found.append(node)
    return found


def make_task(
    module: str, filename: str, source: str, node: ast.FunctionDef, context_lines: int | None = None
) -> CodeTask:
    lines = source.splitlines(keepends=True)
    first_body = node.body[1].lineno - 1  # body[0] is the docstring
    head_start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
    head = "".join(lines[head_start:first_body])  # decorators, signature, docstring
    body = "".join(lines[first_body : node.end_lineno])
    stubbed = "".join(lines[:first_body] + lines[node.end_lineno :])
    code = f"{stubbed.rstrip()}\n\n\n# The body of {node.name} is missing; write it.\n{head}"
    shown = code
    if context_lines is not None:  # the prompt shows the lines before the function; the program is whole
        before = "".join(lines[max(0, head_start - context_lines) : head_start])
        elided = head_start - max(0, head_start - context_lines)
        shown = (
            f"# boltons/{module}.py, {elided} lines before {node.name} shown; the rest of the module is "
            f"unchanged.\n{before}\n\n# The body of {node.name} is missing; write it.\n{head}"
        )
    docstring = ast.get_docstring(node, clean=False)
    tests = DOCTEST_CHECK.format(docstring=docstring, name=node.name, filename=Path(filename).name)
    first_line = next((line.strip() for line in body.splitlines() if line.strip()), "")
    return CodeTask(
        name=f"boltons.{module}.{node.name}",
        code=shown,
        program_code=code,
        check=Check(entry_point=node.name, setup=source, tests=tests, call=f"check({node.name})"),
        reference=head + body,
        hints=(f"The original body starts with: {first_line}", f"The original function:\n{head}{body}"),
        instruction=f"Restore the body of `{node.name}` in this module (boltons/{module}.py).\n\n",
        timeout_s=5.0,
        memory_mb=512,
    )


class FeatureDeletion(FiniteEnvironment):
    """Tasks from boltons' `modules`, validated in the sandbox when made (`workers` at a time)."""

    name = "feature_deletion"
    executes_code = True

    def __init__(
        self,
        modules: tuple[str, ...] = MODULES,
        held_out_every: int = 5,
        workers: int = 2,
        context_lines: int | None = None,
    ) -> None:
        """`context_lines`: show only that many module lines before the function (a small model's
        context cannot hold a 25k-token module); the program the tests run is the whole module."""
        made = []
        for module in modules:
            filename, source = module_source(module)
            made += [make_task(module, filename, source, node, context_lines) for node in deletion_candidates(source)]
        originals = run_many(
            [t.program(_body(t)) for t in made],
            workers=workers,
            timeout_s=5.0,
            memory_mb=512,
            checks=[t.check for t in made],
        )
        empties = run_many(
            [t.program("    pass\n") for t in made],
            workers=workers,
            timeout_s=5.0,
            memory_mb=512,
            checks=[t.check for t in made],
        )
        self.excluded: Counter[str] = Counter()
        self.tasks = []
        for task, original, empty in zip(made, originals, empties, strict=True):
            if not original.passed:
                self.excluded[f"original body does not pass ({original.status})"] += 1
            elif empty.passed:
                self.excluded["empty body passes"] += 1
            else:
                self.tasks.append(task)
        self.train, self.held_out = split(self.tasks, held_out_every)

    def score_many(self, tasks, completions, *, workers=2):
        return score_code_many(tasks, completions, workers=workers)


def _body(task: CodeTask) -> str:
    """The original body of a task's function (its reference minus the signature and docstring)."""
    head = task.code[task.code.rindex("write it.\n") + len("write it.\n") :]
    return task.reference[len(head) :]
