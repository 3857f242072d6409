"""OpenHands trajectories: a JSON list of events, agent actions answered by observations.

An action the LLM chose carries `tool_call_metadata` (the tool call id and the raw litellm
`model_response`); its observation carries the same id and `cause` = the action's event id.
The assistant text and the exact call arguments come from `model_response` (what the model
produced); actions logged without it fall back to the event's `args`.

Where the events are: a bare JSON list (the UI's trajectory export), the server's
`GET /api/conversations/{id}/trajectory` answer `{"trajectory": [...]}`, or the evaluation
harness's `output.jsonl` with one instance per line, its events under `history` (older harness
versions: a list of `[action, observation]` pairs) and its `instance_id` (plus `resolved` when
the record carries a report), which become the example's outcome. A JSON document is read whole;
`output.jsonl` is streamed a line at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .conversation import ConversationBuilder, parse_arguments
from .reading import FileContext, iter_jsonl, load_json_document
from .schema import REFUSAL, Message, ToolCall, TraceExample, messages_digest

FORMAT = "openhands"

# Events that never reach the LLM's context as a turn of their own.
BOOKKEEPING_EVENTS = frozenset(
    {"agent_state_changed", "change_agent_state", "null", "recall", "condensation", "condensation_request"}
)
# `args` entries that describe how OpenHands ran an action, not what the model asked for.
RUNTIME_ARGS = frozenset(
    {
        "thought",
        "impl_source",
        "translated_ipython_code",
        "confirmation_state",
        "security_risk",
        "is_input",
        "blocking",
        "hidden",
        "wait_for_response",
        "image_urls",
    }
)


def read_openhands(ctx: FileContext) -> Iterator[TraceExample]:
    if ctx.path.suffix == ".jsonl":
        for line, record, _ in iter_jsonl(ctx.path, ctx):
            events = record.get("history")
            if not isinstance(events, list):
                ctx.problem("invalid_record", "evaluation record without a `history` list", line=line)
                continue
            task = record.get("instance_id")
            session_id = str(task if task is not None else f"{ctx.path.stem}:{line}")
            outcome = _evaluation_outcome(record)
            example = _example(_flatten(events), ctx, session_id, line=line, prefix="history", outcome=outcome)
            if example is not None:
                yield example
        return
    document = load_json_document(ctx.path, ctx)
    if isinstance(document, dict) and isinstance(document.get("trajectory"), list):
        ctx.normalized("openhands_wrapper")
        document = document["trajectory"]
    if not isinstance(document, list):
        if document is not None:
            ctx.problem("invalid_record", f"expected a list of events, got {type(document).__name__}")
        return
    example = _example(_flatten(document), ctx, ctx.path.stem)
    if example is not None:
        yield example


def _flatten(events: list) -> list:
    """Older evaluation outputs keep `history` as [action, observation] pairs; events in order."""
    flat: list = []
    for event in events:
        if isinstance(event, list | tuple) and all(isinstance(e, dict) for e in event):
            flat.extend(e for e in event if e)  # an empty dict stands for "no observation yet"
        else:
            flat.append(event)
    return flat


def _evaluation_outcome(record: dict) -> dict[str, Any] | None:
    outcome: dict[str, Any] = {}
    if record.get("instance_id") is not None:
        outcome["instance_id"] = record["instance_id"]
    for source in (record, record.get("report"), record.get("test_result")):
        if isinstance(source, dict) and isinstance(source.get("resolved"), bool):
            outcome["resolved"] = source["resolved"]
            break
    if isinstance(record.get("error"), str) and record["error"]:
        outcome["error"] = record["error"]
    return outcome or None


def _example(
    events: list,
    ctx: FileContext,
    session_id: str,
    *,
    line: int | None = None,
    prefix: str = "",
    outcome: dict[str, Any] | None = None,
) -> TraceExample | None:
    builder = ConversationBuilder(ctx.problem)
    call_of_event: dict[Any, str] = {}  # action event id -> tool call id, for observations linked by `cause`
    response_seen: set[str] = set()
    model = None
    stamps = [e.get("timestamp") for e in events if isinstance(e, dict) and e.get("timestamp")]
    for index, event in enumerate(events):
        key = f"{prefix}[{index}]"
        if not isinstance(event, dict):
            ctx.problem("invalid_record", "event is not an object", line=line, key=key)
            continue
        metadata = event.get("tool_call_metadata") if isinstance(event.get("tool_call_metadata"), dict) else None
        response = metadata.get("model_response") if metadata else None
        if isinstance(response, dict) and model is None:
            model = response.get("model")
        if "action" in event:
            _add_action(builder, event, metadata, response, response_seen, call_of_event, ctx, key, line)
        elif "observation" in event:
            _add_observation(builder, event, metadata, call_of_event, ctx, key, line)
        else:
            ctx.problem("unknown_event_type", "event is neither an action nor an observation", line=line, key=key)
    if not builder.messages:
        return None
    return TraceExample(
        id=f"{FORMAT}:{session_id}:{messages_digest(builder.messages)}",
        format=FORMAT,
        session_id=session_id,
        messages=builder.messages,
        outcome=outcome,
        metadata={
            "model": model,
            "first_timestamp": stamps[0] if stamps else None,
            "last_timestamp": stamps[-1] if stamps else None,
            "line": line,
        },
    )


def _add_action(
    builder: ConversationBuilder,
    event: dict,
    metadata: dict | None,
    response: Any,
    response_seen: set[str],
    call_of_event: dict,
    ctx: FileContext,
    key: str,
    line: int | None,
) -> None:
    action = event["action"]
    args = event.get("args") if isinstance(event.get("args"), dict) else {}
    stamp = event.get("timestamp")
    if action in BOOKKEEPING_EVENTS:
        return
    if action == "system":
        builder.add(
            Message("system", str(args.get("content") or event.get("message") or ""), timestamp=stamp),
            line=line,
            key=key,
        )
        return
    if action == "message" and metadata is None:
        role = "user" if event.get("source") == "user" else "assistant"
        builder.add(
            Message(role, str(args.get("content") or event.get("message") or ""), timestamp=stamp), line=line, key=key
        )
        return
    if event.get("source") != "agent":
        ctx.problem("unknown_event_type", f"{event.get('source')} action {action!r}", line=line, key=key)
        return
    call_id = str((metadata or {}).get("tool_call_id") or f"event-{event.get('id')}")
    name = str(metadata.get("function_name") or action) if metadata else action
    arguments = _model_arguments(response, call_id, ctx, key, line)
    if arguments is None:
        arguments = {k: v for k, v in args.items() if k not in RUNTIME_ARGS}
    call = ToolCall(call_id, name, arguments)
    call_of_event[event.get("id")] = call_id
    response_id = response.get("id") if isinstance(response, dict) else None
    if response_id is not None and response_id in response_seen:
        builder.add_tool_call(call, line=line, key=key)  # a further call from the same LLM response
        return
    if response_id is not None:
        response_seen.add(response_id)
    builder.add(
        Message("assistant", _model_text(response, args), tool_calls=[call], timestamp=stamp), line=line, key=key
    )


def _add_observation(
    builder: ConversationBuilder,
    event: dict,
    metadata: dict | None,
    call_of_event: dict,
    ctx: FileContext,
    key: str,
    line: int | None,
) -> None:
    observation = event["observation"]
    if observation in BOOKKEEPING_EVENTS:
        return
    call_id = metadata.get("tool_call_id") if metadata else None
    call_id = str(call_id) if call_id else call_of_event.get(event.get("cause"))
    extras = event.get("extras") if isinstance(event.get("extras"), dict) else {}
    exit_code = (extras.get("metadata") or {}).get("exit_code") if isinstance(extras.get("metadata"), dict) else None
    is_error = observation in ("error", "user_rejected") or (isinstance(exit_code, int) and exit_code != 0)
    builder.add(
        Message(
            "tool",
            str(event.get("content") or ""),
            tool_call_id=call_id,
            is_error=is_error,
            kind=REFUSAL if observation == "user_rejected" else "message",
            timestamp=event.get("timestamp"),
        ),
        line=line,
        key=key,
    )


def _response_message(response: Any) -> dict:
    try:
        message = response["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return {}
    return message if isinstance(message, dict) else {}


def _model_text(response: Any, args: dict) -> str:
    text = _response_message(response).get("content")
    if isinstance(text, list):  # content parts
        text = "\n".join(str(p.get("text", "")) for p in text if isinstance(p, dict))
    return str(text if text is not None else args.get("thought") or "")


def _model_arguments(response: Any, call_id: str, ctx: FileContext, key: str, line: int | None) -> dict | None:
    """The call's arguments exactly as the model produced them, or None if the response lacks them."""
    for call in _response_message(response).get("tool_calls") or []:
        if isinstance(call, dict) and call.get("id") == call_id:
            raw = (call.get("function") or {}).get("arguments")
            return parse_arguments(raw, ctx.problem, line=line, key=key)
    return None
