"""Assembling a message list that chat templates accept: every tool result right after its call.

All formats feed their messages through `ConversationBuilder`, so the pairing rules (and the
issues they raise) are the same everywhere: a result answering no pending call is dropped, and a
call still unanswered when the conversation moves on gets a synthetic result. A call left open
at the very end is kept as is: the model did emit it, the episode just stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .reading import repair_text
from .schema import Message, ToolCall

MISSING_RESULT_TEXT = "[no tool result was recorded]"

ProblemFn = Callable[..., None]  # (reason, detail="", *, line=None, key=None) like FileContext.problem


class ConversationBuilder:
    def __init__(self, problem: ProblemFn) -> None:
        self.messages: list[Message] = []
        self._problem = problem
        self._pending: dict[str, ToolCall] = {}
        self._open_assistant: Message | None = None  # still followed only by tool results

    def add(self, message: Message, *, line: int | None = None, key: str | None = None) -> None:
        if message.role == "tool":
            if message.tool_call_id not in self._pending:
                self._problem("orphan_tool_result", f"tool_call_id {message.tool_call_id!r}", line=line, key=key)
                return
            del self._pending[message.tool_call_id]
            message.content = repair_text(message.content, self._problem, line=line, key=key)
            self.messages.append(message)
            return
        self._close_pending(line=line, key=key)
        message.content = repair_text(message.content, self._problem, line=line, key=key)
        self.messages.append(message)
        self._open_assistant = message if message.role == "assistant" else None
        if message.role == "assistant":
            self._pending = {call.id: call for call in message.tool_calls}

    def add_tool_call(self, call: ToolCall, *, line: int | None = None, key: str | None = None) -> None:
        """Attach one more call to the assistant turn still open (calls logged one event each)."""
        if self._open_assistant is None:
            self.add(Message("assistant", tool_calls=[call]), line=line, key=key)
            return
        self._open_assistant.tool_calls.append(call)
        self._pending[call.id] = call

    def abort_pending(self, text: str) -> int:
        """Answer every open call with `text` (a synthetic result): the user stopped the turn, by design."""
        for call in self._pending.values():
            self.messages.append(Message("tool", text, tool_call_id=call.id, is_error=True, synthetic=True))
        aborted, self._pending = len(self._pending), {}
        return aborted

    def _close_pending(self, *, line: int | None, key: str | None) -> None:
        for call in self._pending.values():
            self._problem("missing_tool_result", f"{call.name} call {call.id!r}", line=line, key=key)
            self.messages.append(Message("tool", MISSING_RESULT_TEXT, tool_call_id=call.id, synthetic=True))
        self._pending = {}


def parse_arguments(raw: Any, problem: ProblemFn, *, line: int | None = None, key: str | None = None) -> dict:
    """OpenAI-style arguments (a JSON string, sometimes already a dict) as a dict."""
    if isinstance(raw, dict):
        return raw
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        problem("invalid_tool_arguments", f"{str(raw)[:60]!r}", line=line, key=key)
        return {"_raw": raw}
    return value
