"""Memory and speed of `trainer.traces` on generated Claude Code logs up to 1 GB.

1. Memory stays flat with file size. Each log is generated in a temporary directory in the
   shape of real Claude Code sessions (API messages split over lines, tool results repeated in
   the `toolUseResult` side channel, a 2 MB base64 screenshot every 10th turn), ingested in a
   fresh process, and deleted. The peak resident set (ru_maxrss) of that process is compared
   across sizes, in two layouts:
   - many sessions per file: a session is complete when the next begins, so memory follows
     the largest session;
   - one session filling the whole file: the whole tree is held, but only its conversation
     text; base64 payloads and side channels are dropped while streaming.
2. The training worker's path, `mine_pairs(TraceIngester().ingest(path))` then `render_pair`,
   on a file of forked sessions: pairs per second and milliseconds per rendered pair.
3. Outcome-labelled trajectory datasets (SWE-rebench-style rows: `instance_id`, `trajectory`,
   `resolved`, `exit_status`) as JSONL and as Parquet, 1,000 to 50,000 rows over 200 instances:
   `mine_pairs` in a fresh process, peak RSS against the number of rows.

Writes bench/results/traces.md and traces.json. Run from the repo root:
`.venv/bin/python bench/bench_traces.py` (`--datasets-only` re-measures part 3 and keeps the rest).
"""

from __future__ import annotations

import base64
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

MB = 1024 * 1024
MANY_SESSION_SIZES_MB = (128, 512, 1024)
ONE_SESSION_SIZES_MB = (128, 1024)
TURNS_PER_SESSION = 40
IMAGE_EVERY = 10
IMAGE = base64.b64encode(bytes(range(256)) * (2 * MB // 256 * 3 // 4)).decode()  # ~2 MB of base64
FILE_TEXT = "".join(f"{i:5d}\u2192    value_{i} = compute(value_{i - 1})  # step {i}\n" for i in range(160))
FORK_SESSIONS = 300
DATASET_INSTANCES = 200
DATASET_ROWS = (1_000, 10_000, 50_000)
TOOL_OUTPUT = "".join(f"{i:4d}: line {i} of the file under edit\n" for i in range(60))  # ~2 KB per row

MINE_CHILD = """
import json, resource, sys, time
from trainer.traces import TraceIngester, mine_pairs
start = time.perf_counter()
ingester = TraceIngester(strict=True)
miner = mine_pairs(ingester.ingest(sys.argv[1]), max_pairs_per_task=16)
pairs = sum(1 for _ in miner)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": ingester.report.lines, "examples": ingester.report.examples, "pairs": pairs,
                  "skipped": dict(miner.skipped)}))
"""

INGEST_CHILD = """
import json, resource, sys, time, tracemalloc
from trainer.traces import TraceIngester
if sys.argv[2] == "trace":
    tracemalloc.start()
start = time.perf_counter()
ingester = TraceIngester()
examples = largest = 0
for example in ingester.ingest(sys.argv[1]):
    examples += 1
    largest = max(largest, sum(len(m.content) + len(m.reasoning) for m in example.messages))
    del example
seconds = time.perf_counter() - start
report = ingester.report
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "python_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20,
                  "examples": examples, "messages": report.messages, "lines": report.lines,
                  "issues": sum(report.issues.values()), "largest_example_text_mb": largest / 2**20,
                  "images_omitted": report.normalized.get("image_omitted", 0)}))
"""
BASELINE_CHILD = """
import json, resource
import trainer.traces
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _entry(session: str, uuid: str, parent: str | None, kind: str, clock: int, **fields) -> str:
    return json.dumps(
        {
            "parentUuid": parent,
            "isSidechain": False,
            "userType": "external",
            "cwd": "/work/project",
            "sessionId": session,
            "version": "2.0.46",
            "gitBranch": "main",
            "type": kind,
            "uuid": uuid,
            "timestamp": f"2025-11-19T{clock // 3600 % 24:02d}:{clock // 60 % 60:02d}:{clock % 60:02d}.000Z",
            **fields,
        },
        ensure_ascii=False,
    )


def _turn(session: str, turn: int, parent: str | None) -> tuple[list[str], str]:
    """One user prompt -> assistant (text + Read call, logged as two lines) -> result -> answer."""
    ids = [f"{session}-{turn}-{k}" for k in range(5)]
    clock = turn * 5
    content = [{"type": "text", "text": f"Turn {turn}: explain what step {turn} of the pipeline computes."}]
    if turn % IMAGE_EVERY == IMAGE_EVERY - 1:
        content.append({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}})
    usage = {"input_tokens": 3, "cache_read_input_tokens": 141272, "output_tokens": 365}
    message_id = f"msg_{session}_{turn}"
    lines = [
        _entry(session, ids[0], parent, "user", clock, message={"role": "user", "content": content}),
        _entry(
            session,
            ids[1],
            ids[0],
            "assistant",
            clock + 1,
            requestId=f"req_{turn}",
            message={
                "id": message_id,
                "role": "assistant",
                "model": "claude-sonnet-4-5-20250929",
                "usage": usage,
                "content": [
                    {"type": "thinking", "thinking": "I should read the file first.", "signature": "x" * 200},
                    {"type": "text", "text": "Let me read the pipeline module."},
                ],
            },
        ),
        _entry(
            session,
            ids[2],
            ids[1],
            "assistant",
            clock + 2,
            requestId=f"req_{turn}",
            message={
                "id": message_id,
                "role": "assistant",
                "model": "claude-sonnet-4-5-20250929",
                "usage": usage,
                "content": [
                    {
                        "type": "tool_use",
                        "id": f"toolu_{turn}",
                        "name": "Read",
                        "input": {"file_path": "/work/project/pipeline.py"},
                    }
                ],
            },
        ),
        _entry(
            session,
            ids[3],
            ids[2],
            "user",
            clock + 3,
            message={
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"toolu_{turn}", "content": FILE_TEXT}],
            },
            toolUseResult={
                "type": "text",
                "file": {
                    "filePath": "/work/project/pipeline.py",
                    "content": FILE_TEXT,
                    "numLines": 160,
                    "startLine": 1,
                    "totalLines": 160,
                },
            },
        ),
        _entry(
            session,
            ids[4],
            ids[3],
            "assistant",
            clock + 4,
            requestId=f"req_{turn}b",
            message={
                "id": f"{message_id}b",
                "role": "assistant",
                "model": "claude-sonnet-4-5-20250929",
                "usage": usage,
                "content": [{"type": "text", "text": f"Step {turn} adds one to the previous value."}],
            },
        ),
    ]
    return lines, ids[4]


def generate(path: Path, size_mb: int, *, one_session: bool) -> None:
    target = size_mb * MB
    written = session_no = 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target:
            session, parent = f"session-{session_no:05d}", None
            turn = 0
            while written < target and (one_session or turn < TURNS_PER_SESSION):
                lines, parent = _turn(session, turn, parent)
                block = "\n".join(lines) + "\n"
                handle.write(block)
                written += len(block.encode("utf-8"))
                turn += 1
            session_no += 1


def run_child(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def memory_rows(workdir: Path) -> list[dict]:
    rows = []
    for one_session, sizes in ((False, MANY_SESSION_SIZES_MB), (True, ONE_SESSION_SIZES_MB)):
        for size in sizes:
            path = workdir / "session.jsonl"
            generate(path, size, one_session=one_session)
            actual = path.stat().st_size
            try:
                measured = run_child(INGEST_CHILD, str(path), "plain")
                # A second pass under tracemalloc: what Python holds, free of allocator fragmentation.
                measured["python_peak_mb"] = run_child(INGEST_CHILD, str(path), "trace")["python_peak_mb"]
            finally:
                path.unlink()
            rows.append(
                {
                    "layout": "one session" if one_session else "many sessions",
                    "file_mb": actual / MB,
                    "mb_per_s": actual / MB / measured["seconds"],
                    **measured,
                }
            )
            print(
                f"{rows[-1]['layout']:>13} {actual / MB:7.0f} MB: peak RSS {measured['peak_rss_mb']:6.1f} MB, "
                f"Python peak {measured['python_peak_mb']:6.1f} MB, {rows[-1]['mb_per_s']:5.1f} MB/s, "
                f"{measured['examples']} examples",
                flush=True,
            )
    return rows


def pairs_row(workdir: Path) -> dict:
    from tests.support.traces_fixtures import ClaudeLog
    from trainer.model import tiny_model_and_tokenizer
    from trainer.traces import TraceIngester, mine_pairs, render_pair

    lines: list[bytes] = []
    for n in range(FORK_SESSIONS):  # each: a prompt answered, interrupted, rewound and answered again
        log = ClaudeLog(f"fork-{n}")
        log.user("u0", "Hi " * 50)
        log.assistant("a0", "Hello, what should I work on? " * 10)
        log.user("u1", f"Rename symbol_{n} everywhere in the package " * 5)
        log.assistant(
            "a1",
            "Rewriting every file from scratch. " * 20,
            tool_uses=(("t1", "Bash", {"command": "rm -rf src && git init"}),),
        )
        log.tool_result("r1", "t1", "The user doesn't want to proceed with this tool use.", is_error=True)
        log.user("i1", "[Request interrupted by user for tool use]")
        log._clock += 600
        log.user("u1b", f"Rename symbol_{n} everywhere in the package " * 5, parent="a0")
        log.assistant(
            "a1b",
            "Using a targeted sed. " * 20,
            tool_uses=(("t2", "Bash", {"command": f"sed -i s/symbol_{n}/renamed/ src/*.py"}),),
        )
        log.tool_result("r2", "t2", "")
        log.assistant("a2b", "Renamed in 12 files.")
        lines += log.lines()
    path = ClaudeLog().write(workdir / "forks.jsonl", lines)
    start = time.perf_counter()
    pairs = list(mine_pairs(TraceIngester().ingest(path)))
    mine_seconds = time.perf_counter() - start
    _, tokenizer = tiny_model_and_tokenizer(cache_dir=workdir / "tokenizer")
    start = time.perf_counter()
    tokens = [render_pair(pair, tokenizer, max_length=1024) for pair in pairs]
    render_seconds = time.perf_counter() - start
    return {
        "sessions": FORK_SESSIONS,
        "pairs": len(pairs),
        "file_mb": path.stat().st_size / MB,
        "ingest_and_mine_s": mine_seconds,
        "pairs_per_s": len(pairs) / mine_seconds,
        "render_ms_per_pair": 1000 * render_seconds / len(pairs),
        "mean_tokens_per_side": sum(len(t.chosen_ids) + len(t.rejected_ids) for t in tokens) / 2 / len(tokens),
    }


def generate_dataset(path: Path, rows: int) -> None:
    """JSONL or Parquet rows written a batch at a time (the generator never holds the dataset)."""
    from tests.support.traces_fixtures import labelled_row

    parquet = path.suffix == ".parquet"

    def batches():
        for start in range(0, rows, 1000):
            yield [
                labelled_row(n % DATASET_INSTANCES, n // DATASET_INSTANCES, as_json_text=parquet, output=TOOL_OUTPUT)
                for n in range(start, min(rows, start + 1000))
            ]

    if not parquet:
        with path.open("w", encoding="utf-8") as handle:
            for batch in batches():
                handle.write("".join(json.dumps(r) + "\n" for r in batch))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    for batch in batches():
        table = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


PYARROW_CHILD = """
import json, resource
import pyarrow.parquet, trainer.traces
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def dataset_rows(workdir: Path) -> list[dict]:
    results = []
    for suffix in (".jsonl", ".parquet"):
        for rows in DATASET_ROWS:
            path = workdir / f"trajectories{suffix}"
            generate_dataset(path, rows)
            size = path.stat().st_size
            try:
                measured = run_child(MINE_CHILD, str(path))
            finally:
                path.unlink()
            results.append({"file": suffix.lstrip("."), "file_mb": size / MB, **measured})
            print(
                f"{suffix:>8} {rows:6d} rows ({size / MB:6.1f} MB): peak RSS {measured['peak_rss_mb']:6.1f} MB, "
                f"{measured['pairs']} pairs, {measured['seconds']:.1f} s",
                flush=True,
            )
    return results


def write_report(baseline: dict, rows: list[dict], pairs: dict, datasets: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "baseline": baseline,
        "memory": rows,
        "pairs": pairs,
        "datasets": datasets,
    }
    (RESULTS / "traces.json").write_text(json.dumps(figures, indent=1) + "\n")
    many = [r for r in rows if r["layout"] == "many sessions"]
    growth = many[-1]["peak_rss_mb"] - many[0]["peak_rss_mb"]
    lines = [
        "# trace ingestion: memory and speed",
        "",
        f"`bench/bench_traces.py` on {figures['machine']} (CPU). Generated Claude Code logs: each turn is a",
        "prompt, an assistant message split over two lines (thinking + text, then a Read call), the tool result",
        "(also repeated in the `toolUseResult` side channel) and an answer; every 10th prompt carries a 2 MB",
        f"base64 screenshot. Sessions of {TURNS_PER_SESSION} turns (about 9 MB), or one session filling the file.",
        "Each file is ingested in a fresh process (peak RSS = `ru_maxrss`) and deleted afterwards.",
        f"Importing `trainer.traces` alone peaks at {baseline['peak_rss_mb']:.1f} MB.",
        "",
        "| layout | file (MB) | peak RSS (MB) | Python peak (MB) | MB/s | examples | messages "
        "| largest example text (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['layout']} | {r['file_mb']:.0f} | {r['peak_rss_mb']:.1f} | {r['python_peak_mb']:.1f} "
        f"| {r['mb_per_s']:.1f} | {r['examples']} | {r['messages']} | {r['largest_example_text_mb']:.2f} |"
        for r in rows
    ]
    lines += [
        "",
        "Python peak: the largest amount of memory Python objects held at once (tracemalloc, a second run).",
        "MB/s: wall time of the ingesting process on a 2-core machine that may be busy with other jobs; a rough",
        "figure, unlike the memory columns.",
        "",
        f"Many sessions: from {many[0]['file_mb']:.0f} MB to {many[-1]['file_mb']:.0f} MB of log the peak RSS moves by "
        f"{growth:+.1f} MB and Python's peak stays at {many[0]['python_peak_mb']:.1f} -> "
        f"{many[-1]['python_peak_mb']:.1f} MB: one session",
        "is held at a time (its tree is freed as soon as its examples are out), never the file.",
        "One session: the tree is held whole, so memory follows that session's conversation text (last column;",
        "Python stores the Read tool's '→' text at 2 bytes a character); screenshots and side channels are",
        "dropped while streaming and never held.",
        "",
        "## The training worker's path",
        "",
        f"{pairs['sessions']} forked sessions ({pairs['file_mb']:.1f} MB; each: a prompt answered with a refused",
        "call, rewound, answered again): `mine_pairs(TraceIngester().ingest(path))` then `render_pair`",
        "(tiny offline tokenizer, max_length 1024).",
        "",
        "| pairs | ingest + mine (s) | pairs/s | render_pair (ms/pair) | tokens per side |",
        "|---:|---:|---:|---:|---:|",
        f"| {pairs['pairs']} | {pairs['ingest_and_mine_s']:.2f} | {pairs['pairs_per_s']:.0f} | "
        f"{pairs['render_ms_per_pair']:.2f} | {pairs['mean_tokens_per_side']:.0f} |",
        "",
        "## Outcome-labelled datasets",
        "",
        "Rows shaped like SWE-rebench's OpenHands trajectories (`instance_id`, `trajectory` of OpenAI-format",
        f"messages with a ~2 KB tool output, `resolved`, `exit_status`), {DATASET_INSTANCES} instances, every",
        "other attempt resolved; Parquet rows hold the trajectory as JSON text and `resolved` as 0/1.",
        "`mine_pairs(TraceIngester(strict=True).ingest(path), max_pairs_per_task=16)` in a fresh process.",
        "",
        "| file | rows | file (MB) | peak RSS (MB) | pairs | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {d['file']} | {d['rows']} | {d['file_mb']:.1f} | {d['peak_rss_mb']:.1f} | {d['pairs']} "
        f"| {d['seconds']:.1f} |"
        for d in datasets
    ]
    pyarrow_mb = run_child(PYARROW_CHILD)["peak_rss_mb"]
    lines.append(
        f"\nImporting `pyarrow.parquet` with `trainer.traces` alone peaks at {pyarrow_mb:.1f} MB (Arrow's libraries)."
    )
    for kind in ("jsonl", "parquet"):
        rows_of = [d for d in datasets if d["file"] == kind]
        if rows_of:
            lines.append(
                f"\n{kind}: {rows_of[0]['rows']} -> {rows_of[-1]['rows']} rows moves peak RSS by "
                f"{rows_of[-1]['peak_rss_mb'] - rows_of[0]['peak_rss_mb']:+.1f} MB."
            )
    lines += [
        "",
        "Pairs come out as soon as both verdicts of an instance exist; at most 16 attempts per instance and",
        "verdict are held (zlib-compressed) and an instance's are freed once its 16 pairs are made. So memory",
        "follows the number of instances still open (here 200), not the number of rows: a dataset whose",
        "every row is a new instance would hold one compressed attempt per instance.",
        "",
    ]
    (RESULTS / "traces.md").write_text("\n".join(lines))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-traces-") as tmp:
        if "--datasets-only" in sys.argv[1:]:
            previous = json.loads((RESULTS / "traces.json").read_text())
            baseline, rows, pairs = previous["baseline"], previous["memory"], previous["pairs"]
        else:
            baseline = run_child(BASELINE_CHILD)
            rows = memory_rows(Path(tmp))
            pairs = pairs_row(Path(tmp))
        datasets = dataset_rows(Path(tmp))
    write_report(baseline, rows, pairs, datasets)
    print((RESULTS / "traces.md").read_text())


if __name__ == "__main__":
    main()
