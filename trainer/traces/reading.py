"""Defensive reading of raw trace files: bytes -> text -> JSON records, every repair reported.

Real logs are written by crashing processes on many platforms: lines cut by power loss, records
glued without a newline, bytes that are not UTF-8, lone surrogate escapes, Windows mojibake.
The functions here fix what can be fixed, skip what cannot, and report both through a
`FileContext`, which counts (lenient) or raises `TraceFormatError` (strict).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .schema import ISSUE_REASONS, IngestReport, TraceFormatError

_DECODER = json.JSONDecoder()
_JSON_WHITESPACE = " \t\r\n"
# A \uD800-\uDFFF escape in raw JSON text: only lines holding one can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# UTF-8 lead bytes read as cp1252 ('Â', 'Ã', 'â', ...) followed by a continuation byte read as cp1252.
_MOJIBAKE = re.compile(
    "[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192"
    "\u02c6\u02dc\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a"
    "\u20ac\u2122]"
)


class FileContext:
    """Where one file's problems go: counted in the report (lenient) or raised (strict)."""

    def __init__(
        self, path: Path, fmt: str, report: IngestReport, *, strict: bool, progress: Callable[[int], None] | None = None
    ) -> None:
        self.path = path
        self.format = fmt
        self.report = report
        self.strict = strict
        self.progress = progress

    def problem(self, reason: str, detail: str = "", *, line: int | None = None, key: str | None = None) -> None:
        if reason not in ISSUE_REASONS:
            raise KeyError(f"unregistered issue reason {reason!r}")
        if self.strict:
            raise TraceFormatError(self.path, line, reason, detail, key=key)
        self.report.add_issue(self.format, reason)

    def normalized(self, what: str, n: int = 1) -> None:
        self.report.add_normalized(self.format, what, n)

    def lines_read(self, n: int = 1) -> None:
        self.report.add(self.format, lines=n)


def repair_text(text: str, problem: Callable[..., None], *, line: int | None = None, key: str | None = None) -> str:
    """Undo UTF-8-read-as-cp1252 mojibake ('â†’' -> '→') when the whole string round-trips."""
    if not _MOJIBAKE.search(text):
        return text
    try:
        repaired = text.encode("cp1252").decode("utf-8")
    except UnicodeError:
        return text  # mixed or genuine text: leave it alone
    problem("mojibake_repaired", f"{text[:40]!r}", line=line, key=key)
    return repaired


def _replace_lone_surrogates(value: Any) -> tuple[Any, bool]:
    """Swap lone surrogates for U+FFFD anywhere in a parsed JSON value; report whether any was found."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value, False
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), True
    if isinstance(value, list):
        changed = False
        for i, item in enumerate(value):
            value[i], hit = _replace_lone_surrogates(item)
            changed |= hit
        return value, changed
    if isinstance(value, dict):
        changed = False
        for k in list(value):
            item, hit = _replace_lone_surrogates(value[k])
            new_key, key_hit = _replace_lone_surrogates(k)
            if key_hit:
                del value[k]
            value[new_key] = item
            changed |= hit or key_hit
        return value, changed
    return value, False


def _decode_bytes(raw: bytes, ctx: FileContext, line: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        ctx.problem("invalid_utf8", f"byte {error.start}: {error.reason}", line=line)
        return raw.decode("utf-8", "replace")


def _resync_points(text: str, start: int) -> Iterator[int]:
    """Where a glued record may begin after garbage: a '{"' not nested in an object or array."""
    pos = text.find('{"', start)
    while pos != -1:
        before = text[:pos].rstrip(_JSON_WHITESPACE)
        if not before or before[-1] not in ":,[":
            yield pos
        pos = text.find('{"', pos + 1)


def _decode_line(text: str) -> tuple[list[Any], list[str], bool]:
    """All JSON values on one line, the fragments that did not parse, and whether the last one
    runs to the end of the line (a record cut off rather than garbage in the middle)."""
    values: list[Any] = []
    garbage: list[str] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in _JSON_WHITESPACE:
            pos += 1
        if pos == end:
            return values, garbage, False
        try:
            value, pos = _DECODER.raw_decode(text, pos)
            values.append(value)
            continue
        except json.JSONDecodeError:
            pass
        restart = next(_resync_points(text, pos + 1), None)
        garbage.append(text[pos:restart])
        if restart is None:
            return values, garbage, True
        pos = restart


def iter_jsonl(path: Path, ctx: FileContext) -> Iterator[tuple[int, dict[str, Any], int]]:
    """(line number, record, hash of the raw line) for every JSON object in a JSONL file, streaming.

    Memory holds one line at a time. Records glued on one line are split; a cut-off last line,
    undecodable bytes and lone surrogates are reported and repaired or skipped.
    """
    with path.open("rb") as handle:
        line_no = 0
        for raw in handle:
            line_no += 1
            ctx.lines_read()
            if ctx.progress is not None:
                ctx.progress(len(raw))
            terminated = raw.endswith(b"\n")
            raw = raw.rstrip(b"\r\n")
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                ctx.normalized("byte_order_mark")
            if not raw.strip():
                continue
            text = _decode_bytes(raw, ctx, line_no)
            values, garbage, cut_at_end = _decode_line(text)
            for i, fragment in enumerate(garbage):
                if cut_at_end and i == len(garbage) - 1 and not terminated:
                    ctx.problem("truncated_line", f"{len(fragment)} characters cut off", line=line_no)
                else:
                    ctx.problem("invalid_json", f"{fragment[:60]!r}", line=line_no)
            for _ in values[1:]:
                ctx.problem("glued_records", f"{len(values)} records on one line", line=line_no)
            digest = hash(raw)
            surrogates = _SURROGATE_ESCAPE.search(text) is not None
            for value in values:
                if surrogates:
                    value, changed = _replace_lone_surrogates(value)
                    if changed:
                        ctx.problem("lone_surrogate", line=line_no)
                if not isinstance(value, dict):
                    ctx.problem("invalid_record", f"expected a JSON object, got {type(value).__name__}", line=line_no)
                    continue
                yield line_no, value, digest


def load_json_document(path: Path, ctx: FileContext, *, expect: tuple[type, str] | None = None) -> Any | None:
    """A whole-file JSON document (OpenHands, SWE-agent), repaired like a JSONL line; None if unusable.

    `expect=(type, description)` also counts a document of another type as an invalid record.
    """
    raw = path.read_bytes()
    ctx.lines_read(raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1))
    if ctx.progress is not None:
        ctx.progress(len(raw))
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        ctx.normalized("byte_order_mark")
    text = _decode_bytes(raw, ctx, None)
    del raw
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        cut_short = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")
        reason = "truncated_line" if cut_short else "invalid_json"
        ctx.problem(reason, error.msg, line=error.lineno)
        return None
    if _SURROGATE_ESCAPE.search(text):
        value, changed = _replace_lone_surrogates(value)
        if changed:
            ctx.problem("lone_surrogate")
    if expect is not None and not isinstance(value, expect[0]):
        ctx.problem("invalid_record", f"expected {expect[1]}, got {type(value).__name__}")
        return None
    return value
