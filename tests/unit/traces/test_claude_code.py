"""Claude Code tree rebuilding on synthetic sessions: forks, parallel calls, subagents, several sessions."""

from __future__ import annotations

from tests.support.traces_fixtures import ClaudeLog, basic_session
from trainer.traces import INTERRUPTION, REFUSAL, TraceIngester


def ingest(path, *, strict=False):
    ingester = TraceIngester(strict=strict)
    return list(ingester.ingest(path)), ingester.report


def test_parallel_tool_calls_split_over_lines_are_one_turn(tmp_path):
    # One API message with two tool_use blocks is logged as two lines sharing message.id; each
    # result hangs off the line of its own call, which looks like a fork but is not one.
    log = ClaudeLog()
    log.user("u1", "Read both files")
    log.assistant("a1", "Reading.", tool_uses=(("t1", "Read", {"path": "a.py"}),), message_id="msg_1")
    log.assistant("a1b", None, tool_uses=(("t2", "Read", {"path": "b.py"}),), message_id="msg_1")
    log.tool_result("r1", "t1", "print('a')", parent="a1")
    log.tool_result("r2", "t2", "print('b')", parent="a1b")
    log.assistant("a2", "Both print a letter.", parent="r2")
    examples, report = ingest(log.write(tmp_path / "parallel.jsonl"), strict=True)
    assert report.normalized == {"split_message_merged": 1}
    (example,) = examples
    assert [m.role for m in example.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c.id for c in example.messages[1].tool_calls] == ["t1", "t2"]
    assert [m.tool_call_id for m in example.messages[2:4]] == ["t1", "t2"]


def test_duplicate_of_a_merged_split_line_is_a_duplicate_line(tmp_path):
    log = ClaudeLog()
    log.user("u1", "Read it")
    log.assistant("a1", "Reading.", message_id="msg_1")
    log.assistant("a1b", None, tool_uses=(("t1", "Read", {"path": "a.py"}),), message_id="msg_1")
    lines = log.lines()
    path = log.write(tmp_path / "dup-split.jsonl", [*lines, lines[2]])
    examples, report = ingest(path)
    assert report.issues == {"duplicate_line": 1} and report.normalized == {"split_message_merged": 1}
    assert [c.id for c in examples[0].messages[1].tool_calls] == ["t1"]


def test_rewind_gives_one_example_per_leaf_sharing_the_prefix(tmp_path):
    log = ClaudeLog()
    log.user("u1", "Rename foo to bar")
    log.assistant("a1", "Renaming.", tool_uses=(("t1", "Edit", {"old": "foo", "new": "bar"}),))
    log.tool_result(
        "r1", "t1", "The user doesn't want to proceed with this tool use. The tool use was rejected.", is_error=True
    )
    log.user("i1", "[Request interrupted by user for tool use]")
    log.user("u1b", "Rename foo to bar", parent=None)  # rewound to the start and asked again
    log.assistant("a1b", "Renamed with sed.")
    examples, report = ingest(log.write(tmp_path / "rewind.jsonl"), strict=True)
    assert report.issues == {}
    # u1 and u1b are two roots: the rewind went all the way back, so each is its own tree.
    assert [len(e.messages) for e in examples] == [4, 2]
    refused, retried = examples
    assert refused.messages[2].kind == REFUSAL and refused.messages[2].is_error
    assert refused.messages[3].kind == INTERRUPTION
    assert retried.messages[1].content == "Renamed with sed."


def test_interleaved_sidechains_link_by_agent_id_prompt_and_time(tmp_path):
    log = ClaudeLog()
    log.user("u1", "Investigate twice")
    log.assistant(
        "a1",
        None,
        tool_uses=(
            ("task1", "Task", {"prompt": "Look at the parser", "description": "p"}),
            ("task2", "Task", {"prompt": "Look at the lexer", "description": "l"}),
        ),
        message_id="msg_spawn",
    )
    # Thread 1: carries agentId, and its result names that agent.
    log.user("s1u", "Look at the parser", parent=None, isSidechain=True, agentId="agent-p")
    log.assistant("s1a", "The parser is fine.", isSidechain=True, agentId="agent-p")
    # Thread 2: no agentId anywhere; linked by its prompt.
    log.user("s2u", "Look at the lexer", parent=None, isSidechain=True)
    log.assistant("s2a", "The lexer drops tabs.", isSidechain=True)
    log.tool_result("r1", "task1", "The parser is fine.", parent="a1", toolUseResult={"agentId": "agent-p"})
    log.tool_result("r2", "task2", "The lexer drops tabs.", parent="a1")
    log.assistant("a2", "One bug: tabs.", parent="r2")
    examples, report = ingest(log.write(tmp_path / "threads.jsonl"), strict=True)
    assert report.issues == {}
    main, parser, lexer = examples
    assert [m.role for m in main.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert (parser.parent_id, parser.metadata["parent_tool_call_id"], parser.metadata["agent_id"]) == (
        main.id,
        "task1",
        "agent-p",
    )
    assert (lexer.parent_id, lexer.metadata["parent_tool_call_id"]) == (main.id, "task2")
    assert [m.content for m in lexer.messages] == ["Look at the lexer", "The lexer drops tabs."]


def test_subagent_files_are_read_with_their_session(tmp_path):
    session = basic_session("sess-9")
    session.entries[1]["message"]["content"].append(
        {"type": "tool_use", "id": "task1", "name": "Task", "input": {"prompt": "Check CI"}}
    )
    session.tool_result("rt", "task1", "CI is green.", parent="r1", toolUseResult={"agentId": "abc123"})
    session.entries[3]["parentUuid"] = "rt"
    main_path = session.write(tmp_path / "proj" / "sess-9.jsonl")
    agent = ClaudeLog("sess-9")
    agent.user("x1", "Check CI", parent=None, isSidechain=True, agentId="abc123")
    agent.assistant("x2", "CI is green.", isSidechain=True, agentId="abc123")
    agent.write(tmp_path / "proj" / "sess-9" / "subagents" / "agent-abc123.jsonl")
    for path in (tmp_path / "proj", main_path):  # the directory, or the session file alone
        examples, report = ingest(path, strict=True)
        assert report.files == 2 and report.by_format["claude_code"].examples == 2
        main, sub = examples
        assert sub.parent_id == main.id and sub.metadata["parent_tool_call_id"] == "task1"
        assert [m.content for m in sub.messages] == ["Check CI", "CI is green."]


def test_unlinkable_sidechain_is_counted(tmp_path):
    log = ClaudeLog()
    log.user("u1", "Hello")
    log.user("s1", "Orphan thread", parent=None, isSidechain=True)
    log.assistant("s2", "Nobody spawned me.", isSidechain=True)
    examples, report = ingest(log.write(tmp_path / "orphan-thread.jsonl"))
    assert report.issues == {"unlinked_sidechain": 1}
    assert examples[1].parent_id is None and examples[1].metadata["is_sidechain"]


def test_sessions_in_one_file_are_emitted_one_by_one(tmp_path):
    first, second = basic_session("s-a"), basic_session("s-b")
    lines = first.lines() + second.lines() + first.lines()[:1]  # s-a comes back at the end
    path = first.write(tmp_path / "two.jsonl", lines)
    ingester = TraceIngester()
    stream = ingester.ingest(path)
    example_a = next(stream)
    # s-a is complete as soon as s-b starts: it comes out before s-b has been read.
    assert example_a.session_id == "s-a" and ingester.report.lines == 5
    rest = list(stream)
    assert [e.session_id for e in rest] == ["s-b", "s-a"]
    assert ingester.report.issues == {"session_interleaved": 1}
    assert [m.content for m in rest[1].messages] == ["Run the tests"]
