"""Cline / Roo Code reasoning, in every shape those tools store it, is the message's reasoning.

Never placeholder text in the assistant's content (the tokens a preference pair trains on);
what is encrypted or opaque has no text and is counted under `normalized`. Shapes from Roo's
`Task.addToApiConversationHistory` and Cline's `shared/messages/content.ts` (placeholders only).
"""

from __future__ import annotations

import pytest

from tests.support.traces_fixtures import write_json
from trainer.traces import TraceIngester
from trainer.traces.render import hf_messages

ANSWER = "I'll read utils.py first."
THOUGHT = "The helper is probably in utils.py."


def task(tmp_path, assistant: dict):
    """A task folder: the user's task, the given assistant message, then the user's thanks (or
    the result of its tool call)."""
    calls = [b for b in assistant["content"] if b.get("type") == "tool_use"]
    reply = [{"type": "tool_result", "tool_use_id": c["id"], "content": "def helper(): ..."} for c in calls]
    history = [
        {"role": "user", "content": [{"type": "text", "text": "<task>\nRename the helper\n</task>"}], "ts": 1},
        {"role": "assistant", "ts": 2, **assistant},
        {"role": "user", "content": reply or [{"type": "text", "text": "Thanks."}], "ts": 3},
    ]
    return write_json(tmp_path / "tasks" / "1735689600000" / "api_conversation_history.json", history)


def assistant_of(tmp_path, assistant: dict):
    ingester = TraceIngester(strict=True)
    (example,) = list(ingester.ingest(task(tmp_path, assistant).parent))
    assert [m.role for m in example.messages][:2] == ["user", "assistant"] and len(example.messages) == 3
    return example.messages[1], ingester.report


TEXT = {"type": "text", "text": ANSWER}
CALL = {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "utils.py"}}


@pytest.mark.parametrize(
    "content, extra",
    [
        ([{"type": "thinking", "thinking": THOUGHT, "signature": "sig-placeholder"}, TEXT], {}),
        ([{"type": "reasoning", "text": THOUGHT, "summary": []}, TEXT], {}),  # Roo, most providers
        (  # Cline, OpenAI Responses: the thinking text is empty, its summary readable
            [
                {
                    "type": "thinking",
                    "thinking": "",
                    "signature": "",
                    "summary": [{"type": "summary_text", "text": THOUGHT}],
                },
                TEXT,
            ],
            {},
        ),
        ([{**TEXT, "reasoning_details": [{"type": "reasoning.text", "text": THOUGHT, "format": "x", "index": 0}]}], {}),
        ([TEXT], {"reasoning_details": [{"type": "reasoning.summary", "summary": THOUGHT}]}),  # Roo, on the message
        ([TEXT], {"reasoning_content": THOUGHT}),
    ],
    ids=["thinking", "roo-reasoning", "thinking-summary", "details-on-text", "details-on-message", "reasoning-content"],
)
def test_readable_reasoning_becomes_the_reasoning_and_the_content_is_only_the_answer(tmp_path, content, extra):
    message, report = assistant_of(tmp_path, {"content": content, **extra})
    assert (message.content, message.reasoning) == (ANSWER, THOUGHT)
    assert report.issues == {} and report.normalized == {}
    (rendered,) = hf_messages([message])
    assert (rendered["content"], rendered["reasoning_content"]) == (ANSWER, THOUGHT)


@pytest.mark.parametrize(
    "block, counted",
    [
        (
            {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-placeholder", "id": "rs_1"},
            "encrypted_reasoning",
        ),
        ({"type": "redacted_thinking", "data": "EmwKAhgB-placeholder"}, "encrypted_reasoning"),
        ({"type": "thoughtSignature", "thoughtSignature": "CiQB-placeholder"}, "thought_signature"),
    ],
    ids=["roo-encrypted", "redacted-thinking", "gemini-thought-signature"],
)
def test_encrypted_or_opaque_reasoning_is_counted_never_written_into_the_content(tmp_path, block, counted):
    message, report = assistant_of(tmp_path, {"content": [block, TEXT, CALL]})
    assert (message.content, message.reasoning) == (ANSWER, "")
    assert [c.name for c in message.tool_calls] == ["read_file"]
    assert report.issues == {} and report.normalized == {counted: 1}


def test_encrypted_details_beside_readable_ones_keep_the_readable_text_and_count_the_rest(tmp_path):
    details = [
        {"type": "reasoning.text", "text": THOUGHT, "signature": "sig", "format": "anthropic-claude-v1", "index": 0},
        {"type": "reasoning.encrypted", "data": "opaque-placeholder", "index": 1},
    ]
    message, report = assistant_of(tmp_path, {"content": [{**CALL, "reasoning_details": details}]})
    assert (message.content, message.reasoning) == ("", THOUGHT)
    assert report.normalized == {"encrypted_reasoning": 1}


def test_the_same_thought_stored_twice_is_kept_once_and_distinct_thoughts_in_order(tmp_path):
    """Cline moves a thinking block's details onto the text block: the same text in two places."""
    content = [
        {"type": "thinking", "thinking": THOUGHT, "signature": "sig"},
        {**TEXT, "reasoning_details": [{"type": "reasoning.text", "text": THOUGHT}]},
        {"type": "reasoning", "text": "Then rename it.", "summary": []},
    ]
    message, _ = assistant_of(tmp_path, {"content": content})
    assert message.reasoning == f"{THOUGHT}\nThen rename it."


def test_a_block_of_an_unknown_kind_stays_a_visible_counted_placeholder(tmp_path):
    ingester = TraceIngester()
    (example,) = list(ingester.ingest(task(tmp_path, {"content": [TEXT, {"type": "web_search_tool_result"}]}).parent))
    assert example.messages[1].content == f"{ANSWER}\n[web_search_tool_result block]"
    assert ingester.report.issues == {"unknown_content_block": 1}
