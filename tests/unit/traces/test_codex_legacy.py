"""Codex CLI rollouts written by the earlier releases read like the current ones.

Three layouts of one session (placeholder content): the current `{timestamp, type, payload}`
envelope; codex-rs before rollout items (a bare SessionMeta line, bare ResponseItems and
`{"record_type": "state"}` lines); the TypeScript CLI's `{"session", "items"}` document.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.traces_fixtures import shared_case, write_json, write_jsonl
from trainer.traces import TraceFormatError, TraceIngester, detect_format
from trainer.traces.ingest import HEAD_BYTES

SESSION = "11111111-2222-4333-8444-555555555555"
STAMP = "2025-07-14T09:12:03.120Z"


def items() -> list[dict]:
    """A user asks for a fix; the model reasons, runs a failing test, patches, answers: 7 items,
    6 messages (user, assistant + call, result, assistant call, result, answer), 2 calls."""
    output = {"output": "F\nE   assert slugify('A B') == 'a-b'\n1 failed", "metadata": {"exit_code": 1}}
    return [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Fix tests/test_util.py"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "**Running the tests first**"}]},
        {"type": "function_call", "name": "shell", "arguments": '{"command": ["pytest", "-q"]}', "call_id": "c1"},
        {"type": "function_call_output", "call_id": "c1", "output": json.dumps(output)},
        {"type": "function_call", "name": "shell", "arguments": '{"command": ["apply_patch", "..."]}', "call_id": "c2"},
        {
            "type": "function_call_output",
            "call_id": "c2",
            "output": '{"output": "Done!", "metadata": {"exit_code": 0}}',
        },
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Fixed slugify."}]},
    ]


def current_rollout(path: Path) -> Path:
    meta = {"id": SESSION, "timestamp": STAMP, "cwd": "/home/user/proj", "cli_version": "0.44.0"}
    lines = [{"timestamp": STAMP, "type": "session_meta", "payload": meta}]
    lines += [{"timestamp": STAMP, "type": "response_item", "payload": item} for item in items()]
    return write_jsonl(path / "rollout-2025-10-02T09-12-03-current.jsonl", lines)


def legacy_rollout(path: Path, *, git: bool = False, instructions: str = "Placeholder instructions.") -> Path:
    meta = {"id": SESSION, "timestamp": STAMP, "instructions": instructions}
    if git:  # SessionMetaWithGit, the last release before rollout items
        meta["git"] = {"commit_hash": "0" * 40, "branch": "main", "repository_url": None}
    body = items()
    lines = [meta, *body[:4], {"record_type": "state"}, *body[4:], {"record_type": "state"}]
    return write_jsonl(path / "sessions" / "2025" / "07" / "14" / "rollout-2025-07-14T09-12-03-legacy.jsonl", lines)


def typescript_rollout(path: Path) -> Path:
    document = {"session": {"timestamp": STAMP, "id": SESSION, "instructions": ""}, "items": items()}
    return write_json(path / "sessions" / f"rollout-2025-05-01-{SESSION}.json", document)


def ingest(path: Path, *, strict: bool = True):
    ingester = TraceIngester(strict=strict)
    return list(ingester.ingest(path)), ingester.report


def test_an_earlier_codex_rs_rollout_reads_as_the_same_example_as_the_current_envelope(tmp_path):
    (current,), _ = ingest(current_rollout(tmp_path / "current"))
    (legacy,), report = ingest(legacy_rollout(tmp_path / "legacy"))
    assert (report.examples, report.messages, report.tool_calls, report.lines) == (1, 6, 2, 10)
    assert [m.key() for m in legacy.messages] == [m.key() for m in current.messages]
    assert legacy.id == current.id == f"codex:{SESSION}:{legacy.id.rsplit(':', 1)[1]}"
    assert legacy.messages[1].reasoning == "**Running the tests first**"
    assert [(m.content, m.is_error) for m in legacy.messages if m.role == "tool"] == [
        ("F\nE   assert slugify('A B') == 'a-b'\n1 failed", True),
        ("Done!", False),
    ]
    assert (legacy.metadata["first_timestamp"], legacy.metadata["last_timestamp"]) == (STAMP, STAMP)


def test_legacy_state_lines_are_counted_as_bookkeeping_never_as_issues(tmp_path):
    _, report = ingest(legacy_rollout(tmp_path))
    assert report.issues == {} and report.normalized == {"legacy_state_line": 2}


@pytest.mark.parametrize("git", [False, True], ids=["session-meta", "session-meta-with-git"])
def test_a_legacy_rollout_is_detected_by_its_bare_session_meta_line(tmp_path, git):
    assert detect_format(legacy_rollout(tmp_path, git=git)) == "codex"


def test_a_legacy_session_meta_longer_than_the_detection_head_is_still_a_codex_rollout(tmp_path):
    path = legacy_rollout(tmp_path, instructions="x" * (HEAD_BYTES + 10))
    assert detect_format(path) == "codex"
    (example,), _ = ingest(path)
    assert len(example.messages) == 6


def test_a_legacy_line_that_is_neither_header_state_nor_item_is_an_invalid_record_naming_the_line(tmp_path):
    path = legacy_rollout(tmp_path)
    lines = path.read_text().splitlines()
    lines.insert(2, json.dumps({"note": "not an item"}))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError, match=rf"^{re.escape(str(path))}:3: invalid_record: neither a session header"):
        ingest(path)
    (example,), report = ingest(path, strict=False)
    assert report.issues == {"invalid_record": 1} and len(example.messages) == 6


def test_a_current_envelope_line_without_its_payload_is_still_refused(tmp_path):
    path = current_rollout(tmp_path)
    with path.open("a") as handle:
        handle.write(json.dumps({"timestamp": STAMP, "type": "response_item"}) + "\n")
    with pytest.raises(
        TraceFormatError, match=rf"^{re.escape(str(path))}:9: invalid_record: 'response_item' line without a payload"
    ):
        ingest(path)


def test_the_typescript_codex_cli_rollout_document_reads_like_a_current_rollout(tmp_path):
    (current,), _ = ingest(current_rollout(tmp_path / "current"))
    path = typescript_rollout(tmp_path / "ts")
    assert detect_format(path) == "codex"
    (example,), report = ingest(path)
    assert [m.key() for m in example.messages] == [m.key() for m in current.messages]
    assert (example.id, report.issues) == (current.id, {})


def test_a_typescript_rollout_item_that_is_not_an_object_is_named_by_its_index(tmp_path):
    path = typescript_rollout(tmp_path)
    document = json.loads(path.read_text())
    document["items"].insert(1, "stray text")
    path.write_text(json.dumps(document))
    with pytest.raises(TraceFormatError, match=rf"^{re.escape(str(path))} \[items\[1\]\]: invalid_record"):
        ingest(path)


def test_case_10_legacy_rollout_gives_the_control_example():
    case = shared_case("10-codex-legacy-rollout")
    (control,), _ = ingest(case / "control_current")
    for fmt in ("auto", "codex"):
        ingester = TraceIngester(fmt, strict=True)
        (legacy,) = list(ingester.ingest(case / "legacy"))
        assert (ingester.report.messages, ingester.report.tool_calls, ingester.report.issues) == (6, 2, {})
        assert ingester.report.normalized == {"legacy_state_line": 2}
        assert [m.key() for m in legacy.messages] == [m.key() for m in control.messages]
