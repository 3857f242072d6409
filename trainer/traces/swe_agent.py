"""SWE-agent trajectories (`*.traj`): one episode on one task instance per JSON document.

`history` is the model's context. Version 0.x logs observations as role "user" and has no tool
calls; 1.x adds `message_type`, OpenAI-shaped `tool_calls` and role "tool" with `tool_call_ids`.
Older 1.x files without `history` keep the context per step (`query`, earlier `messages`); the
last step's is used. `trajectory[].state` went from a JSON string to a dict; `info` holds
`exit_status` and `submission`, which become the outcome with the instance id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .conversation import ConversationBuilder
from .openai import openai_message
from .reading import FileContext, load_json_document
from .schema import TraceExample, messages_digest

FORMAT = "swe_agent"


def read_swe_agent(ctx: FileContext) -> Iterator[TraceExample]:
    document = load_json_document(ctx.path, ctx, expect=(dict, "an object"))
    if document is None:
        return
    trajectory = document.get("trajectory") if isinstance(document.get("trajectory"), list) else []
    history, where = _context(document, trajectory)
    if history is None:
        ctx.problem("invalid_record", "neither `history` nor a step `query` holds the messages", key="history")
        return
    builder = ConversationBuilder(ctx.problem)
    for index, raw in enumerate(history):
        key = f"{where}[{index}]"
        if isinstance(raw, dict) and raw.get("role") == "tool" and raw.get("tool_call_id") is None:
            ids = raw.get("tool_call_ids") or [None]
            raw = {**raw, "tool_call_id": ids[0]}
        message = openai_message(raw, ctx.problem, key=key)
        if message is not None:
            builder.add(message, key=key)
    if not builder.messages:
        return
    info = document.get("info") if isinstance(document.get("info"), dict) else {}
    replay = _replay_config(document)
    instance_id = (replay.get("problem_statement") or {}).get("id") or ctx.path.stem
    outcome = {"instance_id": instance_id, "exit_status": info.get("exit_status"), "submission": info.get("submission")}
    for known in ("resolved", "reward"):
        if known in info:
            outcome[known] = info[known]
    session_id = ctx.path.stem
    yield TraceExample(
        id=f"{FORMAT}:{session_id}:{messages_digest(builder.messages)}",
        format=FORMAT,
        session_id=session_id,
        messages=builder.messages,
        outcome=outcome,
        metadata={
            "model": ((replay.get("agent") or {}).get("model") or {}).get("name"),
            "environment": document.get("environment"),
            "cwd": _working_dir(trajectory, ctx),
            "model_stats": info.get("model_stats"),
        },
    )


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


def _working_dir(trajectory: list, ctx: FileContext) -> str | None:
    """The first step's working directory; `state` is a JSON string in 0.x and a dict in 1.x."""
    state: Any = trajectory[0].get("state") if trajectory and isinstance(trajectory[0], dict) else None
    if isinstance(state, str):
        try:
            state = json.loads(state)
        except json.JSONDecodeError:
            ctx.problem("invalid_state", f"{state[:60]!r}", key="trajectory[0].state")
            return None
    return state.get("working_dir") if isinstance(state, dict) else None
