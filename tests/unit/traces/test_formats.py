"""Format variants the real samples do not show: OpenHands parallel calls and refusals, SWE-agent
files without `history` (context per step in `query` or the older `messages`)."""

from __future__ import annotations

import json

from tests.support.traces_fixtures import write_json
from trainer.traces import REFUSAL, TraceIngester


def ingest(path):
    ingester = TraceIngester(strict=True)
    return list(ingester.ingest(path)), ingester.report


def response(response_id, text, calls):
    return {
        "id": response_id,
        "model": "gpt-4o",
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": text,
                    "tool_calls": [
                        {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
                        for cid, name, args in calls
                    ],
                }
            }
        ],
    }


def test_openhands_parallel_calls_and_a_rejected_action(tmp_path):
    both = response("r1", "Reading both.", [("c1", "read", {"path": "a"}), ("c2", "read", {"path": "b"})])
    path = write_json(
        tmp_path / "oh.json",
        [
            {"id": 0, "source": "user", "action": "message", "args": {"content": "compare a and b"}},
            {
                "id": 1,
                "source": "agent",
                "action": "read",
                "args": {"path": "a"},
                "tool_call_metadata": {"function_name": "read", "tool_call_id": "c1", "model_response": both},
            },
            {
                "id": 2,
                "source": "agent",
                "action": "read",
                "args": {"path": "b"},
                "tool_call_metadata": {"function_name": "read", "tool_call_id": "c2", "model_response": both},
            },
            {"id": 3, "source": "agent", "observation": "read", "cause": 1, "content": "A"},
            {"id": 4, "source": "agent", "observation": "read", "cause": 2, "content": "B"},
            {
                "id": 5,
                "source": "agent",
                "action": "run",
                "args": {"command": "rm a"},
                "tool_call_metadata": {
                    "function_name": "execute_bash",
                    "tool_call_id": "c3",
                    "model_response": response("r2", "", [("c3", "execute_bash", {"command": "rm a"})]),
                },
            },
            {
                "id": 6,
                "source": "user",
                "observation": "user_rejected",
                "cause": 5,
                "content": "Action has been rejected",
            },
            {
                "id": 7,
                "source": "environment",
                "observation": "agent_state_changed",
                "extras": {"agent_state": "paused"},
            },
        ],
    )
    (example,), report = ingest(path)
    assert [m.role for m in example.messages] == ["user", "assistant", "tool", "tool", "assistant", "tool"]
    assert [c.id for c in example.messages[1].tool_calls] == ["c1", "c2"]  # one LLM response, two calls
    assert example.messages[1].content == "Reading both."
    assert [m.content for m in example.messages[2:4]] == ["A", "B"]  # linked by `cause`
    rejected = example.messages[5]
    assert (rejected.kind, rejected.is_error, rejected.tool_call_id) == (REFUSAL, True, "c3")
    assert report.tool_calls == 3 and report.issues == {}


def swe_step(query_field, messages, response_text):
    return {
        "action": "ls",
        "observation": "a.py",
        "response": response_text,
        "thought": "",
        "state": json.dumps({"working_dir": "/repo"}),
        query_field: messages,
    }


def test_swe_agent_context_from_the_last_step(tmp_path):
    context = [
        {"role": "system", "content": "SETTING"},
        {"role": "user", "content": "ISSUE"},
        {"role": "assistant", "content": "ls"},
        {"role": "user", "content": "a.py"},
    ]
    for field in ("query", "messages"):  # 1.x `query`; earlier files named it `messages`
        path = write_json(
            tmp_path / f"{field}.traj",
            {
                "trajectory": [swe_step(field, context[:2], "ls"), swe_step(field, context, "submit")],
                "info": {"exit_status": "submitted", "submission": "diff"},
                "replay_config": json.dumps(
                    {"problem_statement": {"id": "repo__repo-7"}, "agent": {"model": {"name": "claude-3"}}}
                ),
            },
        )
        (example,), report = ingest(path)
        assert [m.content for m in example.messages] == ["SETTING", "ISSUE", "ls", "a.py", "submit"]
        assert example.outcome["instance_id"] == "repo__repo-7"  # replay_config given as a JSON string
        assert example.metadata["model"] == "claude-3" and example.metadata["cwd"] == "/repo"
