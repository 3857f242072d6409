"""Helpers for the trace tests: where the real samples live, and writers for synthetic logs.

The real samples are read in place from `<repo>/../shared/data/traces` (never copied into the
repository). Synthetic logs are written to `tmp_path` by the tests that need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.paths import SHARED

TRACES_DIR = SHARED / "data" / "traces"
requires_samples = pytest.mark.skipif(not TRACES_DIR.is_dir(), reason=f"the real trace samples are not at {TRACES_DIR}")
CASES_DIR = TRACES_DIR.parent / "cases" / "traces"


def shared_case(name: str) -> Path:
    """A case folder of <repo>/../shared/data/cases/traces, read in place; the test skips when it is absent."""
    path = CASES_DIR / name
    if not path.exists():
        pytest.skip(f"trace case {name} is not at {path}")
    return path


PREVIOUS = object()  # parent marker: link to the entry written just before


class ClaudeLog:
    """Claude Code entries in the real shape; each links to the previous one unless told otherwise."""

    def __init__(self, session_id: str = "sess-1") -> None:
        self.session_id = session_id
        self.entries: list[dict[str, Any]] = []
        self._clock = 0

    def _entry(self, kind: str, uuid: str, parent: Any, extra: dict[str, Any]) -> dict[str, Any]:
        if parent is PREVIOUS:
            parent = self.entries[-1]["uuid"] if self.entries else None
        self._clock += 1
        entry = {
            "parentUuid": parent,
            "isSidechain": False,
            "userType": "external",
            "cwd": "/repo",
            "sessionId": self.session_id,
            "version": "2.0.46",
            "gitBranch": "main",
            "type": kind,
            "uuid": uuid,
            "timestamp": f"2025-11-19T10:{self._clock // 60:02d}:{self._clock % 60:02d}.000Z",
        }
        entry.update(extra)
        self.entries.append(entry)
        return entry

    def user(self, uuid: str, text: str, *, parent: Any = PREVIOUS, **extra: Any) -> dict[str, Any]:
        content = [{"type": "text", "text": text}]
        return self._entry("user", uuid, parent, {"message": {"role": "user", "content": content}, **extra})

    def assistant(
        self,
        uuid: str,
        text: str | None = None,
        *,
        tool_uses: tuple = (),
        message_id: str | None = None,
        parent: Any = PREVIOUS,
        **extra: Any,
    ) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text is not None else []
        content += [{"type": "tool_use", "id": tid, "name": name, "input": args} for tid, name, args in tool_uses]
        message = {
            "id": message_id or f"msg_{uuid}",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": content,
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 5},
        }
        return self._entry("assistant", uuid, parent, {"message": message, "requestId": f"req_{uuid}", **extra})

    def tool_result(
        self, uuid: str, tool_use_id: str, content: Any, *, is_error: bool = False, parent: Any = PREVIOUS, **extra: Any
    ) -> dict[str, Any]:
        block = {"type": "tool_result", "tool_use_id": tool_use_id, "content": content, "is_error": is_error}
        return self._entry("user", uuid, parent, {"message": {"role": "user", "content": [block]}, **extra})

    def raw(self, entry: dict[str, Any]) -> dict[str, Any]:
        self.entries.append(entry)
        return entry

    def lines(self) -> list[bytes]:
        return [json.dumps(e).encode() for e in self.entries]

    def write(self, path: Path, lines: list[bytes] | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(line + b"\n" for line in (self.lines() if lines is None else lines)))
        return path


def basic_session(session_id: str = "sess-1") -> ClaudeLog:
    """user -> assistant (Bash call) -> tool result -> assistant: 4 lines, 4 messages, 1 tool call."""
    log = ClaudeLog(session_id)
    log.user("u1", "Run the tests")
    log.assistant("a1", "Running them.", tool_uses=(("toolu_1", "Bash", {"command": "pytest -q"}),))
    log.tool_result("r1", "toolu_1", "3 passed")
    log.assistant("a2", "All 3 tests pass.")
    return log


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def forked_session(tmp_path, *, refuse: bool = False, interrupt: bool = False, retry_rejected: bool = False):
    """Hi/Hello, then "Rename foo to bar" asked twice from the same point (a rewind).

    First answer: an Edit call (refused and/or interrupted, as asked). Second answer, 10 minutes
    later: a Bash call that succeeds, then "Done." (also refused when `retry_rejected`).
    """
    log = ClaudeLog()
    log.user("u0", "Hi")
    log.assistant("a0", "Hello")
    log.user("u1", "Rename foo to bar")
    log.assistant("a1", "Editing.", tool_uses=(("t1", "Edit", {"old": "foo", "new": "bar"}),))
    refusal = "The user doesn't want to proceed with this tool use. The tool use was rejected (eg. ...)."
    log.tool_result("r1", "t1", refusal if refuse else "ok", is_error=refuse)
    if interrupt:
        log.user("i1", "[Request interrupted by user for tool use]")
    log._clock += 600
    log.user("u1b", "Rename foo to bar", parent="a0")
    log.assistant("a1b", "Using sed.", tool_uses=(("t2", "Bash", {"command": "sed -i s/foo/bar/ x.py"}),))
    log.tool_result("r2", "t2", refusal if retry_rejected else "", is_error=retry_rejected)
    log.assistant("a2b", "Done.")
    return log.write(tmp_path / "fork.jsonl")


def openai_attempt(task, answer, resolved, *, system="You fix bugs."):
    return {
        "instance_id": task,
        "resolved": resolved,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Fix {task}"},
            {
                "role": "assistant",
                "content": answer,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "apply", "arguments": '{"patch": 1}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "applied"},
            {"role": "assistant", "content": "Submitted."},
        ],
    }


def labelled_rows(instances: int, attempts: int, *, as_json_text: bool = False) -> list[dict[str, Any]]:
    """Rows shaped like SWE-rebench's OpenHands trajectories: `instance_id`, `trajectory`, `resolved`, `exit_status`.

    Attempt k at instance i is resolved when k is even; each trajectory is OpenAI-format messages.
    """
    return [labelled_row(i, k, as_json_text=as_json_text) for k in range(attempts) for i in range(instances)]


def labelled_row(instance: int, attempt: int, *, as_json_text: bool = False, output: str = "edited") -> dict[str, Any]:
    """Attempt `attempt` at `demo__repo-<instance>`; `as_json_text` stores the trajectory as JSON text
    and `resolved` as 0/1, as Parquet exports often do."""
    trajectory = [
        {"role": "system", "content": "You are OpenHands agent."},
        {"role": "user", "content": f"Fix issue demo__repo-{instance}"},
        {
            "role": "assistant",
            "content": f"Attempt {attempt}.",
            "tool_calls": [
                {
                    "id": f"call_{attempt}",
                    "type": "function",
                    "function": {"name": "str_replace_editor", "arguments": json.dumps({"path": f"f{attempt}.py"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": f"call_{attempt}", "content": output, "name": "str_replace_editor"},
        {"role": "assistant", "content": "Done."},
    ]
    resolved = attempt % 2 == 0
    return {
        "instance_id": f"demo__repo-{instance}",
        "trajectory": json.dumps(trajectory) if as_json_text else trajectory,
        "resolved": int(resolved) if as_json_text else resolved,
        "exit_status": "submitted",
    }
