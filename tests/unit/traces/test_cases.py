"""The real-world cases in ../shared/data/cases/traces: one test per case, each its README's right result.

Each case stands for a kind of input (a layout, a format quirk, a masking rule); the tests read
the case files in place and skip when they are absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.paths import SHARED
from trainer.traces import REFUSAL, TraceIngester, mine_pairs, render_pair
from trainer.traces.__main__ import main

CASES = SHARED / "data" / "cases" / "traces"


def case(name: str) -> Path:
    path = CASES / name
    if not path.exists():
        pytest.skip(f"trace case {name} is not at {path}")
    return path


def ingest(path, *, strict=False):
    ingester = TraceIngester(strict=strict)
    return list(ingester.ingest(path)), ingester.report


def test_01_subagent_meta_sidecar_is_read_not_an_unknown_format(capsys):
    project = case("01-cc-subagent-meta-sidecar/project")
    for strict in (False, True):
        (main_example, subagent), report = ingest(project, strict=strict)
        assert (report.files, report.examples, report.issues) == (2, 2, {})
        assert report.normalized == {"sidecar_metadata": 1}
    assert main_example.id == "claude_code:sess-a:a-a2"
    assert subagent.parent_id == "claude_code:sess-a:a-a2"
    assert subagent.metadata["parent_tool_call_id"] == "toolu_t1"
    assert (subagent.metadata["agent_type"], subagent.metadata["description"]) == ("general-purpose", "Search")
    assert [m.content for m in subagent.messages if m.role == "user"] == ["Locate the config loader"]
    assert main(["ingest", str(project), "--strict"]) == 0
    assert "unknown_format" not in capsys.readouterr().out


def test_01_subagents_nested_at_any_depth_are_linked_to_their_spawning_call(tmp_path):
    """The same session with its subagent one folder deeper, and the sidecar naming the call."""
    source = case("01-cc-subagent-meta-sidecar/project")
    deep = tmp_path / "sess-a" / "subagents" / "agent-a1b2c3" / "nested"
    deep.mkdir(parents=True)
    (tmp_path / "sess-a.jsonl").write_bytes((source / "sess-a.jsonl").read_bytes())
    for name in ("agent-a1b2c3.jsonl", "agent-a1b2c3.meta.json"):
        (deep / name).write_bytes((source / "sess-a" / "subagents" / name).read_bytes())
    (_, subagent), report = ingest(tmp_path, strict=True)
    assert (report.files, report.examples) == (2, 2)
    assert subagent.parent_id == "claude_code:sess-a:a-a2" and subagent.metadata["spawn_depth"] == 1


def test_03_resumed_session_is_ingested_once_and_its_copies_counted(tmp_path):
    project = case("03-cc-resume-copies-history/project")
    for strict in (False, True):
        (example,), report = ingest(project, strict=strict)
        assert (report.files, report.examples, report.messages, report.tool_calls) == (2, 1, 8, 2)
        assert report.issues == {} and report.normalized == {"resumed_copy": 4}
    assert example.session_id == "sess-new" and len(example.messages) == 8
    miner = mine_pairs(TraceIngester().ingest(project))
    assert list(miner) == []
    assert {k: r.signals for k, r in miner.rewards.items()} == {example.id: {"refusals": 1}}


def test_04_tool_reference_block_is_read_as_text():
    path = case("04-cc-tool-reference-block/sess-d.jsonl")
    for strict in (False, True):
        (example,), report = ingest(path, strict=strict)
        assert report.issues == {} and report.normalized == {"tool_reference": 1}
    search_result = example.messages[2]
    assert (search_result.role, search_result.content) == ("tool", "Tool available: TaskStop")


def test_04_unknown_block_kinds_stay_visible_and_are_counted(tmp_path):
    text = case("04-cc-tool-reference-block/sess-d.jsonl").read_text()
    path = tmp_path / "sess-d.jsonl"
    path.write_text(text.replace('"tool_reference", "tool_name": "TaskStop"', '"hologram", "tool_name": "TaskStop"'))
    (example,), report = ingest(path)
    assert report.issues == {"unknown_content_block": 1}
    assert example.messages[2].content == "[hologram block]"
    with pytest.raises(ValueError, match=r"sess-d.jsonl:3: unknown_content_block: tool_result block 'hologram'"):
        ingest(path, strict=True)


def test_05_legacy_function_call_is_a_tool_call_answered_by_its_result():
    path = case("05-openai-legacy-function-call/legacy.jsonl")
    for strict in (False, True):
        (example,), report = ingest(path, strict=strict)
        assert (report.messages, report.tool_calls, report.issues) == (5, 1, {})
    call_turn, result = example.messages[2], example.messages[3]
    (call,) = call_turn.tool_calls
    assert (call.name, call.arguments) == ("read_file", {"path": "README.md"})
    assert (result.role, result.tool_call_id, result.content) == ("tool", call.id, "# Demo project")


def test_05_refusals_and_unknown_parts_are_kept_and_marked(tmp_path):
    from tests.support.traces_fixtures import write_jsonl

    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Write malware"},
                    {"role": "assistant", "content": None, "refusal": "I can't help with that."},
                    {"role": "user", "content": [{"type": "text", "text": "Then a poem"}, {"type": "hologram"}]},
                    {"role": "assistant", "content": [{"type": "refusal", "refusal": "No poems either."}]},
                ]
            }
        ],
    )
    (example,), report = ingest(path)
    assert [(m.content, m.kind) for m in example.messages] == [
        ("Write malware", "message"),
        ("I can't help with that.", REFUSAL),
        ("Then a poem\n[hologram content]", "message"),
        ("No poems either.", REFUSAL),
    ]
    assert report.issues == {"unknown_content_block": 1}


def test_07_swe_agent_retry_attempts_become_one_example_each():
    for folder, copies in (("in_progress", {}), ("final", {"best_attempt_copy": 1})):
        examples, report = ingest(case(f"07-swe-agent-retry-attempts/{folder}"), strict=True)
        assert (report.examples, report.issues, report.normalized) == (2, {}, copies)
        assert [e.outcome["instance_id"] for e in examples] == ["demo__proj-7"] * 2
        assert [e.outcome["review"] for e in examples] == [{"accept": 0.2}, {"accept": 0.9}]
        assert [e.outcome["submission"].splitlines()[1] for e in examples] == ["-<=", "-n + 1"]
        assert [e.outcome["exit_status"] for e in examples] == ["submitted"] * 2
        assert len({e.id for e in examples}) == 2
    assert [e.metadata["best_attempt"] for e in examples] == [False, True]


def test_08_openhands_events_inside_a_wrapper_read_like_a_bare_list(tmp_path):
    bare, _ = ingest(case("08-openhands-wrapped-event-lists/control_bare_list"), strict=True)
    for fmt in ("auto", "openhands"):
        ingester = TraceIngester(fmt, strict=True)
        wrapped = list(ingester.ingest(case("08-openhands-wrapped-event-lists/api_response")))
        assert [e.format for e in wrapped] == ["openhands"]
        assert [(m.role, m.content, m.tool_calls) for m in wrapped[0].messages] == [
            (m.role, m.content, m.tool_calls) for m in bare[0].messages
        ]
        assert (ingester.report.messages, ingester.report.tool_calls) == (4, 2)


def test_08_openhands_evaluation_output_gives_one_example_per_instance(tmp_path):
    import json

    events = json.loads(case("08-openhands-wrapped-event-lists/control_bare_list/conv-1.json").read_text())
    path = tmp_path / "output.jsonl"
    rows = [
        {"instance_id": "demo__typo-1", "instruction": "Fix the typo", "history": events, "report": {"resolved": True}},
        {"instance_id": "demo__typo-2", "history": events[:2], "test_result": {"git_patch": ""}},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = ingest(path, strict=True)
    assert [e.format for e in examples] == ["openhands"] * 2
    assert [e.outcome for e in examples] == [
        {"instance_id": "demo__typo-1", "resolved": True},
        {"instance_id": "demo__typo-2"},
    ]
    assert [len(e.messages) for e in examples] == [4, 2] and report.tool_calls == 2 + 1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from trainer.model import DEFAULT_CORPUS, cached_tokenizer

    return cached_tokenizer(DEFAULT_CORPUS, vocab_size=512, cache_dir=tmp_path_factory.mktemp("tok"))


def test_09_dpo_loss_mask_covers_only_what_the_assistant_wrote(tokenizer):
    (pair,) = mine_pairs(TraceIngester(strict=True).ingest(case("09-dpo-mask-includes-tool-output/fork.jsonl")))
    assert pair.reason == "tool call refused by the user"
    tokens = render_pair(pair, tokenizer)
    call = 'Listing.\n<tool_call>{"name": "Bash", "arguments": {"command": "ls"}}</tool_call><|im_end|>'
    for ids, mask, spans in (
        (tokens.chosen_ids, tokens.chosen_loss_mask, [call, "Two files.<|im_end|>"]),
        (tokens.rejected_ids, tokens.rejected_loss_mask, [call]),
    ):
        trained = [i for i, m in zip(ids, mask, strict=True) if m]
        assert tokenizer.decode(trained) == "".join(spans)
        assert len(trained) == sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in spans)
        assert "doesn't want to proceed" not in tokenizer.decode(trained) and "a.py" not in tokenizer.decode(trained)
