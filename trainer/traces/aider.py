"""Aider chat history (`.aider.chat.history.md` in the repository Aider ran in), read line by line.

Aider appends Markdown as it goes (aider/io.py): each run starts with `# aider chat started at
<time>`; what the user typed is written as `#### <line>`; Aider's own notices (the command line,
"Applied edit to x.py", commit hashes, lint output, token counts) as `> <line>`; everything else
is the model's reply, verbatim. Each run becomes one example (one more per `/clear`, below): user
turns, assistant turns. The notices are Aider talking, not the model and not the user: they go to
`metadata["notices"]` (a count) and are never part of a turn. A `> ^C KeyboardInterrupt` notice
right after a reply marks that reply as interrupted (a user message of kind `INTERRUPTION`).

In-chat commands are logged as typed, but Aider runs them instead of sending them
(`Commands.is_command`: input starting with `/` or `!`; `base_coder.preproc_user_input`), so an
input whose first word is an Aider command (or a prefix of one, as Aider matches them; `!cmd` is
`/run`) is not a user turn: it is counted in `metadata["commands"]` (by name) and under the
report's `normalized` as `aider_command`. Other input that starts with `/` (`/etc/hosts is wrong`)
stays a user message, unless Aider answered it with `Invalid command` / `Ambiguous command`,
which means it was not sent either. What some commands do to the conversation is kept:
- `/ask`, `/code`, `/architect`, `/context` with text send that text: it is the user turn;
- `/clear` and `/reset` empty the chat history (`cmd_clear`): the example ends there and the
  next request starts a new one (`metadata["segment"]` numbers them within the run), so every
  example holds what the model saw;
- `/undo` reverts the commit of the model's last edit (`cmd_undo`, notice `Removed: <hash> ...`):
  when that commit was announced (`Commit <hash> ...`) right after the last reply, the reply is
  rejected: a user message of kind `UNDONE` follows it (fork verdicts and per-example rewards
  read it); an undo of an older commit is counted as `undo_of_an_earlier_reply`.
Commands whose output Aider sends on (a failing `/test`, `/run`, `/web`) are not in the log, so
what the model saw there cannot be rebuilt; they are counted like the rest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from .conversation import ConversationBuilder
from .reading import FileContext
from .schema import INTERRUPTION, UNDONE, Message, TraceExample, messages_digest

FORMAT = "aider"
SESSION_HEAD = "# aider chat started at "
USER_PREFIX = "#### "
NOTICE_PREFIX = "> "
INTERRUPT_NOTICES = ("^C KeyboardInterrupt", "^C again to exit")
# aider/commands.py `cmd_*` methods (v0.86), named as typed: `cmd_read_only` is `/read-only`.
COMMANDS = frozenset(
    "add architect ask chat-mode clear code commit context copy copy-context diff drop edit editor "
    "editor-model exit git help lint load ls map map-refresh model models multiline-mode paste quit "
    "read-only reasoning-effort report reset run save settings test think-tokens tokens undo voice "
    "weak-model web".split()
)
SENDS_ITS_TEXT = frozenset({"ask", "code", "architect", "context"})  # `_generic_chat_command(args, ...)`
CLEARS_HISTORY = frozenset({"clear", "reset"})
NOT_SENT_NOTICES = ("Invalid command:", "Ambiguous command:")
COMMIT_NOTICE = "Commit "
UNDO_NOTICE = "Removed: "
UNDONE_TEXT = "[the user undid this edit with /undo]"


def command_of(text: str) -> tuple[str, str] | None:
    """(command, its arguments) for input Aider runs as one of its commands; None for a message.

    Aider matches the first word against its commands by prefix (`/u` is `/undo`); a prefix of
    several is refused as ambiguous, also not sent (returned as "ambiguous").
    """
    if text.startswith("!"):
        return "run", text[1:].strip()
    if not text.startswith("/"):
        return None
    word, rest = (text[1:].split(maxsplit=1) + ["", ""])[:2]
    if word in COMMANDS:
        return word, rest
    matches = [name for name in COMMANDS if name.startswith(word)]
    if len(matches) == 1:
        return matches[0], rest
    return ("ambiguous", rest) if matches else None


def read_aider(ctx: FileContext) -> Iterator[TraceExample]:
    session = _Run(ctx, None, 0)
    with ctx.path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            ctx.lines_read()
            if ctx.progress is not None:
                ctx.progress(len(raw))
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                ctx.problem("invalid_utf8", f"byte {error.start}: {error.reason}", line=line_no)
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith(SESSION_HEAD):
                yield from session.finish()
                session = _Run(ctx, line[len(SESSION_HEAD) :].strip(), line_no)
            elif line.startswith(USER_PREFIX) or line == "####":
                session.part("user", line[len(USER_PREFIX) :].rstrip(), line_no)  # "  " = a Markdown line break
            elif line.startswith(NOTICE_PREFIX) or line == ">":
                session.notice(line[len(NOTICE_PREFIX) :].rstrip(), line_no)
            else:
                session.part("assistant", line, line_no)
    yield from session.finish()


class _Run:
    """One `# aider chat started at` section, built up line by line; one example per `/clear`."""

    def __init__(self, ctx: FileContext, started: str | None, line: int) -> None:
        self.ctx = ctx
        self.started = started
        self.line = line
        self.role: str | None = None
        self.lines: list[str] = []
        self.interrupted = False
        self.not_sent = False  # Aider refused the open input as a command
        self.undo_pending = False  # an /undo ran; its `Removed:` notice names the commit
        self.done: list[TraceExample] = []
        self._segment(line)

    def _segment(self, line: int) -> None:
        self.builder = ConversationBuilder(self.ctx.problem)
        self.segment_line = line
        self.notices = 0
        self.commands: Counter[str] = Counter()
        self.commits: dict[str, int] = {}  # commit hash -> index of the reply that made it

    def part(self, role: str, text: str, line: int) -> None:
        if role != self.role:
            self._close(line)
            self.role = role
        if role == "assistant" and not self.lines and not text.strip():
            return  # blank lines between a user turn and the reply
        self.lines.append(text)

    def notice(self, text: str, line: int) -> None:
        self.notices += 1
        if text.startswith(INTERRUPT_NOTICES) and self.role == "assistant":
            self.interrupted = True
        if self.role == "user" and text.startswith(NOT_SENT_NOTICES):
            self.not_sent = True
        if self.role == "assistant" or self.role == "user":
            self._close(line)
            self.role = None
        messages = self.builder.messages
        if text.startswith(COMMIT_NOTICE) and messages and messages[-1].role == "assistant":
            self.commits[text[len(COMMIT_NOTICE) :].split(" ", 1)[0]] = len(messages) - 1
        elif text.startswith(UNDO_NOTICE) and self.undo_pending:
            self.undo_pending = False
            undone = self.commits.pop(text[len(UNDO_NOTICE) :].split(" ", 1)[0], None)
            last_reply = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
            if undone is not None and undone == last_reply:
                self.builder.add(Message("user", UNDONE_TEXT, kind=UNDONE), line=line)
            else:
                self.ctx.normalized("undo_of_an_earlier_reply")

    def _close(self, line: int) -> None:
        text = "\n".join(self.lines).strip("\n")
        if self.role == "user":
            self._close_input(text, line)
        elif self.role is not None and text.strip():
            self.builder.add(Message(self.role, text), line=line)
        if self.interrupted:
            self.builder.add(Message("user", "[interrupted by the user]", kind=INTERRUPTION), line=line)
            self.interrupted = False
        self.lines = []

    def _close_input(self, text: str, line: int) -> None:
        """What the user typed: a message, or a command (counted, and acted on)."""
        self.undo_pending = False
        command = command_of(text)
        if command is None and self.not_sent and text.startswith("/"):
            command = ("invalid", "")
        self.not_sent = False
        if command is None:
            if text.strip():
                self.builder.add(Message("user", text), line=line)
            return
        name, arguments = command
        self.commands[name] += 1
        self.ctx.normalized("aider_command")
        if name in SENDS_ITS_TEXT and arguments:
            self.builder.add(Message("user", arguments), line=line)
        elif name == "undo":
            self.undo_pending = True
        elif name in CLEARS_HISTORY and self.builder.messages:  # nothing since the last clear: nothing to end
            self.done += self._example()
            self._segment(line)

    def _example(self) -> list[TraceExample]:
        if not self.builder.messages:
            return []
        session_id = f"{self.ctx.path.parent.name}:{self.started or self.line}"
        return [
            TraceExample(
                id=f"{FORMAT}:{session_id}:{messages_digest(self.builder.messages)}",
                format=FORMAT,
                session_id=session_id,
                messages=self.builder.messages,
                metadata={
                    "started": self.started,
                    "line": self.segment_line,
                    "segment": len(self.done),
                    "notices": self.notices,
                    "commands": dict(self.commands),
                },
            )
        ]

    def finish(self) -> Iterator[TraceExample]:
        self._close(self.line)
        yield from self.done
        yield from self._example()
