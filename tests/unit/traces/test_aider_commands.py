"""Aider's in-chat commands are not user turns; `/clear` starts a new example; `/undo` rejects the edit.

Histories are written here the way Aider's io.py writes them (`#### ` input, `> ` notices, the
reply between blank lines), with placeholder content.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.traces_fixtures import shared_case
from trainer.traces import UNDONE, TraceIngester, mine_pairs
from trainer.traces.aider import command_of

EDIT = "calc.py\n```python\n<<<<<<< SEARCH\n    return a / b\n=======\n    {}\n>>>>>>> REPLACE\n```"
EDIT_1 = EDIT.format("return None if b == 0 else a / b")
EDIT_2 = EDIT.format("raise ValueError('zero')")
REQUEST = "make divide() raise ValueError on zero"


class History:
    """An `.aider.chat.history.md` written as aider/io.py appends it."""

    def __init__(self) -> None:
        self.text = (
            "\n# aider chat started at 2025-09-03 10:15:42\n\n> aider --model placeholder  \n> Aider v0.86.1  \n"
        )

    def user(self, text: str) -> History:
        self.text += "\n#### " + "  \n#### ".join(text.splitlines()) + "  \n"
        return self

    def notice(self, *texts: str) -> History:
        self.text += "".join(f"> {t}  \n" for t in texts)
        return self

    def reply(self, text: str, *, commit: str | None = None) -> History:
        self.text += f"\n{text}\n\n"
        if commit is not None:
            self.notice("Applied edit to calc.py", f"Commit {commit} fix: divide by zero")
        return self

    def undo(self, commit: str) -> History:
        return self.user("/undo").notice(f"Removed: {commit} fix: divide by zero", "Now at:  9f8e7d6 initial")

    def write(self, folder: Path) -> Path:
        path = folder / "proj" / ".aider.chat.history.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.text)
        return path


def ingest(history: History, tmp_path):
    ingester = TraceIngester(strict=True)
    return list(ingester.ingest(history.write(tmp_path))), ingester.report


def turns(example) -> list[tuple[str, str, str]]:
    return [(m.role, m.kind, m.content) for m in example.messages]


@pytest.mark.parametrize(
    "typed, command",
    [
        ("/add calc.py", ("add", "calc.py")),
        ("/read-only docs/spec.md", ("read-only", "docs/spec.md")),
        ("/u", ("undo", "")),  # a prefix of one command is that command, as Aider matches them
        ("/tok", ("tokens", "")),
        ("/a calc.py", ("ambiguous", "calc.py")),  # add, architect, ask: Aider refuses it, sends nothing
        ("!pytest -q", ("run", "pytest -q")),
        ("/ask what does\ndivide return?", ("ask", "what does\ndivide return?")),
        ("/etc/hosts is wrong", None),  # a path, not a command
        ("make /add work", None),
        ("divide by zero", None),
    ],
)
def test_an_input_is_a_command_when_its_first_word_names_an_aider_command(typed, command):
    assert command_of(typed) == command


def test_a_slash_command_is_not_a_user_turn_and_is_counted_by_name(tmp_path):
    history = History().user("/add calc.py").notice("Added calc.py to the chat")
    history.user("/tokens").notice("Approximate context window usage, in tokens:", "$ 0.0012    1,024 calc.py")
    history.user("!ls").notice("Add 0.0k tokens of command output to the chat? (Y)es/(N)o [Yes]: n")
    history.user(REQUEST).reply(EDIT_1, commit="1a2b3c4")
    (example,), report = ingest(history, tmp_path)
    assert turns(example) == [("user", "message", REQUEST), ("assistant", "message", EDIT_1)]
    assert example.metadata["commands"] == {"add": 1, "tokens": 1, "run": 1}
    assert report.normalized == {"aider_command": 3} and report.issues == {}


def test_a_message_that_merely_starts_with_a_path_stays_a_user_message(tmp_path):
    history = History().user("/etc/hosts is wrong, fix the parser").reply("The parser now skips comments.")
    (example,), report = ingest(history, tmp_path)
    assert turns(example)[0] == ("user", "message", "/etc/hosts is wrong, fix the parser")
    assert example.metadata["commands"] == {} and report.normalized == {}


def test_a_slash_input_aider_refused_as_an_invalid_command_is_not_a_user_turn(tmp_path):
    history = History().user("/etc/hosts").notice("Invalid command: /etc/hosts")
    history.user(REQUEST).reply(EDIT_1)
    (example,), _ = ingest(history, tmp_path)
    assert turns(example) == [("user", "message", REQUEST), ("assistant", "message", EDIT_1)]
    assert example.metadata["commands"] == {"invalid": 1}


def test_ask_code_architect_and_context_send_their_text_as_the_user_turn(tmp_path):
    history = History().user("/ask").notice("Chat mode: ask")  # no text: a mode switch, nothing sent
    history.user("/ask what does divide return\nfor b == 0?").reply("It raises ZeroDivisionError.")
    history.user("/code " + REQUEST).reply(EDIT_2)
    (example,), _ = ingest(history, tmp_path)
    assert [(m.role, m.content) for m in example.messages] == [
        ("user", "what does divide return\nfor b == 0?"),
        ("assistant", "It raises ZeroDivisionError."),
        ("user", REQUEST),
        ("assistant", EDIT_2),
    ]
    assert example.metadata["commands"] == {"ask": 2, "code": 1}


def test_clear_and_reset_start_a_new_example_holding_only_what_the_model_saw_after_them(tmp_path):
    history = History().user(REQUEST).reply(EDIT_1)
    history.user("/clear").notice("All chat history cleared.")
    history.user("/clear").notice("All chat history cleared.")  # nothing since: no empty example
    history.user("what does divide do?").reply("It divides a by b.")
    history.user("/reset").notice("All files dropped and chat history cleared.")
    history.user(REQUEST).reply(EDIT_2)
    examples, report = ingest(history, tmp_path)
    assert [[m.content for m in e.messages] for e in examples] == [
        [REQUEST, EDIT_1],
        ["what does divide do?", "It divides a by b."],
        [REQUEST, EDIT_2],
    ]
    assert [e.metadata["segment"] for e in examples] == [0, 1, 2]
    assert [e.metadata["commands"] for e in examples] == [{"clear": 1}, {"clear": 1, "reset": 1}, {}]
    assert len({e.session_id for e in examples}) == 1 and len({e.id for e in examples}) == 3
    assert report.examples == 3


def test_undo_of_the_last_edit_marks_that_reply_rejected_and_counts_against_the_example(tmp_path):
    history = History().user(REQUEST).reply(EDIT_1, commit="1a2b3c4").undo("1a2b3c4")
    (example,), _ = ingest(history, tmp_path)
    assert turns(example) == [
        ("user", "message", REQUEST),
        ("assistant", "message", EDIT_1),
        ("user", UNDONE, "[the user undid this edit with /undo]"),
    ]
    miner = mine_pairs([example])
    assert list(miner) == []
    reward = miner.rewards[example.id]
    assert (reward.reward, reward.signals) == (-1.0, {"undone_edits": 1})


def test_an_undo_that_reverted_nothing_rejects_nothing(tmp_path):
    history = History().user(REQUEST).reply(EDIT_1)  # --no-auto-commits: no commit of the edit
    history.user("/undo").notice("The last commit was not made by aider in this chat session.")
    (example,), report = ingest(history, tmp_path)
    assert [m.kind for m in example.messages] == ["message", "message"]
    assert example.metadata["commands"] == {"undo": 1} and "undo_of_an_earlier_reply" not in report.normalized


def test_an_undo_of_an_older_reply_is_counted_not_pinned_on_the_last_one(tmp_path):
    history = History().user(REQUEST).reply(EDIT_1, commit="aaaaaaa")
    history.user("also handle b < 0").reply(EDIT_2, commit="bbbbbbb")
    history.undo("bbbbbbb").undo("aaaaaaa")
    (example,), report = ingest(history, tmp_path)
    assert [m.kind for m in example.messages] == ["message", "message", "message", "message", UNDONE]
    assert report.normalized == {"aider_command": 2, "undo_of_an_earlier_reply": 1}


def test_the_same_request_answered_again_after_undo_and_clear_is_a_fork_pair(tmp_path):
    history = History().user(REQUEST).reply(EDIT_1, commit="1a2b3c4").undo("1a2b3c4")
    history.user("/clear").notice("All chat history cleared.")
    history.user(REQUEST).reply(EDIT_2, commit="5e6f7a8")
    examples, _ = ingest(history, tmp_path)
    miner = mine_pairs(examples)
    (pair,) = list(miner)
    assert [m.content for m in pair.prompt] == [REQUEST]
    assert ([m.content for m in pair.chosen], [m.content for m in pair.rejected]) == ([EDIT_2], [EDIT_1])
    assert (pair.source, pair.reason) == ("fork", "edit undone by the user")


def test_case_12_aider_slash_commands():
    proj = shared_case("12-aider-slash-commands") / "proj"
    ingester = TraceIngester(strict=True)
    first, second = list(ingester.ingest(proj))
    assert [(m.role, m.kind) for m in first.messages] == [
        ("user", "message"),
        ("assistant", "message"),
        ("user", UNDONE),
    ]
    assert first.messages[0].content == "make divide() raise ValueError on zero"
    assert [m.role for m in second.messages] == ["user", "assistant"]
    assert second.messages[0].content.startswith("divide(a, 0) must raise ValueError")
    assert (first.metadata["commands"], second.metadata["commands"]) == ({"add": 1, "undo": 1, "clear": 1}, {})
    miner = mine_pairs([first, second])
    assert list(miner) == [] and miner.rewards[first.id].signals == {"undone_edits": 1}
