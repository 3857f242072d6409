"""The six real agent logs in ../shared/data/traces, ingested leniently and strictly.

Every expected number below was counted by reading the file; the comments say how.
"""

from __future__ import annotations

import pytest

from tests.support.traces_fixtures import TRACES_DIR, requires_samples
from trainer.traces import COMPACT_SUMMARY, TraceFormatError, TraceIngester, detect_format

pytestmark = requires_samples

SIDECHAIN = TRACES_DIR / "claude_code__sidechain_integrated.jsonl"
DAG = TRACES_DIR / "claude_code__dag_compact_after_rewind.jsonl"
OPENHANDS_RENAME = TRACES_DIR / "openhands__wrong_initial_state.json"
OPENHANDS_BASIC = TRACES_DIR / "openhands__basic.json"
SWE_PYDICOM = TRACES_DIR / "swe_agent__pydicom__pydicom-1458.traj"
SWE_MARSHMALLOW = TRACES_DIR / "swe_agent__marshmallow-1867__function_calling.traj"

SIDECHAIN_SESSION = "88a8d761-7b9a-4bf1-a8ca-c1febe6bf358"


def ingest(path, *, strict=False):
    ingester = TraceIngester(strict=strict)
    return list(ingester.ingest(path)), ingester.report


def roles(example):
    return [m.role for m in example.messages]


def tool_calls(example):
    return sum(len(m.tool_calls) for m in example.messages)


def test_formats_are_detected_from_the_first_bytes():
    assert [
        detect_format(p) for p in (SIDECHAIN, DAG, OPENHANDS_RENAME, OPENHANDS_BASIC, SWE_PYDICOM, SWE_MARSHMALLOW)
    ] == ["claude_code"] * 2 + ["openhands"] * 2 + ["swe_agent"] * 2


def test_sidechain_session_lenient():
    examples, report = ingest(SIDECHAIN)
    # 6 lines. Main thread: line 1 (assistant, Task call) -> line 2 (its tool_result) -> line 6
    # (assistant text): one branch, 3 messages, 1 tool call. Line 1's parent 8ae40e91 is not in
    # the file (dangling #1). Sidechain: lines 3 and 4 are one API message (msg_017zj75dq...) split
    # into a text line and a Grep tool_use line -> merged into one assistant message. Line 5's
    # parent 718670f5 is not in the file (dangling #2); it falls back to line 4 (the previous
    # sidechain entry) and answers toolu_011V1..., a call cut from this excerpt -> orphan, dropped.
    # The thread starts with an assistant line, so the Task call's prompt is put in front of it.
    assert (report.files, report.lines, report.examples, report.messages, report.tool_calls) == (1, 6, 2, 5, 2)
    assert report.issues == {"dangling_parent": 2, "orphan_tool_result": 1, "missing_sidechain_prompt": 1}
    assert report.normalized == {"split_message_merged": 1}
    main, side = examples
    assert main.id == f"claude_code:{SIDECHAIN_SESSION}:91c82c1c-29b0-4149-a261-e5582d944ac6"
    assert roles(main) == ["assistant", "tool", "assistant"]
    task = main.messages[0].tool_calls[0]
    assert (task.id, task.name, task.arguments["subagent_type"]) == (
        "toolu_01JA2mLseQCAW3MdwPE4qWEk",
        "Task",
        "general-purpose",
    )
    assert main.messages[1].tool_call_id == task.id
    assert main.messages[1].content == "Perfect! Now I have a complete understanding. Let ..."
    assert main.parent_id is None and main.metadata["is_sidechain"] is False
    assert main.metadata["model"] == "claude-sonnet-4-5-20250929"
    assert main.metadata["cwd"] == "e:\\Workspace\\src\\github\\claude-code-log"
    assert main.metadata["version"] == "2.0.46"
    # The sidechain hangs off the main example's Task call (agentId e1c84ba5 on line 2 and line 5).
    assert side.parent_id == main.id
    assert side.metadata["parent_tool_call_id"] == task.id
    assert side.metadata["agent_id"] == "e1c84ba5"
    assert roles(side) == ["user", "assistant"]
    assert side.messages[0].synthetic and side.messages[0].content == task.arguments["prompt"]
    merged = side.messages[1]
    assert merged.content == "I'll research how `data-border-color` is used thro..."
    assert [(c.id, c.name, c.arguments) for c in merged.tool_calls] == [
        (
            "toolu_01BWgwmyj8gGuqFNHMPqqtN2",
            "Grep",
            {"pattern": "data-border-color", "output_mode": "files_with_matches"},
        )
    ]


def test_sidechain_session_strict_names_the_first_dangling_parent():
    with pytest.raises(TraceFormatError) as error:
        ingest(SIDECHAIN, strict=True)
    assert f"{SIDECHAIN}:1: dangling_parent" in str(error.value)
    assert (error.value.line, error.value.reason) == (1, "dangling_parent")


@pytest.mark.parametrize("strict", [False, True])
def test_rewind_fork_and_compaction(strict):
    examples, report = ingest(DAG, strict=strict)
    # u1 -> a1 forks into b1u -> b1a (first attempt) and b2u -> b2a -> b2u2 -> b2a2 (second):
    # two leaves sharing [Start, Ready]. Line 9 is a compact_boundary (parentUuid null,
    # logicalParentUuid b2a2) starting a new root: cs (the summary) -> p1u -> p1a. 12 lines, no
    # tool calls, nothing to repair.
    assert (report.files, report.lines, report.examples, report.messages, report.tool_calls) == (1, 12, 3, 13, 0)
    assert report.issues == {}
    first, second, compacted = examples
    assert [m.content for m in first.messages] == ["Start", "Ready", "First attempt", "First answer"]
    assert [m.content for m in second.messages] == [
        "Start",
        "Ready",
        "Second attempt",
        "Second answer",
        "Keep going",
        "Kept going",
    ]
    assert first.messages[:2] == second.messages[:2]
    assert [m.kind for m in compacted.messages] == [COMPACT_SUMMARY, "message", "message"]
    assert compacted.messages[0].content.startswith("This session is being continued")
    assert compacted.metadata["compaction"] == {
        "logical_parent": "b2a2",
        "trigger": "auto",
        "preTokens": 150000,
        "continues": "claude_code:s1:b2a2",
    }
    assert {e.session_id for e in examples} == {"s1"}


@pytest.mark.parametrize("strict", [False, True])
def test_openhands_rename(strict):
    examples, report = ingest(OPENHANDS_RENAME, strict=strict)
    # 8 events (ids 0, 3-9): user message; read/run/read actions, each answered by an
    # observation (cause 3, 5, 7); finish. 8 messages, 4 tool calls (the last, finish, has no
    # observation: the episode ends there). The pretty-printed JSON has 454 lines.
    assert (report.files, report.lines, report.examples, report.messages, report.tool_calls) == (1, 454, 1, 8, 4)
    assert report.issues == {}
    (example,) = examples
    assert roles(example) == ["user", "assistant", "tool", "assistant", "tool", "assistant", "tool", "assistant"]
    names = [c.name for m in example.messages for c in m.tool_calls]
    assert names == ["str_replace_editor", "execute_bash", "str_replace_editor", "finish"]
    run = example.messages[3].tool_calls[0]
    # Arguments as the model wrote them in model_response (with its string "false"), not `args`.
    assert run.id == "toolu_01PuY3mXrE6fm3j52GscR4rj"
    assert run.arguments == {"command": "mv /workspace/game_2048.py /workspace/2048.py", "is_input": "false"}
    assert example.messages[4].tool_call_id == run.id and not example.messages[4].is_error  # exit code 0
    assert example.messages[1].content.startswith("I'll help you rename the file.")
    assert example.metadata["model"] == "claude-3-5-sonnet-20241022"
    assert example.outcome is None


@pytest.mark.parametrize("strict", [False, True])
def test_openhands_basic(strict):
    examples, report = ingest(OPENHANDS_BASIC, strict=strict)
    # user message -> edit action (create game_2048.py) -> its observation (a diff) -> finish.
    # 4 messages, 2 tool calls, 202 lines.
    assert (report.files, report.lines, report.examples, report.messages, report.tool_calls) == (1, 202, 1, 4, 2)
    assert report.issues == {}
    (example,) = examples
    create = example.messages[1].tool_calls[0]
    assert create.arguments["command"] == "create" and create.arguments["path"] == "/workspace/game_2048.py"
    assert create.arguments["file_text"].startswith("import random\nimport keyboard\n")
    assert example.messages[2].content.startswith("--- /workspace/game_2048.py\n+++ /workspace/game_2048.py")


@pytest.mark.parametrize("strict", [False, True])
def test_swe_agent_old_format(strict):
    examples, report = ingest(SWE_PYDICOM, strict=strict)
    # 0.x: history of 26 messages (1 system, 13 user: the demonstration, the issue and 11
    # observations, 12 assistant), no tool calls; state is a JSON string; 256 newlines + 1.
    assert (report.files, report.lines, report.examples, report.messages, report.tool_calls) == (1, 257, 1, 26, 0)
    assert report.issues == {}
    (example,) = examples
    assert roles(example).count("user") == 13 and roles(example).count("assistant") == 12
    assert example.messages[1].content.startswith("Here is a demonstration")
    assert example.outcome["exit_status"] == "submitted"
    assert example.outcome["submission"].startswith("\ndiff --git a/pydicom/pixel_data_handlers/numpy_handler.py")
    assert example.outcome["instance_id"] == "swe_agent__pydicom__pydicom-1458"  # 0.x names it only by file
    assert "resolved" not in example.outcome  # nothing in the file says whether the patch works
    assert example.metadata["cwd"] == "/pydicom__pydicom"


@pytest.mark.parametrize("strict", [False, True])
def test_swe_agent_function_calling(strict):
    examples, report = ingest(SWE_MARSHMALLOW, strict=strict)
    # 1.x: 24 messages (system, the issue, then 11 assistant actions each with one tool call and
    # 11 role "tool" observations); state is a dict; 591 newlines + 1.
    assert (report.files, report.lines, report.examples, report.messages, report.tool_calls) == (1, 592, 1, 24, 11)
    assert report.issues == {}
    (example,) = examples
    assert roles(example)[:4] == ["system", "user", "assistant", "tool"]
    first_call = example.messages[2].tool_calls[0]
    assert (first_call.name, first_call.arguments) == ("create", {"filename": "reproduce.py"})
    open_call = example.messages[12].tool_calls[0]
    assert open_call.arguments == {"path": "src/marshmallow/fields.py", "line_number": 1474}
    # The replayed demonstration reuses call ids (call_5iDd... answers four separate calls); each
    # result still follows its own call.
    assert all(
        example.messages[i + 1].tool_call_id == m.tool_calls[0].id
        for i, m in enumerate(example.messages)
        if m.tool_calls
    )
    assert example.outcome["instance_id"] == "marshmallow-code__marshmallow-1867"
    assert example.outcome["exit_status"] == "submitted"
    assert example.metadata["model"] == "gpt-4o" and example.metadata["cwd"] == "/testbed"


def test_whole_directory_lenient_sums_the_files():
    examples, report = ingest(TRACES_DIR)
    # SOURCES.txt is not a trace file and is not read. Claude Code 2 + 3 examples, OpenHands 1 + 1,
    # SWE-agent 1 + 1.
    assert (report.files, report.examples, report.messages, report.tool_calls) == (6, 9, 80, 19)
    assert {f: (r.files, r.examples) for f, r in report.by_format.items()} == {
        "claude_code": (2, 5),
        "openhands": (2, 2),
        "swe_agent": (2, 2),
    }
    assert len({e.id for e in examples}) == 9
    assert sum(1 for e in examples if e.parent_id) == 1  # one sidechain
