"""`python -m trainer.traces ingest|mine PATH...`: read agent logs, write examples or pairs, print a summary.

Progress goes to stderr (tqdm, over input bytes), the summary table to stdout. The exit status is
non-zero only when strict mode meets a problem or when nothing at all could be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.checkpoint import atomic_write, strict_json

from .ingest import TraceIngester, is_trace_file
from .mining import PAIR_KINDS, PairMiner, mine_pairs
from .outcomes import load_outcomes
from .render import hf_messages
from .schema import FORMATS, ISSUE_REASONS, IngestReport, TraceExample, TraceFormatError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    total_bytes = sum(_input_bytes(Path(p)) for p in args.paths)
    with tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc=args.command, file=sys.stderr, delay=0.5, disable=None
    ) as bar:
        ingester = TraceIngester(args.format, strict=args.strict, progress=bar.update)
        try:
            if args.command == "ingest":
                _write_jsonl(args.out, (e.to_dict() for e in _examples(ingester, args.paths)))
                miner = None
            else:
                examples = _examples(ingester, args.paths)
                if args.outcomes is not None:
                    outcomes = load_outcomes(args.outcomes)
                    examples = outcomes.attach(examples)
                miner = mine_pairs(examples, max_pairs_per_task=args.max_pairs_per_task)
                _write_jsonl(args.out, (_pair_record(p) for p in miner))
                _write_jsonl(args.rewards, (vars(r) for r in miner.rewards.values()))
        except (TraceFormatError, FileNotFoundError, ValueError) as error:
            bar.close()
            print(f"error: {error}", file=sys.stderr)
            return 1
    print(_summary(ingester.report))
    if miner is not None:
        print(_mining_summary(miner))
        if getattr(args, "outcomes", None) is not None:
            print(f"outcomes attached from {args.outcomes}: {outcomes.attached} examples")
    if ingester.report.examples == 0:
        print("error: no example could be read from " + ", ".join(args.paths), file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.traces", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("ingest", "turn traces into TraceExample JSONL"),
        ("mine", "mine preference pairs (and per-example rewards) from traces"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("paths", nargs="+", metavar="PATH", help="trace files or directories")
        command.add_argument("--format", default="auto", choices=("auto", *FORMATS))
        command.add_argument("--out", type=Path, help="JSONL file to write (examples or pairs)")
        command.add_argument("--strict", action="store_true", help="stop at the first problem, naming file and line")
    mine = commands.choices["mine"]
    mine.add_argument("--rewards", type=Path, help="JSONL file for per-example rewards from unpaired signals")
    mine.add_argument("--max-pairs-per-task", type=int, default=16)
    mine.add_argument(
        "--outcomes",
        type=Path,
        help="resolved/unresolved per id (harness report JSON, id -> bool JSON, or JSONL rows) for traces that lack it",
    )
    return parser


def _input_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and is_trace_file(p))
    return 0


def _examples(ingester: TraceIngester, paths: list[str]) -> Iterator[TraceExample]:
    for path in paths:
        yield from ingester.ingest(path)


def _pair_record(pair: Any) -> dict[str, Any]:
    """TRL's conversational preference layout: prompt/chosen/rejected as chat-template messages."""
    return {
        "id": pair.id,
        "source": pair.source,
        "reason": pair.reason,
        "chosen_example_id": pair.chosen_example_id,
        "rejected_example_id": pair.rejected_example_id,
        "prompt": hf_messages(pair.prompt),
        "chosen": hf_messages(pair.chosen),
        "rejected": hf_messages(pair.rejected),
    }


def _write_jsonl(path: Path | None, records: Iterable[dict[str, Any]]) -> None:
    """Stream records to `path` (atomically, `trainer.checkpoint.atomic_write`: a partial file never
    has the final name; each line strict JSON, `trainer.checkpoint.strict_json`: a NaN a log carried
    is written as null); drain if None."""
    if path is None:
        for _ in records:
            pass
        return

    def stream(partial: Path) -> None:
        with partial.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(strict_json(record, ensure_ascii=False) + "\n")

    atomic_write(path, stream)


def _summary(report: IngestReport) -> str:
    columns = ("files", "lines", "examples", "messages", "tool_calls")
    rows = [
        (name, *(getattr(r, c) for c in columns), sum(r.issues.values()))
        for name, r in sorted(report.by_format.items())
    ]
    rows.append(("total", *(getattr(report, c) for c in columns), sum(report.issues.values())))
    header = ("format", *columns, "issues")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    for title, counts in (
        ("issues (skipped or repaired)", report.issues),
        ("normalized (by design)", report.normalized),
    ):
        if counts:
            lines += ["", f"{title}:"]
            lines += [
                f"  {reason:<26} {n:>8}  {ISSUE_REASONS.get(reason, '')}".rstrip()
                for reason, n in sorted(counts.items())
            ]
    return "\n".join(lines)


def _mining_summary(miner: PairMiner) -> str:
    by_source = ", ".join(f"{kind} {miner.by_source.get(kind, 0)}" for kind in PAIR_KINDS)
    lines = [
        "",
        f"pairs: {sum(miner.by_source.values())}" + (f" ({by_source})" if by_source else ""),
        f"per-example rewards: {len(miner.rewards)}",
    ]
    if miner.skipped:
        lines.append("not paired: " + ", ".join(f"{k} {v}" for k, v in sorted(miner.skipped.items())))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
