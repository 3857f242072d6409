"""The common shape every trace format is turned into, and the ledger of what ingestion repaired.

A `TraceExample` is one conversation as the model saw it: plain `Message`s with tool calls in
the OpenAI/Hugging Face shape (arguments as a dict). Everything the ingester skipped or repaired
is counted in `IngestReport.issues` under a reason from `ISSUE_REASONS`; in strict mode the same
reasons raise `TraceFormatError` naming the file and line instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("claude_code", "openhands", "swe_agent", "openai", "codex", "cline", "aider")

# Message.kind: what a message means beyond its role. Mining reads these instead of format quirks.
MESSAGE = "message"
COMPACT_SUMMARY = "compact_summary"  # the summary that replaced the context after a compaction
INTERRUPTION = "interruption"  # the user stopped the assistant mid-turn
# On a tool result: the user refused the tool call. On an assistant message: the model declined
# (OpenAI's `refusal` field or content part); its text is kept, never turned into an empty turn.
REFUSAL = "refusal"
USER_EDIT = "user_edit"  # the user rewrote the model's edit before accepting it (Cline's user_feedback_diff)
# On a user message right after an assistant turn: the user reverted what that turn changed
# (Aider's /undo of the turn's commit). Its text is a marker; the turn is the rejected one.
UNDONE = "undone"

# Every reason an item can be skipped or repaired. Strict mode raises on each of them.
ISSUE_REASONS: dict[str, str] = {
    "empty_file": "the file holds no records",
    "unknown_format": "the file matches none of the known trace formats",
    "unreadable_file": "the file could not be opened or read",
    "invalid_utf8": "bytes that are not UTF-8 were replaced with U+FFFD",
    "lone_surrogate": "a lone UTF-16 surrogate escape was replaced with U+FFFD",
    "mojibake_repaired": "text double-encoded as UTF-8 read through cp1252 was decoded back",
    "invalid_json": "a line (or part of one) that is not JSON was skipped",
    "truncated_line": "the unterminated last line of a file was cut short and skipped",
    "glued_records": "a line held several records glued together; each extra one was split off",
    "invalid_record": "a record lacks a field it needs (or has the wrong type) and was skipped",
    "duplicate_line": "a byte-identical copy of an earlier record was dropped",
    "duplicate_uuid": "a record reusing an earlier uuid with different content was dropped",
    "dangling_parent": "parentUuid names no record in the file; the thread's previous record became the parent",
    "parent_cycle": "parentUuid links formed a cycle; it was cut",
    "session_interleaved": "a session reappeared after another one; its late records form a separate tree",
    "unknown_entry_type": "a Claude Code entry type this ingester does not know was skipped",
    "unknown_content_block": "a content block or part of a kind this ingester does not know was kept as a placeholder",
    "unknown_event_type": "an OpenHands event this ingester does not know was skipped",
    "unknown_role": "a message with a role outside system/user/assistant/tool was skipped",
    "invalid_tool_arguments": "tool-call arguments that are not a JSON object were kept under '_raw'",
    "invalid_state": "a SWE-agent step `state` that is neither a dict nor JSON was ignored",
    "missing_tool_result": "a tool call got no result before the conversation moved on; a synthetic one was inserted",
    "orphan_tool_result": "a tool result answering no pending tool call was dropped",
    "missing_sidechain_prompt": "a subagent thread lacked its prompt; the spawning call's prompt was inserted",
    "unlinked_sidechain": "a subagent thread could not be tied to the tool call that spawned it",
}


class TraceFormatError(ValueError):
    """A trace that strict mode refuses; the message names the file and the line (or key)."""

    def __init__(
        self, path: str | Path, line: int | None, reason: str, detail: str = "", *, key: str | None = None
    ) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        self.key = key
        where = self.path + (f":{line}" if line is not None else "") + (f" [{key}]" if key else "")
        explanation = ISSUE_REASONS.get(reason, reason)
        super().__init__(f"{where}: {reason}: {detail or explanation}")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class Message:
    role: str
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    is_error: bool = False
    synthetic: bool = False  # made up by the ingester (e.g. a missing tool result), not in the log
    kind: str = MESSAGE
    reasoning: str = ""  # the model's visible thinking, kept apart from the answer
    timestamp: str | None = None

    def key(self) -> tuple:
        """What the model saw of this message: equal keys mean the same context token for token."""
        calls = tuple((c.id, c.name, json.dumps(c.arguments, sort_keys=True)) for c in self.tool_calls)
        return (self.role, self.content, calls, self.tool_call_id, self.reasoning)


@dataclass
class TraceExample:
    id: str
    format: str
    session_id: str
    messages: list[Message]
    outcome: dict[str, Any] | None = None
    parent_id: str | None = None  # for a sidechain (subagent) thread: the example it hangs off
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceExample:
        messages = [
            Message(**{**m, "tool_calls": [ToolCall(**c) for c in m.get("tool_calls", [])]}) for m in data["messages"]
        ]
        return cls(**{**data, "messages": messages})


def messages_digest(messages: list[Message], length: int = 16) -> str:
    """A content hash of a conversation: stable ids that survive moving or renaming files."""
    digest = hashlib.sha256()
    for message in messages:
        digest.update(json.dumps(message.key(), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:length]


@dataclass
class IngestReport:
    """Counts over everything ingested; `issues` holds every skipped or repaired item by reason.

    `normalized` counts by-design rewrites that are not problems (split API messages merged,
    base64 images replaced by a placeholder, ...); strict mode accepts them.
    """

    files: int = 0
    lines: int = 0
    examples: int = 0
    messages: int = 0
    tool_calls: int = 0
    issues: dict[str, int] = field(default_factory=dict)
    normalized: dict[str, int] = field(default_factory=dict)
    by_format: dict[str, IngestReport] = field(default_factory=dict)

    def _scopes(self, fmt: str | None) -> list[IngestReport]:
        if fmt is None:
            return [self]
        return [self, self.by_format.setdefault(fmt, IngestReport())]

    def add(self, fmt: str | None, **counts: int) -> None:
        for scope in self._scopes(fmt):
            for name, value in counts.items():
                setattr(scope, name, getattr(scope, name) + value)

    def add_issue(self, fmt: str | None, reason: str, n: int = 1) -> None:
        for scope in self._scopes(fmt):
            scope.issues[reason] = scope.issues.get(reason, 0) + n

    def add_normalized(self, fmt: str | None, what: str, n: int = 1) -> None:
        for scope in self._scopes(fmt):
            scope.normalized[what] = scope.normalized.get(what, 0) + n

    def count_example(self, example: TraceExample) -> None:
        calls = sum(len(m.tool_calls) for m in example.messages)
        self.add(example.format, examples=1, messages=len(example.messages), tool_calls=calls)
