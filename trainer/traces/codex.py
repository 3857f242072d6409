"""Codex CLI session rollouts (`~/.codex/sessions/YYYY/MM/DD/rollout-<time>-<id>.jsonl`), streamed.

Each line is `{"timestamp", "type", "payload"}` (codex-rs `RolloutLine`): `session_meta` (id, cwd,
cli_version, instructions), `turn_context` (model, cwd, policies), `response_item` (what the
model saw and said: `message` with input_text/output_text parts, `reasoning` with summary parts,
`function_call` / `custom_tool_call` / `local_shell_call` and their `*_output`s linked by
`call_id`), `event_msg` (UI events; most repeat a response_item and are skipped by design) and
`compacted`. An `event_msg` of type `turn_aborted` (the user pressed Esc) becomes a user message
of kind `INTERRUPTION`: the interrupted turn is a negative signal, as in Claude Code logs.

Rollouts written by the earlier releases read the same way (the same example, the same id):
- codex-rs before rollout items (openai/codex#3380, Sep 2025; `codex-rs/core/src/rollout.rs` at
  89a151f), in the same `sessions/YYYY/MM/DD/rollout-*.jsonl` tree, has no envelope: the first
  line is the bare `SessionMeta` (`id`, `timestamp`, `instructions`, later also `git`), every
  other line a bare `ResponseItem` (the payloads above), plus `{"record_type": "state"}`
  bookkeeping lines, skipped and counted under `normalized` as `legacy_state_line`.
- the TypeScript Codex CLI (`codex-cli/src/utils/storage/save-rollout.ts`) wrote one JSON
  document per session, `sessions/rollout-<date>-<id>.json`: `{"session": {"timestamp", "id",
  "instructions"}, "items": [ResponseItem...]}`; problems are located by `items[<index>]`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .conversation import ConversationBuilder, parse_arguments
from .openai import content_text
from .reading import FileContext, iter_jsonl, load_json_document
from .schema import INTERRUPTION, Message, ToolCall, TraceExample, messages_digest

FORMAT = "codex"
LINE_TYPES = frozenset({"session_meta", "turn_context", "response_item", "event_msg", "compacted"})  # RolloutLine
CALLS = frozenset({"function_call", "custom_tool_call", "local_shell_call"})
OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output", "local_shell_call_output"})
# Payloads that describe the session or repeat a response_item for the UI: read by design, no turn.
SKIPPED_ITEMS = frozenset({"web_search_call", "ghost_snapshot", "other"})
INTERRUPTED_TEXT = "[turn aborted by the user]"
LEGACY_META_KEYS = frozenset({"id", "timestamp", "instructions", "git"})  # codex-rs SessionMeta(WithGit)
ABORTED_CALL_TEXT = "[aborted: the user stopped the turn before this call ran]"


def read_codex(ctx: FileContext) -> Iterator[TraceExample]:
    if ctx.path.suffix == ".json":
        yield from _read_typescript_rollout(ctx)
        return
    builder = ConversationBuilder(ctx.problem)
    meta: dict[str, Any] = {}
    reasoning: list[str] = []
    first_stamp = last_stamp = None
    for line, record, _ in iter_jsonl(ctx.path, ctx):
        kind, payload = record.get("type"), record.get("payload")
        if "payload" not in record and kind not in LINE_TYPES:  # an earlier release's bare line
            stamp = _read_legacy_line(builder, record, meta, reasoning, ctx, line)
            first_stamp = first_stamp or stamp
            last_stamp = last_stamp or stamp
            continue
        if not isinstance(payload, dict):
            ctx.problem("invalid_record", f"{kind!r} line without a payload object", line=line)
            continue
        stamp = record.get("timestamp")
        first_stamp = first_stamp or stamp
        last_stamp = stamp or last_stamp
        if kind == "session_meta":
            meta.update({k: payload.get(k) for k in ("id", "cwd", "cli_version", "originator") if payload.get(k)})
        elif kind == "turn_context":
            meta.setdefault("model", payload.get("model"))
        elif kind == "event_msg":
            if payload.get("type") == "turn_aborted":
                ctx.normalized("aborted_tool_call", builder.abort_pending(ABORTED_CALL_TEXT))
                builder.add(Message("user", INTERRUPTED_TEXT, kind=INTERRUPTION, timestamp=stamp), line=line)
        elif kind == "response_item":
            _add_item(builder, payload, reasoning, ctx, line, stamp)
        elif kind == "compacted":
            ctx.normalized("compaction")
        else:
            ctx.problem("unknown_entry_type", f"rollout line type {kind!r}", line=line)
    yield from _example(ctx, builder, meta, first_stamp, last_stamp)


def is_legacy_meta(record: dict) -> bool:
    """The bare `SessionMeta` first line of a codex-rs rollout from before rollout items."""
    return (
        isinstance(record.get("id"), str)
        and isinstance(record.get("timestamp"), str)
        and record.keys() <= LEGACY_META_KEYS
    )


def _read_legacy_line(
    builder: ConversationBuilder, record: dict, meta: dict[str, Any], reasoning: list[str], ctx: FileContext, line: int
) -> str | None:
    """One bare line of an earlier codex-rs rollout; returns the session's timestamp on its meta line."""
    if record.get("record_type") == "state":
        ctx.normalized("legacy_state_line")
    elif is_legacy_meta(record):
        meta.setdefault("id", record["id"])
        return record["timestamp"]
    elif isinstance(record.get("type"), str):
        _add_item(builder, record, reasoning, ctx, line, None)
    else:
        ctx.problem("invalid_record", "neither a session header, a state line nor a response item", line=line)
    return None


def _read_typescript_rollout(ctx: FileContext) -> Iterator[TraceExample]:
    document = load_json_document(ctx.path, ctx, expect=(dict, "a Codex rollout object"))
    if document is None:
        return
    session, items = document.get("session"), document.get("items")
    if not isinstance(session, dict) or not isinstance(items, list):
        ctx.problem("invalid_record", "a rollout document needs a `session` object and an `items` list")
        return
    builder = ConversationBuilder(ctx.problem)
    reasoning: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            ctx.problem("invalid_record", f"expected an item object, got {type(item).__name__}", key=f"items[{index}]")
            continue
        _add_item(builder, item, reasoning, ctx, None, None, key=f"items[{index}]")
    meta = {"id": session["id"]} if session.get("id") else {}
    stamp = session.get("timestamp")
    yield from _example(ctx, builder, meta, stamp, stamp)


def _example(
    ctx: FileContext, builder: ConversationBuilder, meta: dict[str, Any], first_stamp: Any, last_stamp: Any
) -> Iterator[TraceExample]:
    if not builder.messages:
        return
    session_id = str(meta.get("id") or ctx.path.stem)
    yield TraceExample(
        id=f"{FORMAT}:{session_id}:{messages_digest(builder.messages)}",
        format=FORMAT,
        session_id=session_id,
        messages=builder.messages,
        metadata={**meta, "first_timestamp": first_stamp, "last_timestamp": last_stamp},
    )


def _add_item(
    builder: ConversationBuilder,
    item: dict,
    reasoning: list[str],
    ctx: FileContext,
    line: int | None,
    stamp: Any,
    *,
    key: str | None = None,
) -> None:
    where = {"line": line, "key": key}
    kind = item.get("type")
    if kind == "message":
        role = {"developer": "system"}.get(item.get("role"), item.get("role"))
        if role not in ("system", "user", "assistant"):
            ctx.problem("unknown_role", f"role {item.get('role')!r}", **where)
            return
        text = content_text(item.get("content"), ctx.problem, **where)
        message = Message(role, text, timestamp=stamp)
        if role == "assistant":
            message.reasoning, reasoning[:] = "\n".join(reasoning), []
        builder.add(message, **where)
    elif kind == "reasoning":  # summaries are readable; encrypted_content is not and is dropped
        reasoning += [str(p.get("text") or "") for p in item.get("summary") or [] if isinstance(p, dict)]
    elif kind in CALLS:
        call_id = str(item.get("call_id") or item.get("id") or (f"line-{line}" if key is None else key))
        if kind == "local_shell_call":
            arguments = dict(item.get("action") or {})
        elif kind == "custom_tool_call":
            arguments = {"input": item.get("input")}
        else:
            arguments = parse_arguments(item.get("arguments"), ctx.problem, **where)
        name = str(item.get("name") or ("shell" if kind == "local_shell_call" else ""))
        call = ToolCall(call_id, name, arguments)
        last = builder.messages[-1] if builder.messages else None
        if reasoning or last is None or last.role != "assistant":  # a call made after seeing a result: a new turn
            builder.add(
                Message("assistant", tool_calls=[call], reasoning="\n".join(reasoning), timestamp=stamp), **where
            )
            reasoning.clear()
        else:  # the model's text, then its call(s), in one turn
            builder.add_tool_call(call, **where)
    elif kind in OUTPUTS:
        output = item.get("output")
        success = None
        if isinstance(output, dict):
            success = output.get("success")
            output = output.get("content")
        if isinstance(output, str):
            try:  # function_call_output often holds {"output": ..., "metadata": {"exit_code": ...}} as text
                decoded = json.loads(output)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, dict) and "output" in decoded:
                code = (decoded.get("metadata") or {}).get("exit_code")
                success = success if success is not None else code in (None, 0)
                output = decoded["output"]
        text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        call_id = str(item.get("call_id") or "")
        builder.add(Message("tool", text, tool_call_id=call_id, is_error=success is False, timestamp=stamp), **where)
    elif kind in SKIPPED_ITEMS:
        ctx.normalized(f"{kind}_skipped")
    else:
        ctx.problem("unknown_content_block", f"response_item {kind!r}", **where)
        builder.add(Message("assistant", f"[{kind} item]", timestamp=stamp), **where)
