"""SWE-agent trajectories (`*.traj`): episodes on one task instance per JSON document.

`history` is the model's context. Version 0.x logs observations as role "user" and has no tool
calls; 1.x adds `message_type`, OpenAI-shaped `tool_calls` and role "tool" with `tool_call_ids`.
Older 1.x files without `history` keep the context per step (`query`, earlier `messages`); the
last step's is used. `trajectory[].state` went from a JSON string to a dict; `info` holds
`exit_status` and `submission`, which become the outcome with the instance id.

With a retry loop (`RetryAgent` in SWE-agent's `sweagent/agent/agents.py`), the document is
`{"attempts": [<one trajectory document per attempt>]}` while running and, once done, also holds
a copy of the best attempt at the top level with `info.best_attempt_idx`. Each attempt becomes
its own example with its own exit status, submission and review; the top-level copy is not read
twice (counted under `normalized` as `best_attempt_copy`).

A tool observation that is one of SWE-agent's own error notices (a lint-rejected edit, a
replacement that found nothing) is marked `is_error`, so a corrected call after it can be mined.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .conversation import ConversationBuilder
from .openai import openai_messages
from .reading import FileContext, load_json_document
from .schema import TraceExample, messages_digest

FORMAT = "swe_agent"
# Observations SWE-agent's tools write when the call itself failed (tools/edit_anthropic, windowed_edit*).
ERROR_OBSERVATION_PREFIXES = (
    "Your proposed edit has introduced new syntax error(s)",
    "No replacement was performed",
    "Usage: ",
)
OUTCOME_INFO = ("resolved", "reward", "review")


def read_swe_agent(ctx: FileContext) -> Iterator[TraceExample]:
    document = load_json_document(ctx.path, ctx, expect=(dict, "an object"))
    if document is None:
        return
    attempts = document.get("attempts")
    if not isinstance(attempts, list):
        example = _example(document, ctx, "", ctx.path.stem, _replay_config(document))
        if example is not None:
            yield example
        return
    if isinstance(document.get("history"), list) or isinstance(document.get("trajectory"), list):
        ctx.normalized("best_attempt_copy")
    replay = _replay_config(document)
    best = (document.get("info") or {}).get("best_attempt_idx") if isinstance(document.get("info"), dict) else None
    for index, attempt in enumerate(attempts):
        where = f"attempts[{index}]"
        if not isinstance(attempt, dict):
            ctx.problem("invalid_record", "attempt is not an object", key=where)
            continue
        example = _example(attempt, ctx, f"{where}.", f"{ctx.path.stem}:attempt-{index}", replay)
        if example is not None:
            example.metadata.update(attempt=index, best_attempt=best == index if best is not None else None)
            yield example


def _example(document: dict, ctx: FileContext, prefix: str, session_id: str, replay: dict) -> TraceExample | None:
    trajectory = document.get("trajectory") if isinstance(document.get("trajectory"), list) else []
    history, where = _context(document, trajectory)
    if history is None:
        ctx.problem("invalid_record", "neither `history` nor a step `query` holds the messages", key=f"{prefix}history")
        return None
    history = [_with_tool_call_id(raw) for raw in history]
    builder = ConversationBuilder(ctx.problem)
    for index, message in openai_messages(history, ctx, prefix=f"{prefix}{where}"):
        if message.role == "tool" and message.content.lstrip().startswith(ERROR_OBSERVATION_PREFIXES):
            message.is_error = True
        builder.add(message, key=f"{prefix}{where}[{index}]")
    if not builder.messages:
        return None
    info = document.get("info") if isinstance(document.get("info"), dict) else {}
    replay = _replay_config(document) or replay
    instance_id = (replay.get("problem_statement") or {}).get("id") or ctx.path.stem
    outcome = {"instance_id": instance_id, "exit_status": info.get("exit_status"), "submission": info.get("submission")}
    outcome.update({k: info[k] for k in OUTCOME_INFO if k in info})
    return TraceExample(
        id=f"{FORMAT}:{session_id}:{messages_digest(builder.messages)}",
        format=FORMAT,
        session_id=session_id,
        messages=builder.messages,
        outcome=outcome,
        metadata={
            "model": ((replay.get("agent") or {}).get("model") or {}).get("name"),
            "environment": document.get("environment"),
            "cwd": _working_dir(trajectory, ctx, prefix),
            "model_stats": info.get("model_stats"),
        },
    )


def _with_tool_call_id(raw: Any) -> Any:
    """1.x tool messages carry `tool_call_ids` (a list); the first is the call they answer."""
    if isinstance(raw, dict) and raw.get("role") == "tool" and raw.get("tool_call_id") is None:
        ids = raw.get("tool_call_ids") or [None]
        return {**raw, "tool_call_id": ids[0]}
    return raw


def _context(document: dict, trajectory: list) -> tuple[list | None, str]:
    if isinstance(document.get("history"), list):
        return document["history"], "history"
    last = trajectory[-1] if trajectory and isinstance(trajectory[-1], dict) else {}
    for field in ("query", "messages"):
        if isinstance(last.get(field), list):
            steps = list(last[field])
            if last.get("response"):
                steps.append({"role": "assistant", "content": last["response"]})
            return steps, f"trajectory[-1].{field}"
    return None, ""


def _replay_config(document: dict) -> dict:
    config = document.get("replay_config")
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            config = None
    return config if isinstance(config, dict) else {}


def _working_dir(trajectory: list, ctx: FileContext, prefix: str = "") -> str | None:
    """The first step's working directory; `state` is a JSON string in 0.x and a dict in 1.x."""
    state: Any = trajectory[0].get("state") if trajectory and isinstance(trajectory[0], dict) else None
    if isinstance(state, str):
        try:
            state = json.loads(state)
        except json.JSONDecodeError:
            ctx.problem("invalid_state", f"{state[:60]!r}", key=f"{prefix}trajectory[0].state")
            return None
    return state.get("working_dir") if isinstance(state, dict) else None
