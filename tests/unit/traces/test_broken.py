"""Broken logs built on the fly: lenient mode repairs or skips and counts, strict mode names file and line.

The clean base (`basic_session`) is 4 lines: user -> assistant with a Bash call -> its result ->
assistant; one example of 4 messages and 1 tool call. Each test breaks it one way.
"""

from __future__ import annotations

import json

import pytest

from tests.support.traces_fixtures import ClaudeLog, basic_session, write_json, write_jsonl
from trainer.traces import TraceFormatError, TraceIngester, detect_format


def ingest(path, *, strict=False):
    ingester = TraceIngester(strict=strict)
    return list(ingester.ingest(path)), ingester.report


def assert_strict_names(path, line, reason):
    with pytest.raises(TraceFormatError) as error:
        ingest(path, strict=True)
    assert (error.value.path, error.value.line, error.value.reason) == (str(path), line, reason)
    assert str(error.value).startswith(f"{path}:{line}")  # the message itself names file and line
    assert isinstance(error.value, ValueError)


def test_clean_base_has_no_issues(tmp_path):
    path = basic_session().write(tmp_path / "clean.jsonl")
    examples, report = ingest(path, strict=True)
    assert (report.lines, report.examples, report.messages, report.tool_calls) == (4, 1, 4, 1)
    assert report.issues == {} and report.normalized == {}
    assert [m.role for m in examples[0].messages] == ["user", "assistant", "tool", "assistant"]
    assert examples[0].messages[2].content == "3 passed"
    assert examples[0].metadata["git_branch"] == "main"


def test_truncated_last_line(tmp_path):
    log = basic_session()
    lines = log.lines()
    path = log.write(tmp_path / "cut.jsonl")
    path.write_bytes(b"".join(line + b"\n" for line in lines[:3]) + lines[3][: len(lines[3]) // 2])
    examples, report = ingest(path)
    assert report.issues == {"truncated_line": 1}
    assert [m.role for m in examples[0].messages] == ["user", "assistant", "tool"]
    assert_strict_names(path, 4, "truncated_line")


def test_invalid_json_mid_file_is_not_called_truncated(tmp_path):
    lines = basic_session().lines()
    lines.insert(2, b'{"type": "user", oops}')
    path = basic_session().write(tmp_path / "bad.jsonl", lines)
    examples, report = ingest(path)
    assert report.issues == {"invalid_json": 1}
    assert len(examples[0].messages) == 4
    assert_strict_names(path, 3, "invalid_json")


def test_glued_records_are_split(tmp_path):
    lines = basic_session().lines()
    glued = [lines[0], lines[1] + lines[2], lines[3]]  # `...}{...` on line 2
    path = basic_session().write(tmp_path / "glued.jsonl", glued)
    examples, report = ingest(path)
    assert report.issues == {"glued_records": 1}
    assert (report.lines, report.messages, report.tool_calls) == (3, 4, 1)
    assert_strict_names(path, 2, "glued_records")


def test_cut_record_glued_to_the_next_one(tmp_path):
    # Power loss mid-write, then the next record appended on the same line.
    lines = basic_session().lines()
    broken = [lines[0], lines[1][:50] + lines[2], lines[3]]
    path = basic_session().write(tmp_path / "cut-glued.jsonl", broken)
    examples, report = ingest(path)
    # The cut assistant record is lost: its tool call with it, so the result is an orphan.
    assert report.issues == {"invalid_json": 1, "dangling_parent": 1, "orphan_tool_result": 1}
    assert [m.content for m in examples[0].messages] == ["Run the tests", "All 3 tests pass."]


def test_invalid_utf8_is_replaced(tmp_path):
    lines = basic_session().lines()
    lines[0] = lines[0].replace(b"Run the tests", b"Run the \xff\xfe tests")
    path = basic_session().write(tmp_path / "bytes.jsonl", lines)
    examples, report = ingest(path)
    assert report.issues == {"invalid_utf8": 1}
    assert examples[0].messages[0].content == "Run the \ufffd\ufffd tests"
    assert_strict_names(path, 1, "invalid_utf8")


def test_lone_surrogate_is_replaced(tmp_path):
    lines = basic_session().lines()
    lines[3] = lines[3].replace(b"All 3 tests pass.", b"All 3 tests pass \\ud83d.")
    lines[0] = lines[0].replace(b"Run the tests", b"Run the tests \\ud83d\\ude00")  # a valid pair stays
    path = basic_session().write(tmp_path / "surrogate.jsonl", lines)
    examples, report = ingest(path)
    assert report.issues == {"lone_surrogate": 1}
    assert examples[0].messages[3].content == "All 3 tests pass \ufffd."
    assert examples[0].messages[0].content == "Run the tests \U0001f600"
    json.dumps(examples[0].to_dict(), ensure_ascii=False).encode("utf-8")  # encodable everywhere now
    assert_strict_names(path, 4, "lone_surrogate")


def test_mojibake_is_decoded_back(tmp_path):
    log = basic_session()
    log.entries[2]["message"]["content"][0]["content"] = "  3130\u00e2\u2020\u2019    # line"  # 'â†’'
    path = log.write(tmp_path / "mojibake.jsonl")
    examples, report = ingest(path)
    assert report.issues == {"mojibake_repaired": 1}
    assert examples[0].messages[2].content == "  3130\u2192    # line"
    assert_strict_names(path, 3, "mojibake_repaired")


def test_fifty_megabyte_line_with_a_base64_image(tmp_path):
    log = basic_session()
    payload = "A" * (50 * 1024 * 1024)
    log.entries[0]["message"]["content"].append(
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": payload}}
    )
    path = log.write(tmp_path / "big.jsonl")
    assert path.stat().st_size > 50 * 1024 * 1024
    for strict in (False, True):  # an image is no problem: strict mode accepts it too
        examples, report = ingest(path, strict=strict)
        assert report.issues == {}
        assert report.normalized == {"image_omitted": 1, "base64_chars_omitted": 50 * 1024 * 1024}
        assert examples[0].messages[0].content == "Run the tests\n[image: image/png omitted]"


def test_duplicate_lines_are_dropped(tmp_path):
    lines = basic_session().lines()
    lines.insert(2, lines[1])  # the assistant line twice, byte for byte
    lines.append(lines[-1])
    path = basic_session().write(tmp_path / "dup.jsonl", lines)
    examples, report = ingest(path)
    assert report.issues == {"duplicate_line": 2}
    assert (report.examples, report.messages, report.tool_calls) == (1, 4, 1)
    assert_strict_names(path, 3, "duplicate_line")


def test_same_uuid_different_content(tmp_path):
    log = basic_session()
    clash = json.loads(json.dumps(log.entries[3]))
    clash["message"]["content"][0]["text"] = "something else"
    log.raw(clash)
    path = log.write(tmp_path / "clash.jsonl")
    examples, report = ingest(path)
    assert report.issues == {"duplicate_uuid": 1}
    assert examples[0].messages[-1].content == "All 3 tests pass."


def test_dangling_parent_falls_back_to_file_order(tmp_path):
    log = basic_session()
    log.entries[2]["parentUuid"] = "not-in-this-file"
    path = log.write(tmp_path / "dangling.jsonl")
    examples, report = ingest(path)
    assert report.issues == {"dangling_parent": 1}
    assert len(examples) == 1  # the result still follows its call: one conversation, not two
    assert [m.role for m in examples[0].messages] == ["user", "assistant", "tool", "assistant"]
    assert_strict_names(path, 3, "dangling_parent")


def test_parent_cycle_is_cut(tmp_path):
    log = basic_session()
    log.entries[0]["parentUuid"] = "a2"  # u1 -> a2 -> r1 -> a1 -> u1
    path = log.write(tmp_path / "cycle.jsonl")
    examples, report = ingest(path)
    assert report.issues == {"parent_cycle": 1}
    assert [m.role for m in examples[0].messages] == ["user", "assistant", "tool", "assistant"]


def test_missing_tool_result_gets_a_synthetic_one(tmp_path):
    log = ClaudeLog()
    log.user("u1", "Run the tests")
    log.assistant("a1", "Running them.", tool_uses=(("toolu_1", "Bash", {"command": "pytest"}),))
    log.user("u2", "Actually, stop.")
    log.assistant("a2", "Stopped.")
    path = log.write(tmp_path / "missing.jsonl")
    examples, report = ingest(path)
    assert report.issues == {"missing_tool_result": 1}
    synthetic = examples[0].messages[2]
    assert (synthetic.role, synthetic.tool_call_id, synthetic.synthetic) == ("tool", "toolu_1", True)
    assert [m.role for m in examples[0].messages] == ["user", "assistant", "tool", "user", "assistant"]
    assert_strict_names(path, 3, "missing_tool_result")


def test_tool_call_left_open_at_the_end_is_not_an_issue(tmp_path):
    log = ClaudeLog()
    log.user("u1", "Run the tests")
    log.assistant("a1", None, tool_uses=(("toolu_1", "Bash", {"command": "pytest"}),))
    examples, report = ingest(log.write(tmp_path / "open.jsonl"), strict=True)
    assert report.issues == {} and [m.role for m in examples[0].messages] == ["user", "assistant"]


def test_unknown_entry_type_keeps_the_chain(tmp_path):
    log = basic_session()
    mystery = {
        "type": "hologram",
        "uuid": "h1",
        "parentUuid": "a1",
        "sessionId": "sess-1",
        "timestamp": "2025-11-19T10:00:02.500Z",
    }
    log.entries.insert(2, mystery)
    log.entries[3]["parentUuid"] = "h1"  # the tool result hangs off the unknown entry
    path = log.write(tmp_path / "unknown.jsonl")
    examples, report = ingest(path)
    assert report.issues == {"unknown_entry_type": 1}
    assert len(examples) == 1 and len(examples[0].messages) == 4
    assert_strict_names(path, 3, "unknown_entry_type")


def test_known_structural_entries_are_silent(tmp_path):
    log = basic_session()
    log.entries.insert(2, {"type": "progress", "uuid": "p1", "parentUuid": "a1", "sessionId": "sess-1"})
    log.entries[3]["parentUuid"] = "p1"
    log.raw({"type": "system", "subtype": "turn_duration", "uuid": "t1", "parentUuid": "a1", "sessionId": "sess-1"})
    log.raw({"type": "file-history-snapshot", "messageId": "m", "snapshot": {}})
    log.raw({"type": "summary", "summary": "Running the test suite", "leafUuid": "a2"})
    examples, report = ingest(log.write(tmp_path / "structural.jsonl"), strict=True)
    # The system entry is a second child of a1 but carries no conversation: no extra branch.
    assert report.issues == {} and len(examples) == 1 and len(examples[0].messages) == 4
    assert examples[0].metadata["title"] == "Running the test suite"


def test_format_detection_looks_past_bookkeeping_lines(tmp_path):
    log = basic_session()
    snapshot = {"type": "file-history-snapshot", "messageId": "m0", "snapshot": {}, "isSnapshotUpdate": False}
    path = log.write(tmp_path / "s.jsonl", [json.dumps(snapshot).encode(), *log.lines()])
    assert detect_format(path) == "claude_code"
    one_line = write_json(tmp_path / "run.json", {"messages": [{"role": "user", "content": "hi"}]})
    one_line.write_text(json.dumps(json.loads(one_line.read_text())))  # a single-line JSON document
    assert detect_format(one_line) == "openai"
    assert [e.messages[0].content for e in TraceIngester(strict=True).ingest(one_line)] == ["hi"]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    examples, report = ingest(path)
    assert examples == [] and report.issues == {"empty_file": 1} and report.files == 1
    assert_strict_names(path, 1, "empty_file")


def test_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "weird.jsonl", [{"hello": "world"}])
    examples, report = ingest(path)
    assert examples == [] and report.issues == {"unknown_format": 1}
    with pytest.raises(TraceFormatError, match="weird.jsonl: unknown_format"):
        ingest(path, strict=True)


def test_invalid_and_odd_openai_records(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "ls", "arguments": "{not json"}}
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
                    {"role": "narrator", "content": "meanwhile"},
                ]
            },
            {"no_messages": True},
        ],
    )
    examples, report = ingest(path)
    assert report.issues == {"invalid_tool_arguments": 1, "unknown_role": 1, "invalid_record": 1}
    (example,) = examples
    assert example.messages[1].tool_calls[0].arguments == {"_raw": "{not json"}
    assert_strict_names(path, 1, "invalid_tool_arguments")


def test_truncated_json_document(tmp_path):
    path = tmp_path / "run.traj"
    path.write_text(json.dumps({"history": [{"role": "user", "content": "x"}]})[:-5])
    examples, report = ingest(path)
    assert examples == [] and report.issues == {"truncated_line": 1}
    assert_strict_names(path, 1, "truncated_line")


def test_unknown_openhands_event(tmp_path):
    path = write_json(
        tmp_path / "oh.json",
        [
            {"id": 0, "source": "user", "action": "message", "args": {"content": "hello"}},
            {"id": 1, "source": "environment", "action": "teleport", "args": {}},
            {"id": 2, "source": "agent", "action": "message", "args": {"content": "hi"}},
        ],
    )
    examples, report = ingest(path)
    assert report.issues == {"unknown_event_type": 1}
    assert [m.content for m in examples[0].messages] == ["hello", "hi"]
    with pytest.raises(TraceFormatError, match=r"oh\.json \[\[1\]\]: unknown_event_type"):
        ingest(path, strict=True)


def test_directory_of_mixed_formats(tmp_path):
    folder = tmp_path / "logs"
    basic_session("claude-a").write(folder / "project" / "claude-a.jsonl")
    write_jsonl(
        folder / "chats.jsonl",
        [
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]},
        ],
    )
    write_json(
        folder / "openhands.json",
        [
            {"id": 0, "source": "user", "action": "message", "args": {"content": "hello"}},
            {
                "id": 1,
                "source": "agent",
                "action": "run",
                "args": {"command": "ls", "thought": "Look first."},
                "tool_call_metadata": {"function_name": "execute_bash", "tool_call_id": "t1"},
            },
            {
                "id": 2,
                "source": "agent",
                "observation": "run",
                "cause": 1,
                "content": "boom",
                "extras": {"metadata": {"exit_code": 2}},
                "tool_call_metadata": {"tool_call_id": "t1"},
            },
        ],
    )
    write_json(
        folder / "nested" / "task.traj",
        {
            "history": [
                {"role": "system", "content": "You fix bugs."},
                {"role": "user", "content": "Fix it"},
                {"role": "assistant", "content": "Done"},
            ],
            "info": {"exit_status": "submitted", "submission": "diff"},
            "trajectory": [{"state": "not json"}],
        },
    )
    (folder / "README.txt").write_text("not a trace")
    (folder / "empty.json").write_text("")
    (folder / ".hidden.jsonl").write_text("ignored")
    examples, report = ingest(folder)
    assert {f: (r.files, r.examples, r.messages, r.tool_calls) for f, r in report.by_format.items()} == {
        "claude_code": (1, 1, 4, 1),
        "openai": (1, 2, 4, 0),
        "openhands": (1, 1, 3, 1),
        "swe_agent": (1, 1, 3, 0),
    }
    assert report.files == 5 and report.issues == {"empty_file": 1, "invalid_state": 1}
    openhands = next(e for e in examples if e.format == "openhands")
    assert openhands.messages[1].content == "Look first."
    assert openhands.messages[2].is_error  # exit code 2
    assert [detect_format(folder / n) for n in ("chats.jsonl", "openhands.json", "project/claude-a.jsonl")] == [
        "openai",
        "openhands",
        "claude_code",
    ]
