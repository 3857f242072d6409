"""`python -m trainer.traces ingest|mine`: outputs, summary table, exit status."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.paths import REPO
from tests.support.strict_json import read_strict_lines
from tests.support.traces_fixtures import ClaudeLog, basic_session, forked_session, openai_attempt, write_jsonl
from trainer.traces import TraceExample, TraceIngester
from trainer.traces.__main__ import main


def test_ingest_writes_examples_and_a_table_per_format(tmp_path, capsys):
    basic_session().write(tmp_path / "logs" / "s.jsonl")
    write_jsonl(tmp_path / "logs" / "chat.jsonl", [openai_attempt("A", "patch", True)])
    out = tmp_path / "examples.jsonl"
    assert main(["ingest", str(tmp_path / "logs"), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["format", "files", "lines", "examples", "messages", "tool_calls", "issues"]
    assert table[1].split() == ["claude_code", "1", "4", "1", "4", "1", "0"]
    assert table[2].split() == ["openai", "1", "1", "1", "5", "1", "0"]
    assert table[3].split() == ["total", "2", "5", "2", "9", "2", "0"]
    written = [TraceExample.from_dict(json.loads(line)) for line in out.read_text().splitlines()]
    assert written == list(TraceIngester().ingest(tmp_path / "logs"))  # lossless round trip


def test_a_nan_in_a_log_is_written_as_null_so_the_output_is_strict_json(tmp_path):
    log = ClaudeLog("sess-nan")
    log.user("u1", "Read the file")
    log.assistant("a1", "Reading.", tool_uses=(("toolu_1", "Read", {"path": "a.py", "limit": float("nan")}),))
    log.tool_result("r1", "toolu_1", "x = 1")
    path = log.write(tmp_path / "logs" / "s.jsonl")
    assert b"NaN" in path.read_bytes()  # Python's reader takes it; the log is what a tool wrote
    out = tmp_path / "examples.jsonl"
    assert main(["ingest", str(path), "--out", str(out)]) == 0
    (example,) = read_strict_lines(out)
    (call,) = [c for m in example["messages"] for c in m.get("tool_calls") or []]
    assert call["arguments"] == {"path": "a.py", "limit": None, "limit_reason": "nan"}


def test_mine_writes_trl_style_pairs_and_rewards(tmp_path, capsys):
    forked_session(tmp_path / "logs", refuse=True, interrupt=True)
    pairs, rewards = tmp_path / "pairs.jsonl", tmp_path / "rewards.jsonl"
    assert main(["mine", str(tmp_path / "logs"), "--out", str(pairs), "--rewards", str(rewards)]) == 0
    (pair,) = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert [m["content"] for m in pair["prompt"]] == ["Hi", "Hello", "Rename foo to bar"]
    assert pair["rejected"][0]["tool_calls"] == [
        {"type": "function", "id": "t1", "function": {"name": "Edit", "arguments": {"old": "foo", "new": "bar"}}}
    ]
    assert pair["reason"] == "tool call refused by the user"
    (reward,) = [json.loads(line) for line in rewards.read_text().splitlines()]
    assert reward == {
        "example_id": "claude_code:sess-1:i1",
        "reward": -1.0,
        "signals": {"refusals": 1, "interruptions": 1},
    }
    assert "pairs: 1 (outcome 0, fork 1, self_correction 0)" in capsys.readouterr().out


def test_strict_failure_exits_non_zero_and_leaves_no_output(tmp_path, capsys):
    log = basic_session()
    log.entries[2]["parentUuid"] = "gone"
    path = log.write(tmp_path / "broken.jsonl")
    out = tmp_path / "examples.jsonl"
    assert main(["ingest", str(path), "--out", str(out), "--strict"]) == 1
    assert f"{path}:3: dangling_parent" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [path]  # neither the output nor a partial file
    assert main(["ingest", str(path), "--out", str(out)]) == 0  # lenient: repaired and counted


def test_nothing_readable_exits_non_zero(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["ingest", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "no example could be read" in captured.err and "empty_file" in captured.out
    assert main(["ingest", str(tmp_path / "missing")]) == 1


def test_module_entry_point(tmp_path):
    path = basic_session().write(tmp_path / "s.jsonl")
    result = subprocess.run(
        [sys.executable, "-m", "trainer.traces", "ingest", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split() == ["total", "1", "4", "1", "4", "1", "0"]


def test_progress_reports_every_byte_read(tmp_path):
    basic_session().write(tmp_path / "s.jsonl")
    write_jsonl(tmp_path / "chat.jsonl", [openai_attempt("A", "patch", True)] * 3)
    (tmp_path / "run.traj").write_text(json.dumps({"history": [{"role": "user", "content": "x"}]}, indent=2))
    seen: list[int] = []
    list(TraceIngester(progress=seen.append).ingest(tmp_path))
    assert sum(seen) == sum(p.stat().st_size for p in tmp_path.iterdir())
