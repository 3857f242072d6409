"""The environment half of agent episodes: a repository in a temporary directory, the tools that
act on it, and the parser of the model's tool calls.

Composer is rewarded for the end state of a repository after a multi-turn episode (read files,
edit them, run the tests). Here is everything the environment side of that needs, and nothing of
the model's side (sampling, token ids, templates: `trainer.rollout.episodes`):

Tools (`TOOLS`): `read_file(path)`, `write_file(path, content)`, `edit_file(path, old, new)` (a
patch: `old` must occur exactly once), `run_tests()`, `finish()`, on a `Workspace` (the task's
files laid out in a fresh temporary directory on the host: only reads and writes of text happen
there). Tests run in the sandbox only (`trainer.sandbox`): the target file is the candidate
program, the task's trusted `Check` the judge (the test file the model can read and even rewrite
in its workspace is never what scores it). Malformed output (unparseable tool-call JSON, an unknown
tool, bad arguments, a path outside the workspace, an unclosed call) becomes a `ToolError` of one of
`ERROR_KINDS`, which the episode turns into an error observation and a counted metric, never an
exception.

Tool calls are parsed in the Hugging Face / Qwen convention `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` (the project's tiny model renders them the same way, `trainer.model`). A call a
reasoning model drafts inside `<think>...</think>` is not made (`trainer.envs.answers.reasoning_spans`;
gptme/gptme#579): it stays part of the turn's text, as the chat template renders reasoning.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.envs.answers import reasoning_spans
from trainer.envs.base import Score, Task
from trainer.envs.code import CodeTask, score_of
from trainer.sandbox import Check, Sandbox, default_sandbox

TOOLS = ("read_file", "write_file", "edit_file", "run_tests", "finish")
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
OPEN_TAG = "<tool_call>"
MAX_FILE_BYTES = 64 * 1024  # a write larger than this is an error observation
OBSERVATION_LIMIT = 2000  # characters of a file or test report shown to the model (the tail is cut)
SYSTEM_PROMPT = (
    "You are a coding agent in a repository. Call tools as <tool_call>{json}</tool_call>: "
    "read_file(path), write_file(path, content), edit_file(path, old, new), run_tests(), finish()."
)

# OpenAI function schemas, passed to chat templates that render tools (Qwen's do; the tiny one ignores them).
TOOL_SPECS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a text file of the repository.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Replace a file of the repository (or create it) with `content`.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                "required": ["path", "content"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "edit_file",
            "description": "Replace the one occurrence of `old` in a file by `new`.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}},
                "required": ["path", "old", "new"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the repository's tests.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "finish",
            "description": "End the episode.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]


ERROR_KINDS = ("bad_json", "unknown_tool", "bad_arguments", "outside_workspace", "missing_file", "unclosed_call")


class ToolError(Exception):
    """A tool call the environment refuses; `kind` is one of ERROR_KINDS (the metric it counts under)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class WorkspaceTask(Task):
    """A repository (relative path -> text) and the trusted check its `target` file must pass.

    reference: the target file's correct content; hints: weakest first (a partial hint, the reference).
    """

    name: str
    files: tuple[tuple[str, str], ...]
    target: str
    check: Check
    instruction: str
    hints: tuple[str, ...]
    reference: str | None
    timeout_s: float = 3.0
    memory_mb: int = 512

    def prompt(self, hint: str | None = None) -> str:
        listing = ", ".join(path for path, _ in self.files)
        hinted = "" if hint is None else f"\nHint: {hint}"
        return f"{self.instruction}\nFiles: {listing}{hinted}"

    def score(self, completion: str, *, sandbox: Sandbox | None = None) -> Score:
        """`completion` taken as the target file's final content."""
        return self.score_files({self.target: completion}, sandbox=sandbox)

    def score_files(self, files: dict[str, str], *, sandbox: Sandbox | None = None) -> Score:
        """The target file of `files` (falling back to the task's own) run against the check, in the sandbox."""
        source = files.get(self.target, dict(self.files)[self.target])
        result = (sandbox or default_sandbox()).run(
            source, timeout_s=self.timeout_s, memory_mb=self.memory_mb, check=self.check
        )
        return score_of(result)

    def demonstration(self) -> str | None:
        return self.reference


def workspace_task(task: CodeTask, *, target: str, test_file: str, tests: str, instruction: str) -> WorkspaceTask:
    """A single-turn code task in multi-file form: `target` holds the stub, `test_file` the tests to read."""
    reference = task.program(task.demonstration() or "") if task.reference is not None else None
    return WorkspaceTask(
        name=f"{task.name}@workspace",
        files=((target, task.code), (test_file, tests)),
        target=target,
        check=task.check,
        instruction=instruction,
        hints=task.hints,
        reference=reference,
        timeout_s=task.timeout_s,
        memory_mb=task.memory_mb,
    )


class Workspace:
    """The task's files in a fresh temporary directory; paths are relative and stay inside it.

    Only text is read and written here (on the host); nothing in it is executed outside the sandbox.
    """

    def __init__(self, files: Sequence[tuple[str, str]] | dict[str, str]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="composer-workspace-")
        self.root = Path(self._dir.name).resolve()
        for path, text in dict(files).items():
            self.write(path, text)

    def resolve(self, path: Any) -> Path:
        """The absolute path of `path` inside the workspace. Raises ToolError for anything else."""
        if not isinstance(path, str) or not path.strip():
            raise ToolError("bad_arguments", f"`path` must be a non-empty string, got {path!r}")
        if "\x00" in path:
            raise ToolError("bad_arguments", "`path` contains a NUL byte")
        candidate = (self.root / path).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise ToolError("outside_workspace", f"{path!r} is outside the repository")
        return candidate

    def read(self, path: Any) -> str:
        file = self.resolve(path)
        if not file.is_file():
            raise ToolError("missing_file", f"no file {path!r}; files: {', '.join(self.files())}")
        return file.read_text(errors="replace")

    def write(self, path: Any, content: Any) -> int:
        if not isinstance(content, str):
            raise ToolError("bad_arguments", f"`content` must be a string, got {type(content).__name__}")
        if len(content.encode()) > MAX_FILE_BYTES:
            raise ToolError("bad_arguments", f"`content` is over {MAX_FILE_BYTES} bytes")
        file = self.resolve(path)
        if file == self.root or file.is_dir():
            raise ToolError("bad_arguments", f"{path!r} is a directory")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(content)
        return len(content.encode())

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def snapshot(self) -> dict[str, str]:
        return {path: (self.root / path).read_text(errors="replace") for path in self.files()}

    def close(self) -> None:
        self._dir.cleanup()


@dataclass
class ParsedCall:
    name: str
    arguments: dict[str, Any] | None  # None: unparseable (error says why)
    raw: str
    error: ToolError | None = None


def parse_tool_calls(text: str) -> tuple[str, list[ParsedCall]]:
    """(the text outside tool calls, the calls in order). Never raises: a malformed call is a
    ParsedCall with `error` set (bad_json, bad_arguments, unclosed_call). Calls inside reasoning
    (`trainer.envs.answers.reasoning_spans`) are drafts: not calls, left in the text."""
    drafts = reasoning_spans(text)
    made = [match for match in TOOL_CALL.finditer(text) if not _inside(match.start(), drafts)]
    calls = []
    for match in made:
        raw = match.group(1).strip()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as error:
            calls.append(ParsedCall("invalid", None, raw, ToolError("bad_json", f"tool call is not JSON: {error}")))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append(
                ParsedCall("invalid", None, raw, ToolError("bad_json", 'expected {"name": ..., "arguments": {...}}'))
            )
            continue
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some models write the OpenAI string form
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(arguments, dict):
            error = ToolError("bad_arguments", "`arguments` must be a JSON object")
            calls.append(ParsedCall(value["name"], None, raw, error))
            continue
        calls.append(ParsedCall(value["name"], arguments, raw))
    ends = [0, *(at for match in made for at in match.span()), len(text)]
    outside = "".join(text[ends[i] : ends[i + 1]] for i in range(0, len(ends), 2))
    drafts = reasoning_spans(outside)
    opened = (m.start() for m in re.finditer(re.escape(OPEN_TAG), outside) if not _inside(m.start(), drafts))
    unclosed = next(opened, None)
    if unclosed is not None:
        raw = outside[unclosed + len(OPEN_TAG) :]
        calls.append(ParsedCall("invalid", None, raw.strip(), ToolError("unclosed_call", "<tool_call> is not closed")))
        outside = outside[:unclosed]
    return outside.strip(), calls


def _inside(at: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= at < end for start, end in spans)


def arguments_json(call: ParsedCall) -> str:
    """The call's arguments as the JSON string an OpenAI message carries (`{"raw": ...}` if unparseable)."""
    return json.dumps(call.arguments if call.arguments is not None else {"raw": call.raw})


def execute_tool(
    call: ParsedCall, task: WorkspaceTask, workspace: Workspace, sandbox: Sandbox, tools: Sequence[str]
) -> tuple[str, bool]:
    """Run one parsed call on `workspace` (run_tests: `task`'s check in `sandbox`).

    Returns (observation text, whether the action failed: failing tests). Raises ToolError (its
    `kind` one of ERROR_KINDS) for a call the environment refuses; run_episode turns that into an
    error observation.
    """
    if call.error is not None:
        raise call.error
    if call.name not in tools:
        raise ToolError("unknown_tool", f"unknown tool {call.name!r}; tools: {', '.join(tools)}")
    arguments = call.arguments or {}
    expected = {
        "read_file": {"path"},
        "write_file": {"path", "content"},
        "edit_file": {"path", "old", "new"},
        "run_tests": set(),
        "finish": set(),
    }
    wanted = expected.get(call.name, set())
    if set(arguments) != wanted:
        raise ToolError("bad_arguments", f"{call.name} takes {sorted(wanted)}, got {sorted(arguments)}")
    if call.name == "read_file":
        text = workspace.read(arguments["path"])
        return (text if len(text) <= OBSERVATION_LIMIT else text[:OBSERVATION_LIMIT] + "\n[...truncated]"), False
    if call.name == "write_file":
        size = workspace.write(arguments["path"], arguments["content"])
        return f"Wrote {size} bytes to {arguments['path']}.", False
    if call.name == "edit_file":
        old, new = arguments["old"], arguments["new"]
        if not isinstance(old, str) or not isinstance(new, str) or not old:
            raise ToolError("bad_arguments", "`old` must be a non-empty string and `new` a string")
        text = workspace.read(arguments["path"])
        if text.count(old) != 1:
            raise ToolError("bad_arguments", f"`old` occurs {text.count(old)} times in {arguments['path']}, not once")
        size = workspace.write(arguments["path"], text.replace(old, new))
        return f"Edited {arguments['path']} ({size} bytes).", False
    if call.name == "run_tests":
        return test_report(task, workspace.snapshot(), sandbox)
    return "Finished.", False


def test_report(task: WorkspaceTask, files: dict[str, str], sandbox: Sandbox | None = None) -> tuple[str, bool]:
    """What `run_tests` shows for a workspace holding `files`: (observation, whether the tests failed);
    the target run against the task's check in the sandbox."""
    score = task.score_files(files, sandbox=sandbox)
    return ("All tests passed." if score.passed else score.feedback[-OBSERVATION_LIMIT:]), not score.passed
