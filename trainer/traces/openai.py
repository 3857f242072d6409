"""OpenAI chat messages: one conversation per JSONL line or Parquet row (streamed), or one JSON document.

A record holds its messages under `messages`, or under `trajectory` in the labelled trajectory
datasets people train on (e.g. SWE-rebench's OpenHands trajectories: `instance_id`,
`trajectory`, `resolved`, `exit_status`; a Parquet column may hold the list as a JSON string).
A record may name its task (`instance_id` / `task_id`) and say how it went (`resolved`,
`reward`, `exit_status`); those become the example's outcome, which outcome pairs are mined from.

Message shapes (OpenAI Chat Completions API reference): assistant `tool_calls` carry `arguments`
as a JSON string (they become dicts); the legacy `function_call` + role `function` shape (no ids)
gets a synthetic call id and its result is paired by name; `refusal` (a field, or a content part)
is kept as the message's text and marks it `kind=REFUSAL`. Content parts this reader does not
know are kept as a visible placeholder and counted, never turned into "".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from .conversation import ConversationBuilder, ProblemFn, parse_arguments
from .reading import FileContext, iter_jsonl, load_json_document
from .schema import MESSAGE, REFUSAL, Message, ToolCall, TraceExample, messages_digest

FORMAT = "openai"
ROLE_ALIASES = {"developer": "system", "function": "tool"}
OUTCOME_FIELDS = ("instance_id", "task_id", "resolved", "reward", "exit_status")
MESSAGE_LIST_KEYS = ("messages", "trajectory")
TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
MEDIA_PARTS = {"image_url": "image", "image": "image", "input_image": "image", "input_audio": "audio", "file": "file"}
PARQUET_BATCH_ROWS = 64


def read_openai(ctx: FileContext) -> Iterator[TraceExample]:
    if ctx.path.suffix == ".parquet":
        records: Iterable[tuple[int | None, Any]] = _parquet_rows(ctx)
    elif ctx.path.suffix == ".json":  # a single record as a JSON document
        record = load_json_document(ctx.path, ctx)
        records = [] if record is None else [(None, record)]
    else:
        records = ((line, record) for line, record, _ in iter_jsonl(ctx.path, ctx))
    for line, record in records:
        example = _example(record, ctx, line)
        if example is not None:
            yield example


def _parquet_rows(ctx: FileContext) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a Parquet file as dicts, a batch at a time (pyarrow), numbered from 1 like lines."""
    import pyarrow.parquet as pq  # imported here: only Parquet inputs need it

    size = ctx.path.stat().st_size
    with pq.ParquetFile(ctx.path) as handle:
        total = max(handle.metadata.num_rows, 1)
        row = reported = 0
        for batch in handle.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                row += 1
                ctx.lines_read()
                yield row, record
            if ctx.progress is not None:  # bytes in proportion to rows, summing to the file size
                done = size * row // total
                ctx.progress(done - reported)
                reported = done
    if ctx.progress is not None and reported < size:
        ctx.progress(size - reported)


def _message_list(record: dict[str, Any], ctx: FileContext, line: int | None) -> list | None:
    for key in MESSAGE_LIST_KEYS:
        value = record.get(key)
        if isinstance(value, str):  # a Parquet/CSV column holding the list as JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                ctx.problem("invalid_json", f"`{key}`: {error.msg}", line=line, key=key)
                return []  # counted once, as invalid_json
        if isinstance(value, list | tuple):
            return list(value)
    return None


def _example(record: Any, ctx: FileContext, line: int | None) -> TraceExample | None:
    raw_messages = _message_list(record, ctx, line) if isinstance(record, dict) else None
    if raw_messages is None:
        ctx.problem("invalid_record", "record without a `messages` (or `trajectory`) list", line=line)
        return None
    builder = ConversationBuilder(ctx.problem)
    for index, message in openai_messages(raw_messages, ctx, line=line):
        builder.add(message, line=line, key=f"messages[{index}]")
    if not builder.messages:
        return None
    session_id = str(record.get("id") or record.get("session_id") or f"{ctx.path.stem}:{line}")
    outcome = {k: record[k] for k in OUTCOME_FIELDS if record.get(k) is not None} or None
    if outcome is not None and isinstance(outcome.get("resolved"), int):  # 0/1 columns
        outcome["resolved"] = bool(outcome["resolved"])
    return TraceExample(
        id=f"{FORMAT}:{session_id}:{messages_digest(builder.messages)}",
        format=FORMAT,
        session_id=session_id,
        messages=builder.messages,
        outcome=outcome,
        metadata={"model": record.get("model") or record.get("model_name"), "line": line},
    )


def content_text(content: Any, problem: ProblemFn, *, line: int | None = None, key: str | None = None) -> str:
    """A message's content as text: strings as they are, text parts joined, media as a marker.

    A `refusal` part contributes its text; a part of unknown type becomes `[<type> content]`
    and is reported as `unknown_content_block`.
    """
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content if isinstance(content, list | tuple) else [content]:
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(part, str):
            parts.append(part)
        elif kind in TEXT_PARTS:
            parts.append(str(part.get("text") or ""))
        elif kind == "refusal":
            parts.append(str(part.get("refusal") or ""))
        elif kind in MEDIA_PARTS:
            parts.append(f"[{MEDIA_PARTS[kind]} omitted]")
        else:
            problem("unknown_content_block", f"content part {kind!r}", line=line, key=key)
            parts.append(f"[{kind or type(part).__name__} content]")
    return "\n".join(parts)


def _has_refusal_part(content: Any) -> bool:
    return isinstance(content, list | tuple) and any(
        isinstance(p, dict) and p.get("type") == "refusal" for p in content
    )


def openai_messages(
    raw_messages: Iterable[Any], ctx: FileContext, *, line: int | None = None, prefix: str = "messages"
) -> Iterator[tuple[int, Message]]:
    """(index, Message) for each usable OpenAI-shaped message; legacy function calls get ids.

    A legacy `function_call` gets the id `<prefix>[i].function_call`; the next role-`function`
    message naming the same function (or, without a name, the oldest open one) answers it.
    """
    open_legacy: list[ToolCall] = []
    for index, raw in enumerate(raw_messages):
        key = f"{prefix}[{index}]"
        message = openai_message(raw, ctx.problem, line=line, key=key)
        if message is None:
            continue
        legacy = raw.get("function_call")
        if message.role == "assistant" and isinstance(legacy, dict):
            arguments = parse_arguments(legacy.get("arguments"), ctx.problem, line=line, key=f"{key}.function_call")
            call = ToolCall(f"{key}.function_call", str(legacy.get("name", "")), arguments)
            message.tool_calls.append(call)
            open_legacy.append(call)
            ctx.normalized("legacy_function_call")
        elif message.role == "tool" and message.tool_call_id is None and open_legacy:
            name = raw.get("name")
            call = next((c for c in open_legacy if c.name == name), open_legacy[0])
            open_legacy.remove(call)
            message.tool_call_id = call.id
        yield index, message


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
    content = raw.get("content")
    text = content_text(content, problem, line=line, key=key)
    refusal = raw.get("refusal")
    kind = MESSAGE
    if isinstance(refusal, str) and refusal:
        text = f"{text}\n{refusal}" if text and refusal not in text else (text or refusal)
        kind = REFUSAL
    elif _has_refusal_part(content):
        kind = REFUSAL
    return Message(
        role,
        text,
        tool_calls=calls,
        tool_call_id=str(tool_call_id) if tool_call_id is not None else None,
        is_error=bool(raw.get("is_error")),
        kind=kind,
        reasoning=next((r for r in (raw.get("reasoning_content"), raw.get("reasoning")) if isinstance(r, str)), ""),
    )
