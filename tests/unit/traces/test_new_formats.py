"""Codex CLI rollouts, Cline/Roo task folders and Aider chat history: placeholder samples written
from each tool's public schema (tests/fixtures/traces), ingested with exact counts; `--strict`
passes on them and fails on broken copies, naming the file and the line."""

from __future__ import annotations

import shutil

import pytest

from tests.support.paths import FIXTURES
from tests.support.traces_fixtures import TRACES_DIR, forked_session, openai_attempt, write_jsonl
from trainer.traces import INTERRUPTION, REFUSAL, TraceFormatError, TraceIngester, detect_format, mine_pairs
from trainer.traces.schema import USER_EDIT

SAMPLES = FIXTURES / "traces"
CODEX = SAMPLES / "codex" / "sessions" / "2025" / "01" / "01"
CODEX_FILE = CODEX / "rollout-2025-01-01T00-00-00-00000000-0000-0000-0000-000000000001.jsonl"
CLINE_TASK = SAMPLES / "cline" / "tasks" / "1735689600000"
AIDER_FILE = SAMPLES / "aider" / ".aider.chat.history.md"
CASES = TRACES_DIR.parent / "cases" / "traces"


def ingest(path, *, strict=True):
    ingester = TraceIngester(strict=strict)
    return list(ingester.ingest(path)), ingester.report


def test_formats_are_detected_by_name_and_contents():
    assert [detect_format(p) for p in (CODEX_FILE, CLINE_TASK / "api_conversation_history.json", AIDER_FILE)] == [
        "codex",
        "cline",
        "aider",
    ]


def test_codex_rollout():
    (example,), report = ingest(SAMPLES / "codex")
    # 18 lines: session_meta, turn_context, 4 event_msg (user_message, token_count, agent_message:
    # UI echoes, skipped by design; turn_aborted: an interruption) and 12 response_items: 5 messages
    # (the environment context, 3 user turns, 2 answers -> 6 with the last), a reasoning summary,
    # 2 shell calls with outputs, an apply_patch call cut off by the abort.
    assert (report.files, report.lines, report.examples, report.messages, report.tool_calls) == (1, 18, 1, 13, 3)
    assert report.issues == {} and report.normalized == {"aborted_tool_call": 1}
    assert example.session_id == "00000000-0000-0000-0000-000000000001"
    assert (example.metadata["model"], example.metadata["cli_version"]) == ("gpt-5-codex", "0.50.0")
    messages = example.messages
    first_call = messages[2]
    assert first_call.reasoning == "**Running the test suite**"
    assert first_call.tool_calls[0].arguments == {
        "command": ["bash", "-lc", "pytest -q"],
        "workdir": "/home/user/project",
    }
    assert [(m.content, m.is_error) for m in messages if m.role == "tool"] == [
        ("1 failed, 2 passed", True),  # exit_code 1
        ("1 passed", False),
        ("[aborted: the user stopped the turn before this call ran]", True),
    ]
    assert messages[8].tool_calls[0].arguments == {
        "input": "*** Begin Patch\n*** Delete File: tests/test_b.py\n*** End Patch"
    }
    assert [m.kind for m in messages].count(INTERRUPTION) == 1 and messages[10].kind == INTERRUPTION
    miner = mine_pairs([example])
    (pair,) = list(miner)  # the failing run, then the narrower run that passes
    assert pair.source == "self_correction" and pair.chosen[0].tool_calls[0].arguments["command"][-1].endswith(
        "x tests/test_a.py"
    )
    assert miner.rewards[example.id].signals == {"interruptions": 1, "errors_fixed": 1}


def test_cline_task_folder():
    (example,), report = ingest(SAMPLES / "cline")
    # 8 API messages: the task (2 text blocks: one message), 4 assistant turns (3 XML tools in text,
    # 1 native tool_use), user results as text, and one tool_result + environment details.
    assert (report.files, report.examples, report.messages, report.tool_calls, report.issues) == (1, 1, 9, 1, {})
    assert example.metadata["ui"] == {"user_feedback": 1, "user_feedback_diff": 1}
    assert (example.metadata["model"], example.metadata["ui_messages"]) == ("claude-sonnet-4-5", 8)
    kinds = [(m.role, m.kind) for m in example.messages]
    assert kinds[4] == ("user", USER_EDIT) and kinds[6] == ("tool", REFUSAL)
    assert example.messages[5].tool_calls[0].arguments == {"command": "rm -rf build", "requires_approval": True}
    miner = mine_pairs([example])
    list(miner)
    assert miner.rewards[example.id].signals == {"user_edits": 1, "refusals": 1}


def test_aider_chat_history():
    examples, report = ingest(SAMPLES / "aider")
    # Two runs. Run 1: 2 user turns, 2 replies, the second stopped by ^C (an interruption);
    # 8 "> " notices (4 header lines, tokens, applied edit, commit, ^C). Run 2: 1 turn, 1 reply, 2 notices.
    assert (report.files, report.lines, report.examples, report.messages, report.issues) == (1, 42, 2, 7, {})
    first, second = examples
    assert [(m.role, m.kind) for m in first.messages] == [
        ("user", "message"),
        ("assistant", "message"),
        ("user", "message"),
        ("assistant", "message"),
        ("user", INTERRUPTION),
    ]
    assert first.messages[0].content == "add a docstring to greet in hello.py"
    assert first.messages[1].content.startswith("I'll add a docstring.\n\nhello.py\n```python\n<<<<<<< SEARCH")
    assert first.messages[1].content.endswith(">>>>>>> REPLACE\n```")
    assert (first.metadata["notices"], second.metadata["notices"]) == (8, 2)
    assert [m.content for m in second.messages] == [
        "what does greet return?",
        "It returns the string `Hello, <name>!`.",
    ]


@pytest.mark.parametrize(
    "name, break_it, where",
    [
        (
            "codex",
            lambda p: p.write_bytes(p.read_bytes().replace(b'"call_id": "call_002"}', b'"call_id": ', 1)),
            ":9: invalid_json",
        ),
        (
            "cline",
            lambda p: p.write_text(p.read_text().replace('"ts": 1735689603000', '"ts": 17356,,')),
            ":48: invalid_json",
        ),
        (
            "aider",
            lambda p: p.write_bytes(p.read_bytes().replace(b"what does", b"what \xff does")),
            ":40: invalid_utf8",
        ),
    ],
)
def test_strict_fails_on_a_broken_copy_naming_file_and_line(tmp_path, name, break_it, where):
    shutil.copytree(SAMPLES / name, tmp_path / name)
    target = next(
        p
        for p in sorted((tmp_path / name).rglob("*"))
        if p.is_file() and p.name != "ui_messages.json" and p.name != "task_metadata.json"
    )
    break_it(target)
    with pytest.raises(TraceFormatError) as error:
        ingest(tmp_path / name)
    assert str(error.value).startswith(f"{target}{where}")
    examples, report = ingest(tmp_path / name, strict=False)
    assert sum(report.issues.values()) >= 1


def test_strict_passes_on_valid_files_of_every_format(tmp_path):
    forked_session(tmp_path / "claude", refuse=True)
    write_jsonl(tmp_path / "openai" / "runs.jsonl", [openai_attempt("A", "patch", True)])
    shutil.copytree(SAMPLES, tmp_path / "samples")
    roots = [tmp_path]
    if TRACES_DIR.is_dir():  # real logs; the sidechain excerpt is cut (dangling parents), so not valid
        roots += [p for p in sorted(TRACES_DIR.iterdir()) if p.suffix != ".txt" and "sidechain" not in p.name]
    if CASES.is_dir():
        roots += [CASES / "07-swe-agent-retry-attempts", CASES / "08-openhands-wrapped-event-lists"]
        roots += [CASES / "10-codex-legacy-rollout", CASES / "12-aider-slash-commands"]
    ingester = TraceIngester(strict=True)
    for root in roots:
        list(ingester.ingest(root))
    expected = {"claude_code", "openai", "codex", "cline", "aider"}
    if TRACES_DIR.is_dir():
        expected |= {"openhands", "swe_agent"}
    assert expected <= set(ingester.report.by_format) and ingester.report.issues == {}
