"""Aider chat history (`.aider.chat.history.md` in the repository Aider ran in), read line by line.

Aider appends Markdown as it goes (aider/io.py): each run starts with `# aider chat started at
<time>`; what the user typed is written as `#### <line>`; Aider's own notices (the command line,
"Applied edit to x.py", commit hashes, lint output, token counts) as `> <line>`; everything else
is the model's reply, verbatim. Each run becomes one example: user turns, assistant turns. The
notices are Aider talking, not the model and not the user: they go to `metadata["notices"]` (a
count) and are never part of a turn. A `> ^C KeyboardInterrupt` notice right after a reply marks
that reply as interrupted (a user message of kind `INTERRUPTION`).
"""

from __future__ import annotations

from collections.abc import Iterator

from .conversation import ConversationBuilder
from .reading import FileContext
from .schema import INTERRUPTION, Message, TraceExample, messages_digest

FORMAT = "aider"
SESSION_HEAD = "# aider chat started at "
USER_PREFIX = "#### "
NOTICE_PREFIX = "> "
INTERRUPT_NOTICES = ("^C KeyboardInterrupt", "^C again to exit")


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
                session.notice(line[len(NOTICE_PREFIX) :], line_no)
            else:
                session.part("assistant", line, line_no)
    yield from session.finish()


class _Run:
    """One `# aider chat started at` section, built up line by line."""

    def __init__(self, ctx: FileContext, started: str | None, line: int) -> None:
        self.ctx = ctx
        self.started = started
        self.line = line
        self.builder = ConversationBuilder(ctx.problem)
        self.role: str | None = None
        self.lines: list[str] = []
        self.notices = 0
        self.interrupted = False

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
        if self.role == "assistant" or self.role == "user":
            self._close(line)
            self.role = None

    def _close(self, line: int) -> None:
        text = "\n".join(self.lines).strip("\n")
        if self.role is not None and text.strip():
            self.builder.add(Message(self.role, text), line=line)
        if self.interrupted:
            self.builder.add(Message("user", "[interrupted by the user]", kind=INTERRUPTION), line=line)
            self.interrupted = False
        self.lines = []

    def finish(self) -> Iterator[TraceExample]:
        self._close(self.line)
        if not self.builder.messages:
            return
        session_id = f"{self.ctx.path.parent.name}:{self.started or self.line}"
        yield TraceExample(
            id=f"{FORMAT}:{session_id}:{messages_digest(self.builder.messages)}",
            format=FORMAT,
            session_id=session_id,
            messages=self.builder.messages,
            metadata={"started": self.started, "line": self.line, "notices": self.notices},
        )
