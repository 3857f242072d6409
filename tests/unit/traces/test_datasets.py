"""Outcome-labelled trajectory datasets (JSONL and Parquet) and `--outcomes` verdict files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.traces_fixtures import basic_session, labelled_rows, write_jsonl
from trainer.traces import TraceIngester, mine_pairs
from trainer.traces.__main__ import main
from trainer.traces.outcomes import load_outcomes

INSTANCES, ATTEMPTS = 50, 24  # 1,200 rows: 12 resolved and 12 unresolved attempts per instance


def check_outcome_pairs(path, *, cap):
    ingester = TraceIngester(strict=True)
    miner = mine_pairs(ingester.ingest(path), max_pairs_per_task=cap)
    pairs = list(miner)
    assert ingester.report.examples == INSTANCES * ATTEMPTS and ingester.report.lines == INSTANCES * ATTEMPTS
    per_instance = {}
    for pair in pairs:
        assert pair.source == "outcome"
        assert pair.prompt[1].content == pair.reason.replace("resolved vs unresolved on ", "Fix issue ")
        per_instance[pair.reason] = per_instance.get(pair.reason, 0) + 1
        good = int(pair.chosen[0].content.split()[1].rstrip("."))
        bad = int(pair.rejected[0].content.split()[1].rstrip("."))
        assert good % 2 == 0 and bad % 2 == 1  # resolved attempts are the even ones
    assert per_instance == {f"resolved vs unresolved on demo__repo-{i}": cap for i in range(INSTANCES)}
    # Per instance: 12 x 12 = 144 possible pairs; once `cap` are made the rest are counted, not held.
    assert miner.skipped["over_max_pairs_per_task"] > 0 and set(miner.skipped) == {"over_max_pairs_per_task"}
    return pairs


def test_labelled_jsonl_gives_outcome_pairs_per_instance(tmp_path):
    path = write_jsonl(tmp_path / "trajectories.jsonl", labelled_rows(INSTANCES, ATTEMPTS))
    pairs = check_outcome_pairs(path, cap=4)
    assert len(pairs) == INSTANCES * 4


def test_labelled_parquet_gives_the_same_pairs_as_jsonl(tmp_path):
    rows = labelled_rows(INSTANCES, ATTEMPTS, as_json_text=True)  # trajectory as JSON text, resolved as 0/1
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "trajectories.parquet", row_group_size=100)
    from_parquet = check_outcome_pairs(tmp_path / "trajectories.parquet", cap=3)
    from_jsonl = check_outcome_pairs(write_jsonl(tmp_path / "t.jsonl", labelled_rows(INSTANCES, ATTEMPTS)), cap=3)
    assert [(p.prompt, p.chosen, p.rejected) for p in from_parquet] == [
        (p.prompt, p.chosen, p.rejected) for p in from_jsonl
    ]


def test_parquet_rows_stream_in_batches_and_strict_names_the_row(tmp_path):
    rows = labelled_rows(2, 2)
    rows[3]["trajectory"] = "not json"
    rows = [
        {**r, "trajectory": r["trajectory"] if isinstance(r["trajectory"], str) else json.dumps(r["trajectory"])}
        for r in rows
    ]
    path = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=r"broken.parquet:4 \[trajectory\]: invalid_json"):
        list(TraceIngester(strict=True).ingest(path))
    ingester = TraceIngester()
    assert len(list(ingester.ingest(path))) == 3 and ingester.report.issues == {"invalid_json": 1}


def test_outcomes_file_attaches_verdicts_to_traces_that_lack_them(tmp_path, capsys):
    first, second = basic_session("run-good"), basic_session("run-bad")
    second.entries[3]["message"]["content"][0]["text"] = "Two tests fail."
    for entry in second.entries:  # real sessions never share uuids (files that do are one resumed session)
        entry["uuid"] = "b-" + entry["uuid"]
        entry["parentUuid"] = entry["parentUuid"] and "b-" + entry["parentUuid"]
    first.write(tmp_path / "logs" / "run-good.jsonl")
    second.write(tmp_path / "logs" / "run-bad.jsonl")
    verdicts = write_jsonl(
        tmp_path / "outcomes.jsonl",
        [
            {"id": "run-good", "instance_id": "task-1", "resolved": True},
            {"id": "run-bad", "instance_id": "task-1", "resolved": False},
        ],
    )
    out = tmp_path / "pairs.jsonl"
    assert main(["mine", str(tmp_path / "logs"), "--outcomes", str(verdicts), "--out", str(out)]) == 0
    (pair,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (pair["source"], pair["reason"]) == ("outcome", "resolved vs unresolved on task-1")
    assert pair["chosen"][-1]["content"] == "All 3 tests pass." and pair["rejected"][-1]["content"] == "Two tests fail."
    printed = capsys.readouterr().out
    assert "pairs: 1 (outcome 1, fork 0, self_correction 0)" in printed and "2 examples" in printed


def test_outcome_files_of_every_shape_and_their_errors(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"resolved_ids": ["a"], "unresolved_ids": ["b"], "error_ids": ["c"]}))
    assert load_outcomes(report).verdicts == {"a": (True, "a"), "b": (False, "b"), "c": (False, "c")}
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"s1": True, "s2": {"resolved": False, "instance_id": "t"}}))
    assert load_outcomes(mapping).verdicts == {"s1": (True, None), "s2": (False, "t")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "resolved": true}\n{"id": "y", "resolved": "yes"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a boolean `resolved`"):
        load_outcomes(bad)
