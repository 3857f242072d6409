"""Finding trace files, telling their formats apart, and streaming them out as `TraceExample`s."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .aider import read_aider
from .claude_code import read_claude_code
from .cline import read_cline
from .codex import LINE_TYPES as CODEX_TYPES
from .codex import is_legacy_meta, read_codex
from .openai import read_openai
from .openhands import read_openhands
from .reading import FileContext
from .schema import FORMATS, IngestReport, TraceExample, TraceFormatError
from .swe_agent import read_swe_agent

TRACE_SUFFIXES = frozenset({".jsonl", ".json", ".traj", ".parquet"})
HEAD_BYTES = 1 << 16
CLAUDE_CODE_KEYS = frozenset({"parentUuid", "sessionId", "leafUuid", "isSidechain"})
CLAUDE_CODE_BOOKKEEPING = frozenset({"file-history-snapshot", "summary", "queue-operation"})
CLINE_HISTORY = "api_conversation_history.json"
CLINE_COMPANIONS = ("ui_messages.json", "task_metadata.json")
AIDER_HISTORY = ".aider.chat.history.md"
AIDER_HEAD = "# aider chat started at"
SIDECAR_SUFFIX = ".meta.json"  # Claude Code >= 2.1.2: subagents/agent-<id>.meta.json beside each transcript
# A key in raw JSON text (not one inside a string, where its quotes would be escaped).
_LIST_KEY = re.compile(r'(?<!\\)"(trajectory|history|attempts|messages)"\s*:\s*\[')


def is_trace_file(path: Path) -> bool:
    """Whether a directory walk reads `path`: trace suffixes, plus Aider's dotfile history."""
    return path.suffix in TRACE_SUFFIXES or path.name.endswith(AIDER_HISTORY)


def detect_format(path: str | Path) -> str:
    """The format of one trace file from its name and contents (never reads more than its head).

    The first JSONL records, or the first item of a document's event/message list, decide: what
    the items look like, not only which top-level key holds them.
    """
    path = Path(path)
    by_name = _format_by_name(path)
    if by_name is not None:
        return by_name
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if not head:
        raise TraceFormatError(path, 1, "empty_file")
    if path.suffix == ".md" and head.startswith(AIDER_HEAD):
        return "aider"
    lines = head.split("\n")
    for line in lines[:-1] if len(lines) > 1 else lines:  # the last piece may be cut by HEAD_BYTES
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # not JSONL (a pretty-printed document) or a line longer than the head
        found = _classify(record, document=False)
        if found is not None:
            return found
        if not isinstance(record, dict):
            break
    found = _classify_document_head(head)
    if found is not None:
        return found
    raise TraceFormatError(path, None, "unknown_format", f"none of {', '.join(FORMATS)}")


def _format_by_name(path: Path) -> str | None:
    if path.suffix == ".traj":
        return "swe_agent"
    if path.suffix == ".parquet":
        return "openai"  # labelled trajectory datasets: rows of OpenAI-format messages
    if path.name == CLINE_HISTORY:
        return "cline"
    if path.name.endswith(AIDER_HISTORY):
        return "aider"
    return None


def _classify(value: Any, *, document: bool) -> str | None:
    """The format a parsed JSONL record (or whole document) belongs to, from what it holds."""
    if isinstance(value, list):
        first = next((item for item in value if item), None)
        if isinstance(first, dict | list):
            return _classify_event(first, document=True)
        return None
    if not isinstance(value, dict):
        return None
    if CLAUDE_CODE_KEYS & value.keys() or value.get("type") in CLAUDE_CODE_BOOKKEEPING:
        return "claude_code"
    if value.get("type") in CODEX_TYPES and "payload" in value:
        return "codex"
    if not document and (is_legacy_meta(value) or value.get("record_type") == "state"):
        return "codex"  # an earlier codex-rs rollout: bare SessionMeta first, `state` bookkeeping lines
    if document and isinstance(value.get("session"), dict) and isinstance(value.get("items"), list):
        return "codex"  # the TypeScript Codex CLI's rollout document
    if isinstance(value.get("messages"), list):
        return "openai"
    if isinstance(value.get("attempts"), list):
        return "swe_agent"
    for key in ("trajectory", "history"):
        items = value.get(key)
        if isinstance(items, str) and not document:
            return "openai"  # a labelled row holding its messages as JSON text
        if isinstance(items, list):
            first = next((item for item in items if item), None)
            if first is None:
                return "swe_agent" if document else "openai"
            return _classify_event(first, document=document)
    return None


def _classify_event(item: Any, *, document: bool) -> str:
    """OpenHands events carry `source` + `action`/`observation`; OpenAI messages a `role`."""
    if isinstance(item, list):  # older OpenHands evaluation history: [action, observation] pairs
        return "openhands"
    if isinstance(item, dict) and "source" in item and ("action" in item or "observation" in item):
        return "openhands"
    if isinstance(item, dict) and "role" in item and not document:
        return "openai"
    return "swe_agent"


def _classify_document_head(head: str) -> str | None:
    """A pretty-printed document's format from the first item of its list (decoded from the head)."""
    try:
        return _classify(json.loads(head), document=True)  # a small document read whole
    except json.JSONDecodeError:
        pass
    first_line = head.split("\n", 1)[0]
    if head.startswith("{") and any(f'"{key}"' in first_line for key in CLAUDE_CODE_KEYS):
        return "claude_code"  # a JSONL record longer than the head
    if head.startswith("{") and re.match(r'\{\s*"timestamp"\s*:\s*"[^"]*"\s*,\s*"type"\s*:\s*"(\w+)"', head):
        return "codex"
    if re.match(r'\{\s*"id"\s*:\s*"[^"]*"\s*,\s*"timestamp"\s*:\s*"[^"]*"\s*,\s*"instructions"\s*:', head):
        return "codex"  # an earlier codex-rs SessionMeta line longer than the head (long instructions)
    if re.match(r'\{\s*"session"\s*:\s*\{', head):
        return "codex"  # a TypeScript Codex CLI rollout document longer than the head
    if head.startswith("["):
        start: int | None = 1
        key = None
    else:
        match = _LIST_KEY.search(head)
        start, key = (match.end(), match.group(1)) if match else (None, None)
    if key == "attempts":
        return "swe_agent"
    if key == "messages":
        return "openai"
    if start is not None:
        rest = head[start:].lstrip(" \t\r\n")
        try:
            first, _ = json.JSONDecoder().raw_decode(rest)
            return _classify_event(first, document=True)
        except json.JSONDecodeError:  # the first item is longer than the head: judge by its keys
            if re.search(r'(?<!\\)"source"\s*:', rest) and re.search(r'(?<!\\)"(action|observation)"\s*:', rest):
                return "openhands"
            return "swe_agent" if key is not None else None
    return None


_READERS = {
    "openhands": read_openhands,
    "swe_agent": read_swe_agent,
    "openai": read_openai,
    "codex": read_codex,
    "aider": read_aider,
}


@dataclass
class _Group:
    """Files read together: a trace (or the files of one resumed Claude Code session) and what rides along."""

    mains: list[Path]
    companions: list[Path] = field(default_factory=list)  # Claude Code subagent transcripts
    sidecars: list[Path] = field(default_factory=list)  # agent-<id>.meta.json, Cline's ui_messages.json...


class TraceIngester:
    """Streams `TraceExample`s out of trace files or directories of them, in any of `FORMATS`.

    Lenient by default: what can be repaired is, what cannot is skipped, and both are counted
    in `report.issues`. With `strict=True` the first such problem raises `TraceFormatError`
    naming the file and line. `report` accumulates over every `ingest` call of this ingester.
    `progress`, if given, is called with the number of bytes consumed since its last call.

    Directory layouts: a Claude Code session's `<session>/**/*.jsonl` subagent transcripts (at
    any depth) and their `*.meta.json` sidecars are read with the session; Claude Code files that
    start with the same entry (a resumed, continued or forked session replays the old history
    with the same uuids) are read as one tree, so each record is ingested once; a Cline task
    folder's `ui_messages.json` and `task_metadata.json` are read with its history.
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
        for group in self._groups(path):
            for example in self._ingest_group(group):
                self.report.count_example(example)
                yield example

    def _ingest_group(self, group: _Group) -> Iterator[TraceExample]:
        formats = [self._format_of(main) for main in group.mains]
        mains = [m for m, f in zip(group.mains, formats, strict=True) if f is not None]
        if not mains:
            return
        fmt = next(f for f in formats if f is not None)
        contexts = [self._context(m, fmt) for m in mains]
        if fmt == "claude_code":
            subagents = [self._context(p, fmt) for p in group.companions]
            sidecars = [self._context(p, fmt, counted=False) for p in group.sidecars]
            yield from read_claude_code(contexts, subagents, sidecars)
        elif fmt == "cline":
            yield from read_cline(contexts[0], [self._context(p, fmt, counted=False) for p in group.sidecars])
        else:
            for ctx in contexts:
                yield from _READERS[fmt](ctx)

    def _context(self, path: Path, fmt: str, *, counted: bool = True) -> FileContext:
        if counted:
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

    def _groups(self, path: Path) -> Iterator[_Group]:
        """Each trace file once, in a stable order, with the files that belong to it."""
        if path.is_file():
            if path.name.endswith(SIDECAR_SUFFIX) or path.name in CLINE_COMPANIONS:
                self.report.add_normalized(None, "sidecar_skipped")  # read with its transcript, not alone
                return
            yield _attached(path)
            return
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and is_trace_file(p)
            and not any(part.startswith(".") for part in p.relative_to(path).parent.parts)
            and (not p.name.startswith(".") or p.name.endswith(AIDER_HISTORY))
        )
        groups = [_attached(f) for f in files]
        claimed = {p for g in groups for p in (*g.companions, *g.sidecars)}
        groups = [g for g in groups if g.mains[0] not in claimed]
        for file in files:
            if file not in claimed and (file.name.endswith(SIDECAR_SUFFIX) or file.name in CLINE_COMPANIONS):
                claimed.add(file)
                self.report.add_normalized(None, "sidecar_without_transcript")
        yield from _merge_resumed(g for g in groups if g.mains[0] not in claimed)


def _attached(path: Path) -> _Group:
    """A file with what rides along: a Claude Code session's folder, a Cline task's other files."""
    if path.name == CLINE_HISTORY:
        return _Group([path], sidecars=[path.parent / n for n in CLINE_COMPANIONS if (path.parent / n).is_file()])
    if path.suffix != ".jsonl":
        return _Group([path])
    folder = path.with_suffix("")
    if not folder.is_dir():
        return _Group([path])
    return _Group(
        [path],
        companions=sorted(folder.rglob("*.jsonl")),
        sidecars=sorted(p for p in folder.rglob("*" + SIDECAR_SUFFIX) if p.is_file()),
    )


def _merge_resumed(groups: Iterator[_Group]) -> Iterator[_Group]:
    """Claude Code files whose first entry has the same uuid are one conversation: read them together."""
    merged: list[_Group] = []
    by_first: dict[str, _Group] = {}
    for group in groups:
        first = _first_claude_code_uuid(group.mains[0]) if group.mains[0].suffix == ".jsonl" else None
        if first is not None and first in by_first:
            kept = by_first[first]
            kept.mains += group.mains
            kept.companions += group.companions
            kept.sidecars += group.sidecars
            continue
        if first is not None:
            by_first[first] = group
        merged.append(group)
    yield from merged


def _first_claude_code_uuid(path: Path) -> str | None:
    """The uuid of a Claude Code file's first conversation entry, from its head; None for other files."""
    try:
        with path.open("rb") as handle:
            head = handle.read(HEAD_BYTES)
    except OSError:
        return None
    for raw in head.split(b"\n")[:-1]:
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict) or not CLAUDE_CODE_KEYS & record.keys():
            if isinstance(record, dict) and record.get("type") in CLAUDE_CODE_BOOKKEEPING:
                continue
            return None
        if isinstance(record.get("uuid"), str) and record.get("type") in ("user", "assistant", "system"):
            return record["uuid"]
    return None
