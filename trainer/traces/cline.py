"""Cline / Roo Code task folders: `tasks/<task-id>/api_conversation_history.json` (+ `ui_messages.json`).

The history is what the model saw: a JSON list of Anthropic `MessageParam`s (`role`, `content` as
a string or blocks, optional `ts`). Older versions write tools as XML in the assistant's text and
their results as user text (`[tool_name for 'x'] Result: ...`); newer ones use `tool_use` /
`tool_result` blocks. Both are read as they are: XML tool calls stay text, the model wrote them.

User signals are marked on the message that carries them (strings from Cline's
`src/core/task/index.ts` and tool handlers): "The user denied this operation" -> `kind=REFUSAL`
(the proposed call was refused); "The user made the following updates to your content" ->
`kind=USER_EDIT` (the user rewrote the model's edit before accepting it). `ui_messages.json`
(ClineMessage list: `ts`, `type` ask/say, `say` user_feedback / user_feedback_diff / ...) is
counted into `metadata["ui"]`; `task_metadata.json` gives the model.

The model's reasoning is kept apart from its answer (`Message.reasoning`), never as text in the
content a preference pair trains on. The shapes, by writer:
- Anthropic `thinking` blocks (`thinking`, `signature`; Cline adds OpenAI Responses `summary`
  items) and `redacted_thinking` (`data`: encrypted) -- Cline and Roo;
- Roo Code's `reasoning` block: plain (`text`, `summary`) or OpenAI's encrypted form
  (`encrypted_content`, empty `summary`), and `thoughtSignature` (Gemini's opaque signature)
  (`src/core/task/Task.ts`, `addToApiConversationHistory`);
- OpenRouter-style `reasoning_details` lists (`reasoning.text` / `reasoning.summary` /
  `reasoning.encrypted` items) on the message (Roo) or on a text or tool_use block (Cline,
  `src/shared/messages/content.ts`), and a message-level `reasoning_content` string.
Readable text becomes the reasoning (each distinct piece once, in order); what is encrypted or
opaque has no text to keep and is counted under `normalized` (`encrypted_reasoning`,
`thought_signature`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from .conversation import ConversationBuilder
from .reading import FileContext, load_json_document
from .schema import MESSAGE, REFUSAL, USER_EDIT, Message, ToolCall, TraceExample, messages_digest

FORMAT = "cline"
DENIED = "The user denied this operation"
USER_EDITED = "The user made the following updates to your content"
UI_SIGNALS = ("user_feedback", "user_feedback_diff", "error", "diff_error", "api_req_failed")
REASONING_BLOCKS = frozenset({"thinking", "redacted_thinking", "reasoning", "thoughtSignature"})


def read_cline(ctx: FileContext, sidecars: Sequence[FileContext] = ()) -> Iterator[TraceExample]:
    history = load_json_document(ctx.path, ctx, expect=(list, "a list of messages"))
    if history is None:
        return
    builder = ConversationBuilder(ctx.problem)
    for index, raw in enumerate(history):
        key = f"[{index}]"
        if not isinstance(raw, dict) or raw.get("role") not in ("user", "assistant"):
            ctx.problem("invalid_record", "message without a user/assistant role", key=key)
            continue
        for message in _messages(raw, ctx, key):
            builder.add(message, key=key)
    if not builder.messages:
        return
    metadata: dict[str, Any] = {"task_id": ctx.path.parent.name}
    for side in sidecars:
        _read_sidecar(side, metadata)
    session_id = ctx.path.parent.name
    yield TraceExample(
        id=f"{FORMAT}:{session_id}:{messages_digest(builder.messages)}",
        format=FORMAT,
        session_id=session_id,
        messages=builder.messages,
        metadata=metadata,
    )


def _signal(text: str) -> str:
    if DENIED in text:
        return REFUSAL
    if USER_EDITED in text:
        return USER_EDIT
    return MESSAGE


def _messages(raw: dict, ctx: FileContext, key: str) -> list[Message]:
    role, content, stamp = raw["role"], raw.get("content"), raw.get("ts")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    texts: list[str] = []
    calls: list[ToolCall] = []
    results: list[Message] = []
    reasoning = _Reasoning(ctx)
    if role == "assistant":
        reasoning.add(raw.get("reasoning_content"))
        reasoning.details(raw.get("reasoning_details"))
    for block in content if isinstance(content, list) else []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text") or ""))
            if role == "assistant":
                reasoning.details(block.get("reasoning_details"))
        elif kind == "image":
            ctx.normalized("image_omitted")
            texts.append("[image omitted]")
        elif kind in REASONING_BLOCKS and role == "assistant":
            reasoning.block(block)
        elif kind == "tool_use" and role == "assistant":
            arguments = block.get("input") if isinstance(block.get("input"), dict) else {"_raw": block.get("input")}
            calls.append(ToolCall(str(block.get("id")), str(block.get("name", "")), arguments))
            reasoning.details(block.get("reasoning_details"))
        elif kind == "tool_result" and role == "user":
            body = block.get("content")
            text = (
                body
                if isinstance(body, str)
                else "\n".join(
                    str(b.get("text") or "") if isinstance(b, dict) and b.get("type") == "text" else "[image omitted]"
                    for b in body or []
                )
            )
            results.append(
                Message(
                    "tool",
                    text,
                    tool_call_id=str(block.get("tool_use_id")),
                    is_error=bool(block.get("is_error")),
                    kind=_signal(text),
                    timestamp=stamp,
                )
            )
        else:
            ctx.problem("unknown_content_block", f"{role} block {kind!r}", key=key)
            texts.append(f"[{kind} block]")
    text = "\n".join(t for t in texts if t)
    if role == "assistant":
        return [Message("assistant", text, tool_calls=calls, reasoning=reasoning.text(), timestamp=stamp)]
    if text or not results:
        results.append(Message("user", text, kind=_signal(text), timestamp=stamp))
    return results


class _Reasoning:
    """The readable reasoning of one assistant message, from every shape it comes in."""

    def __init__(self, ctx: FileContext) -> None:
        self.ctx = ctx
        self.parts: list[str] = []

    def add(self, text: object) -> None:
        if isinstance(text, str) and text.strip() and text not in self.parts:
            self.parts.append(text)

    def summary(self, items: object) -> None:
        """OpenAI Responses summary items (`summary_text`) or reasoning_details kept as a summary."""
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict):
                self.add(item.get("text") if isinstance(item.get("text"), str) else item.get("summary"))

    def block(self, block: dict) -> None:
        kind = block["type"]
        if kind == "thoughtSignature":
            self.ctx.normalized("thought_signature")
            return
        readable = block.get("thinking") if kind == "thinking" else block.get("text")
        before = len(self.parts)
        self.add(readable)
        if len(self.parts) == before:
            self.summary(block.get("summary"))
        if len(self.parts) == before and (kind == "redacted_thinking" or block.get("encrypted_content")):
            self.ctx.normalized("encrypted_reasoning")

    def details(self, details: object) -> None:
        """OpenRouter-style `reasoning_details`: text and summaries are read, encrypted ones counted."""
        for item in details if isinstance(details, list) else []:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "reasoning.encrypted":
                self.ctx.normalized("encrypted_reasoning")
            else:
                self.add(item.get("text") if isinstance(item.get("text"), str) else item.get("summary"))

    def text(self) -> str:
        return "\n".join(self.parts)


def _read_sidecar(ctx: FileContext, metadata: dict[str, Any]) -> None:
    try:
        value = json.loads(ctx.path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        ctx.problem("invalid_json", str(error), line=getattr(error, "lineno", None))
        return
    if ctx.path.name == "ui_messages.json" and isinstance(value, list):
        says = [m.get("say") or m.get("ask") for m in value if isinstance(m, dict)]
        metadata["ui"] = {name: says.count(name) for name in UI_SIGNALS if name in says}
        metadata["ui_messages"] = len(value)
    elif ctx.path.name == "task_metadata.json" and isinstance(value, dict):
        usage = value.get("model_usage") if isinstance(value.get("model_usage"), list) else []
        models = [u.get("model_id") for u in usage if isinstance(u, dict) and u.get("model_id")]
        metadata["model"] = models[-1] if models else None
    else:
        ctx.problem("invalid_record", f"unexpected {type(value).__name__} in {ctx.path.name}")
