"""OpenAI chat messages: JSONL of `{"messages": [...]}`, one conversation per line (streamed).

Assistant `tool_calls` carry `arguments` as a JSON string; they become dicts. A record may name
its task (`instance_id` / `task_id`) and say how it went (`resolved`, `reward`, `exit_status`);
those become the example's outcome, which is what outcome pairs are mined from.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .conversation import ConversationBuilder, ProblemFn, parse_arguments
from .reading import FileContext, iter_jsonl, load_json_document
from .schema import Message, ToolCall, TraceExample, messages_digest

FORMAT = "openai"
ROLE_ALIASES = {"developer": "system", "function": "tool"}
OUTCOME_FIELDS = ("instance_id", "task_id", "resolved", "reward", "exit_status")


def read_openai(ctx: FileContext) -> Iterator[TraceExample]:
    if ctx.path.suffix == ".json":  # a single record as a JSON document
        record = load_json_document(ctx.path, ctx)
        records = [] if record is None else [(None, record)]
    else:
        records = ((line, record) for line, record, _ in iter_jsonl(ctx.path, ctx))
    for line, record in records:
        example = _example(record, ctx, line)
        if example is not None:
            yield example


def _example(record: Any, ctx: FileContext, line: int | None) -> TraceExample | None:
    raw_messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(raw_messages, list):
        ctx.problem("invalid_record", "record without a `messages` list", line=line)
        return None
    builder = ConversationBuilder(ctx.problem)
    for index, raw in enumerate(raw_messages):
        message = openai_message(raw, ctx.problem, line=line, key=f"messages[{index}]")
        if message is not None:
            builder.add(message, line=line, key=f"messages[{index}]")
    if not builder.messages:
        return None
    session_id = str(record.get("id") or record.get("session_id") or f"{ctx.path.stem}:{line}")
    outcome = {k: record[k] for k in OUTCOME_FIELDS if k in record} or None
    return TraceExample(
        id=f"{FORMAT}:{session_id}:{messages_digest(builder.messages)}",
        format=FORMAT,
        session_id=session_id,
        messages=builder.messages,
        outcome=outcome,
        metadata={"model": record.get("model"), "line": line},
    )


def content_text(content: Any) -> str:
    """A message's content as text: strings as they are, text parts joined, images as a marker."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content if isinstance(content, list) else [content]:
        if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
            parts.append(str(part.get("text", "")))
        elif isinstance(part, dict) and part.get("type") in ("image_url", "image", "input_image"):
            parts.append("[image omitted]")
        else:
            parts.append(str(part.get("text", "")) if isinstance(part, dict) else str(part))
    return "\n".join(parts)


def openai_message(raw: Any, problem: ProblemFn, *, line: int | None = None, key: str | None = None) -> Message | None:
    """One OpenAI-shaped message; None (reported) when it has no usable role."""
    if not isinstance(raw, dict):
        problem("invalid_record", "message is not an object", line=line, key=key)
        return None
    role = ROLE_ALIASES.get(raw.get("role"), raw.get("role"))
    if role not in ("system", "user", "assistant", "tool"):
        problem("unknown_role", f"role {raw.get('role')!r}", line=line, key=key)
        return None
    calls = []
    for index, call in enumerate(raw.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            problem("invalid_record", "tool call without a function", line=line, key=f"{key}.tool_calls[{index}]")
            continue
        arguments = parse_arguments(function.get("arguments"), problem, line=line, key=f"{key}.tool_calls[{index}]")
        calls.append(ToolCall(str(call.get("id") or f"call-{index}"), str(function.get("name", "")), arguments))
    tool_call_id = raw.get("tool_call_id")
    return Message(
        role,
        content_text(raw.get("content")),
        tool_calls=calls,
        tool_call_id=str(tool_call_id) if tool_call_id is not None else None,
        is_error=bool(raw.get("is_error")),
        reasoning=str(raw.get("reasoning_content") or ""),
    )
