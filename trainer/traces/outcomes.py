"""`--outcomes FILE`: attach resolved/unresolved verdicts to traces that lack them.

Single logs rarely say whether their patch resolved the task; an evaluation harness says so
elsewhere. Accepted files (the first two as SWE-bench's harness and most evaluators write them):
- a JSON report with `resolved_ids` / `unresolved_ids` (and `error_ids`, counted unresolved);
- a JSON object mapping an id to `true`/`false` (or to `{"resolved": bool, "instance_id": ...}`);
- JSONL rows `{"instance_id" | "id": ..., "resolved": bool}` (an `instance_id` beside an `id`
  names the task the trace attempted).
An id matches an example's task (`outcome["instance_id"]` / `["task_id"]`), then its session id,
then its example id. Bad entries raise ValueError naming the file and the line or key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import TraceExample


@dataclass
class Outcomes:
    verdicts: dict[str, tuple[bool, str | None]] = field(default_factory=dict)  # id -> (resolved, task)
    attached: int = 0  # examples that got a verdict from this file

    def attach(self, examples: Iterable[TraceExample]) -> Iterator[TraceExample]:
        """Pass examples through, setting `outcome["resolved"]` (and the task) where an id matches."""
        for example in examples:
            outcome = example.outcome or {}
            task = outcome.get("instance_id") or outcome.get("task_id")
            for key in (task, example.session_id, example.id):
                if key is not None and str(key) in self.verdicts:
                    resolved, named_task = self.verdicts[str(key)]
                    example.outcome = {**outcome, "instance_id": named_task or task or str(key), "resolved": resolved}
                    self.attached += 1
                    break
            yield example


def load_outcomes(path: str | Path) -> Outcomes:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the outcomes file: {error}") from error
    outcomes = Outcomes()
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                _add_row(outcomes, _parse(line, path, number), path, f"{path}:{number}")
        return outcomes
    document = _parse(text, path, None)
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object (id -> resolved, or a harness report)")
    if "resolved_ids" in document:
        for key, resolved in (("resolved_ids", True), ("unresolved_ids", False), ("error_ids", False)):
            ids = document.get(key) or []
            if not isinstance(ids, list):
                raise ValueError(f"{path} [{key}]: expected a list of ids")
            outcomes.verdicts.update({str(i): (resolved, str(i)) for i in ids})
        return outcomes
    for key, value in document.items():
        if isinstance(value, bool):
            outcomes.verdicts[str(key)] = (value, None)
        else:
            _add_row(outcomes, {"id": key, **value} if isinstance(value, dict) else value, path, f"{path} [{key}]")
    return outcomes


def _parse(text: str, path: Path, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line or error.lineno}: not JSON: {error.msg}") from error


def _add_row(outcomes: Outcomes, row: Any, path: Path, where: str) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("resolved"), bool):
        raise ValueError(f"{where}: expected an object with a boolean `resolved`")
    key = row.get("id", row.get("instance_id"))
    if key is None:
        raise ValueError(f"{where}: names no `id` or `instance_id`")
    task = row.get("instance_id")
    outcomes.verdicts[str(key)] = (row["resolved"], None if task is None else str(task))
