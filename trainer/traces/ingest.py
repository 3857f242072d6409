"""Finding trace files, telling their formats apart, and streaming them out as `TraceExample`s."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from .claude_code import read_claude_code
from .openai import read_openai
from .openhands import read_openhands
from .reading import FileContext
from .schema import FORMATS, IngestReport, TraceExample, TraceFormatError
from .swe_agent import read_swe_agent

TRACE_SUFFIXES = frozenset({".jsonl", ".json", ".traj"})
HEAD_BYTES = 1 << 16
CLAUDE_CODE_KEYS = frozenset({"parentUuid", "sessionId", "leafUuid", "isSidechain"})
CLAUDE_CODE_BOOKKEEPING = frozenset({"file-history-snapshot", "summary", "queue-operation"})


def detect_format(path: str | Path) -> str:
    """The format of one trace file from its name and first bytes (never reads the whole file)."""
    path = Path(path)
    if path.suffix == ".traj":
        return "swe_agent"
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if not head:
        raise TraceFormatError(path, 1, "empty_file")
    lines = head.split("\n")
    for line in lines[:-1] if len(lines) > 1 else lines:  # the last piece may be cut by HEAD_BYTES
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # not JSONL (a pretty-printed document) or a line longer than the head
        if not isinstance(record, dict):
            break
        if CLAUDE_CODE_KEYS & record.keys() or record.get("type") in CLAUDE_CODE_BOOKKEEPING:
            return "claude_code"
        if "messages" in record:
            return "openai"
        if "trajectory" in record or "history" in record:
            return "swe_agent"
    if head.startswith("["):
        if '"action"' in head or '"observation"' in head:
            return "openhands"
    elif head.startswith("{"):
        if any(f'"{key}"' in lines[0] for key in CLAUDE_CODE_KEYS):
            return "claude_code"
        if '"trajectory"' in head or '"history"' in head:
            return "swe_agent"
        if '"messages"' in head:
            return "openai"
    raise TraceFormatError(path, None, "unknown_format", "not Claude Code, OpenHands, SWE-agent or OpenAI messages")


_READERS = {"openhands": read_openhands, "swe_agent": read_swe_agent, "openai": read_openai}


class TraceIngester:
    """Streams `TraceExample`s out of trace files or directories of them, in any of `FORMATS`.

    Lenient by default: what can be repaired is, what cannot is skipped, and both are counted
    in `report.issues`. With `strict=True` the first such problem raises `TraceFormatError`
    naming the file and line. `report` accumulates over every `ingest` call of this ingester.
    `progress`, if given, is called with the number of bytes consumed since its last call.
    """

    def __init__(
        self, format: str = "auto", *, strict: bool = False, progress: Callable[[int], None] | None = None
    ) -> None:
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"unknown trace format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")
        self.format = format
        self.strict = strict
        self.progress = progress
        self.report = IngestReport()

    def ingest(self, path: str | Path) -> Iterator[TraceExample]:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no trace file or directory at {path}")
        for main, subagents in _file_groups(path):
            for example in self._ingest_group(main, subagents):
                self.report.count_example(example)
                yield example

    def _ingest_group(self, main: Path, subagents: list[Path]) -> Iterator[TraceExample]:
        fmt = self._format_of(main)
        if fmt is None:
            return
        ctx = self._context(main, fmt)
        if fmt != "claude_code":
            yield from _READERS[fmt](ctx)
            return
        yield from read_claude_code(ctx, [self._context(p, fmt) for p in subagents])

    def _context(self, path: Path, fmt: str) -> FileContext:
        self.report.add(fmt, files=1)
        return FileContext(path, fmt, self.report, strict=self.strict, progress=self.progress)

    def _format_of(self, path: Path) -> str | None:
        """The file's format, or None (counted) for files with nothing to read."""
        try:
            if path.stat().st_size == 0:
                raise TraceFormatError(path, 1, "empty_file")
            return self.format if self.format != "auto" else detect_format(path)
        except TraceFormatError as error:
            problem = error
        except OSError as error:
            problem = TraceFormatError(path, None, "unreadable_file", str(error))
        if self.strict:
            raise problem
        self.report.add(None, files=1)
        self.report.add_issue(None, problem.reason)
        return None


def _file_groups(path: Path) -> Iterator[tuple[Path, list[Path]]]:
    """Each trace file once, in a stable order; a Claude Code session's `subagents/` files ride along."""
    if path.is_file():
        yield path, _subagent_files(path)
        return
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in TRACE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    claimed = {sub for f in files for sub in _subagent_files(f)}
    for file in files:
        if file not in claimed:
            yield file, _subagent_files(file)


def _subagent_files(session_file: Path) -> list[Path]:
    if session_file.suffix != ".jsonl":
        return []
    folder = session_file.with_suffix("") / "subagents"
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
