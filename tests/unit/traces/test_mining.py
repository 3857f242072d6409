"""mine_pairs on logs whose right answer is known by construction."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO
from tests.support.traces_fixtures import (
    TRACES_DIR,
    ClaudeLog,
    forked_session,
    openai_attempt,
    requires_samples,
    write_json,
    write_jsonl,
)
from trainer.traces import Message, ToolCall, TraceExample, TraceIngester, mine_pairs


def pairs_from(path, **kwargs):
    miner = mine_pairs(TraceIngester(strict=True).ingest(path), **kwargs)
    return list(miner), miner


def test_refused_branch_is_rejected(tmp_path):
    pairs, miner = pairs_from(forked_session(tmp_path, refuse=True, interrupt=True))
    (pair,) = pairs
    assert [m.content for m in pair.prompt] == ["Hi", "Hello", "Rename foo to bar"]
    assert [(m.role, m.content) for m in pair.chosen] == [
        ("assistant", "Using sed."),
        ("tool", ""),
        ("assistant", "Done."),
    ]
    assert [m.role for m in pair.rejected] == ["assistant", "tool"]  # up to the interruption
    assert pair.rejected[0].tool_calls[0].name == "Edit"
    assert (pair.source, pair.reason) == ("fork", "tool call refused by the user")
    assert pair.chosen_example_id == "claude_code:sess-1:a2b"
    assert pair.rejected_example_id == "claude_code:sess-1:i1"
    assert miner.skipped == {}


def test_interrupted_branch_is_rejected(tmp_path):
    (pair,), _ = pairs_from(forked_session(tmp_path, interrupt=True))
    assert pair.reason == "interrupted by the user"
    assert [m.role for m in pair.rejected] == ["assistant", "tool"]
    assert pair.chosen[0].content == "Using sed."


def test_plain_rewind_rejects_the_older_branch(tmp_path):
    (pair,), _ = pairs_from(forked_session(tmp_path))
    assert pair.reason == "rewound by the user and answered again"
    assert (pair.chosen[0].content, pair.rejected[0].content) == ("Using sed.", "Editing.")


def test_both_branches_rejected_gives_no_pair(tmp_path):
    pairs, miner = pairs_from(forked_session(tmp_path, refuse=True, retry_rejected=True))
    assert pairs == [] and miner.skipped == {"fork_without_verdict": 1}


def test_fork_deeper_in_a_branch_is_mined_once(tmp_path):
    # The retried branch forks again further down: two leaves share the same first divergence.
    path = forked_session(tmp_path, interrupt=True)
    log = ClaudeLog()
    for line in path.read_text().splitlines():
        log.raw(json.loads(line))
    log.user("u3", "Now add a test", parent="a2b")
    log.assistant("a3", "Added.")
    log.user("u3b", "Now add two tests", parent="a2b")
    log.assistant("a3b", "Added both.")
    pairs, miner = pairs_from(log.write(tmp_path / "deeper.jsonl"))
    assert [p.reason for p in pairs] == ["interrupted by the user"]
    assert miner.skipped == {"fork_at_user_turn": 1}  # "add a test" vs "add two tests": different prompts


def test_outcome_pairs_resolved_against_unresolved(tmp_path):
    path = write_jsonl(
        tmp_path / "attempts.jsonl",
        [
            openai_attempt("A", "good patch", True),
            openai_attempt("B", "only attempt", True),
            openai_attempt("A", "bad patch", False),
            openai_attempt("A", "other good patch", True),
            openai_attempt("C", "x", True),
            openai_attempt("C", "y", False, system="A different system prompt."),
        ],
    )
    pairs, miner = pairs_from(path)
    assert [(p.chosen[0].content, p.rejected[0].content) for p in pairs] == [
        ("good patch", "bad patch"),
        ("other good patch", "bad patch"),
    ]
    for pair in pairs:
        assert [m.role for m in pair.prompt] == ["system", "user"] and pair.prompt[1].content == "Fix A"
        assert [m.role for m in pair.chosen] == ["assistant", "tool", "assistant"]  # the whole attempt
        assert (pair.source, pair.reason) == ("outcome", "resolved vs unresolved on A")
    assert miner.skipped == {"outcome_prompt_mismatch": 1}
    capped, miner = pairs_from(path, max_pairs_per_task=1)
    assert len(capped) == 1 and miner.skipped == {"outcome_prompt_mismatch": 1, "over_max_pairs_per_task": 1}


def test_outcome_pairs_from_swe_agent_runs(tmp_path):
    for name, resolved, action in (("run1", True, "edit 1:1\nfixed\nend_of_edit"), ("run2", False, "rm -rf src")):
        write_json(
            tmp_path / name / "django__django-1.traj",
            {
                "history": [
                    {"role": "system", "content": "SETTING"},
                    {"role": "user", "content": "ISSUE: bug"},
                    {"role": "assistant", "content": action},
                ],
                "info": {"exit_status": "submitted", "submission": "diff", "resolved": resolved},
                "replay_config": {"problem_statement": {"id": "django__django-1"}},
            },
        )
    (pair,), _ = pairs_from(tmp_path)
    assert pair.chosen[0].content.startswith("edit 1:1") and pair.rejected[0].content == "rm -rf src"
    assert pair.reason == "resolved vs unresolved on django__django-1"


def test_pair_ids_are_stable_content_hashes(tmp_path):
    path = forked_session(tmp_path, interrupt=True)
    first, _ = pairs_from(path)
    again, _ = pairs_from(path)
    assert [p.id for p in first] == [p.id for p in again]
    other, _ = pairs_from(forked_session(tmp_path, refuse=True))
    assert first[0].id != other[0].id and first[0].id.startswith("pair-")


# Mines a fork pair (from the log at argv[1]) and a self-correction pair; prints their ids.
MINE_IDS = """
import sys
from trainer.traces import Message, ToolCall, TraceExample, TraceIngester, mine_pairs
corrected = TraceExample("ex", "openai", "ex", [
    Message("user", "Fix it"),
    Message("assistant", "Editing.", tool_calls=[ToolCall("1", "edit", {"line": 3})]),
    Message("tool", "syntax error", tool_call_id="1", is_error=True),
    Message("assistant", "Fixed indent.", tool_calls=[ToolCall("2", "edit", {"line": 4})]),
    Message("tool", "ok", tool_call_id="2"),
])
examples = [*TraceIngester(strict=True).ingest(sys.argv[1]), corrected]
print(" ".join(f"{pair.source}:{pair.id}" for pair in mine_pairs(examples)))
"""


def test_pair_ids_are_equal_across_processes_with_different_hash_seeds(tmp_path):
    """A content hash, not Python's `hash()`, which is salted per process (PYTHONHASHSEED): an id
    from it would be stable inside one process and differ in the next run's."""
    path = forked_session(tmp_path, interrupt=True)
    ids = {}
    for seed in ("0", "1", "4242"):
        done = subprocess.run(
            [sys.executable, "-c", MINE_IDS, str(path)],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        ids[seed] = done.stdout.split()
    assert sorted(i.split(":")[0] for i in ids["0"]) == ["fork", "self_correction"]
    assert ids["0"] == ids["1"] == ids["4242"], ids
    assert all(i.split(":")[1].startswith("pair-") for i in ids["0"])


def test_fork_pairs_stream_before_later_sessions_are_read(tmp_path):
    path = forked_session(tmp_path, interrupt=True)
    consumed = []

    def examples():
        for example in TraceIngester().ingest(path):
            consumed.append(example.id)
            yield example
        consumed.append("later")
        yield TraceExample("later", "openai", "another-session", [Message("user", "hi")])
        consumed.append("end of stream")

    miner = mine_pairs(examples())
    next(miner)
    # The fork pair comes out once the next session starts, not at the end of the stream.
    assert consumed == ["claude_code:sess-1:i1", "claude_code:sess-1:a2b", "later"]
    assert list(miner) == [] and consumed[-1] == "end of stream"


def example_with(messages):
    return TraceExample("ex", "openai", "s", messages)


def call(call_id, name):
    return Message("assistant", tool_calls=[ToolCall(call_id, name, {})])


def test_rewards_from_unpaired_signals():
    fixed = example_with(
        [
            call("1", "pytest"),
            Message("tool", "2 failed", tool_call_id="1", is_error=True),
            call("2", "pytest"),
            Message("tool", "all passed", tool_call_id="2"),
        ]
    )
    refused = example_with(
        [
            call("1", "rm"),
            Message("tool", "no", tool_call_id="1", is_error=True, kind="refusal"),
            Message("user", "[Request interrupted by user]", kind="interruption"),
        ]
    )
    mixed = example_with(
        [
            call("1", "pytest"),
            Message("tool", "failed", tool_call_id="1", is_error=True),
            call("2", "lint"),
            Message("tool", "failed", tool_call_id="2", is_error=True),
            call("3", "pytest"),
            Message("tool", "passed", tool_call_id="3"),
        ]
    )
    quiet = example_with([Message("user", "hi"), Message("assistant", "hello")])
    for example, name in ((fixed, "fixed"), (refused, "refused"), (mixed, "mixed"), (quiet, "quiet")):
        example.id = name
    miner = mine_pairs([fixed, refused, mixed, quiet])
    assert list(miner) == []
    assert {k: (r.reward, r.signals) for k, r in miner.rewards.items()} == {
        "fixed": (1.0, {"errors_fixed": 1}),
        "refused": (-1.0, {"refusals": 1, "interruptions": 1}),
        "mixed": (0.0, {"errors_fixed": 1, "errors_unfixed": 1}),
    }


@requires_samples
def test_real_samples_give_the_self_correction_pair_of_the_marshmallow_run():
    # marshmallow-1867: message 14 is an `edit` call SWE-agent rejects ("Your proposed edit has
    # introduced new syntax error(s)"); message 16 calls `edit` again with fixed indentation and
    # the edit goes through. The DAG sample's only fork is at a user turn: no pair there.
    miner = mine_pairs(TraceIngester().ingest(TRACES_DIR))
    (pair,) = list(miner)
    assert (pair.source, pair.reason) == ("self_correction", "edit call failed, then corrected")
    assert len(pair.prompt) == 14 and pair.prompt[-1].content.startswith("[File: src/marshmallow/fields.py")
    (rejected,), (chosen,) = pair.rejected, pair.chosen
    assert [c.name for c in rejected.tool_calls] == [c.name for c in chosen.tool_calls] == ["edit"]
    assert rejected.tool_calls[0].arguments != chosen.tool_calls[0].arguments
    assert chosen.content.startswith("Oh no! My edit command did not use the proper indentation")
    assert miner.by_source == {"self_correction": 1} and miner.skipped == {"fork_at_user_turn": 1}
    marshmallow = "swe_agent:swe_agent__marshmallow-1867__function_calling:61c2af5b000826d1"
    assert pair.chosen_example_id == pair.rejected_example_id == marshmallow
    assert {k: (r.reward, r.signals) for k, r in miner.rewards.items()} == {marshmallow: (1.0, {"errors_fixed": 1})}


def test_self_correction_pair_needs_a_changed_call_that_succeeds():
    def attempt(second_args, second_error=False, user_between=False):
        messages = [
            Message("user", "Fix it"),
            Message("assistant", "Editing.", tool_calls=[ToolCall("1", "edit", {"line": 3})]),
            Message("tool", "syntax error", tool_call_id="1", is_error=True),
        ]
        if user_between:
            messages.append(Message("user", "try again"))
        messages += [
            Message("assistant", "Fixed indent.", tool_calls=[ToolCall("2", "edit", second_args)]),
            Message("tool", "failed again" if second_error else "ok", tool_call_id="2", is_error=second_error),
        ]
        name = f"ex-{second_args}-{second_error}-{user_between}"
        return TraceExample(name, "openai", name, messages)

    miner = mine_pairs([attempt({"line": 4})])
    (pair,) = list(miner)
    assert [m.content for m in pair.prompt] == ["Fix it"]
    assert (pair.chosen[0].content, pair.rejected[0].content) == ("Fixed indent.", "Editing.")
    miner = mine_pairs(
        [attempt({"line": 3}), attempt({"line": 4}, second_error=True), attempt({"line": 4}, user_between=True)]
    )
    assert list(miner) == []
    # The same arguments again: nothing to prefer. A second failure: neither call is corrected (2).
    # A user turn in between: the user, not the agent, moved things on.
    assert miner.skipped == {"retry_of_the_same_call": 1, "error_without_correction": 3}


def test_max_pairs_per_task_is_validated():
    with pytest.raises(ValueError, match="max_pairs_per_task=0"):
        mine_pairs([], max_pairs_per_task=0)
