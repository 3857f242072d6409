import json
import math
from html.parser import HTMLParser

import pytest

from tests.support.strict_json import read_strict, read_strict_lines
from trainer.metrics import (
    MetricsLog,
    compare_metrics,
    mean_and_error,
    plot_curves,
    read_metrics,
    reward_rise,
    run_summary,
    table_row,
)
from trainer.metrics import main as metrics_main
from trainer.run.placement import write_json


def test_mean_and_error_by_hand():
    mean, error = mean_and_error([0.2, 0.4, 0.6])
    assert math.isclose(mean, 0.4)
    assert math.isclose(error, math.sqrt(((0.04 + 0 + 0.04) / 2) / 3))
    assert math.isnan(mean_and_error([0.5])[1])


def test_reward_rise_compares_first_and_last_quarter():
    rounds = [[0.1, 0.3], [0.5, 0.5], [0.5, 0.5], [0.6, 0.8]]
    verdict = reward_rise(rounds)
    assert math.isclose(verdict["reward_first"], 0.2) and math.isclose(verdict["reward_last"], 0.7)
    error = math.sqrt(0.02 / 2)  # both windows: values 0.1 apart from their mean
    assert math.isclose(verdict["reward_rise_sigmas"], 0.5 / math.hypot(error, error))


def test_log_table_and_curves(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    for step in range(4):
        for replica in (0, 1):
            log.log(
                "inner",
                step=step,
                replica=replica,
                reward=0.1 * step,
                teacher_reward=0.5,
                grpo=0.0,
                sdpo=0.1,
                dpo=0.69,
                loss=0.8,
            )
    log.log("outer", outer_step=1, pseudo_grad_norm=0.3)
    log.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 9 and records[-1] == {"event": "outer", "outer_step": 1, "pseudo_grad_norm": 0.3}
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["event"] == "inner"
    plot_curves(tmp_path / "run" / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table_row((3, 0.25, None, 1.5e-5, 123.0)).split() == ["3", "0.2500", "-", "1.5e-05", "123.0"]


def test_compare_metrics_ignores_timings_and_names_every_other_difference(tmp_path):
    def write(path, reward, speed):
        log = MetricsLog(path)
        log.log("inner", step=0, reward=reward, tokens_per_s=speed, generation_s=1 / speed, loss_s=2 / speed)
        log.log("outer", outer_step=1, param_hash="ab", compute_s=[1 / speed], communication_s=[3 / speed])
        log.close()
        return path

    same = compare_metrics(write(tmp_path / "a.jsonl", 0.5, 100.0), write(tmp_path / "b.jsonl", 0.5, 250.0))
    assert same == []
    moved = compare_metrics(tmp_path / "a.jsonl", write(tmp_path / "c.jsonl", 0.5000000000000001, 100.0))
    assert moved == ["record 1 (inner): reward: 0.5 != 0.5000000000000001"]


def test_compare_takes_run_directories_and_names_a_path_without_metrics(tmp_path, capsys):
    for name, reward in (("a", 0.5), ("b", 0.25)):
        log = MetricsLog(tmp_path / name / "metrics.jsonl")
        log.log("inner", step=0, reward=reward)
        log.close()
    assert metrics_main(["compare", str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl")]) == 1
    assert "record 1 (inner): reward: 0.5 != 0.25" in capsys.readouterr().out
    assert metrics_main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no metrics.jsonl" in capsys.readouterr().err


def write_lives(path, lives):
    """A metrics.jsonl from one or more lives of a run: each a list of ("inner", step, reward) or
    ("outer", outer_step, hash) records; every life after the first starts with a resume marker."""
    for life, records in enumerate(lives):
        log = MetricsLog(path)
        if life:
            log.log("resume", outer_step=records[0][1] // 2)
        for event, position, value in records:
            if event == "inner":
                log.log("inner", step=position, rank=0, reward=value)
            else:
                log.log("outer", outer_step=position, param_hash=value)
        log.close()
    return path


def test_compare_reads_a_resumed_run_like_the_same_run_uninterrupted(tmp_path):
    first, second = [("inner", 0, 0.1), ("inner", 1, 0.2), ("outer", 1, "h1")], [("inner", 2, 0.3), ("inner", 3, 0.4)]
    whole = write_lives(tmp_path / "whole.jsonl", [first + second + [("outer", 2, "h2")]])
    # killed after step 2's line; the restart replays round 2 from the checkpoint of outer step 1
    resumed = write_lives(tmp_path / "resumed.jsonl", [first + second[:1], second + [("outer", 2, "h2")]])
    assert len(read_metrics(resumed)) == 8 and compare_metrics(whole, resumed) == []
    replayed_otherwise = write_lives(
        tmp_path / "other.jsonl", [first + second[:1], [("inner", 2, 0.31), ("inner", 3, 0.4), ("outer", 2, "h2")]]
    )
    assert compare_metrics(whole, replayed_otherwise) == ["record 4 (inner): reward: 0.3 != 0.31"]


def test_a_line_cut_short_by_a_crash_is_set_aside_when_the_run_reopens_its_metrics(tmp_path, capsys):
    path = write_lives(tmp_path / "metrics.jsonl", [[("inner", 0, 0.1), ("inner", 1, 0.2)]])
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"event": "inner", "step": 2, "rew')  # the crash
    log = MetricsLog(path)
    log.log("resume", outer_step=1)
    log.close()
    assert log.torn == "line 3 (34 bytes)"
    assert f"{path}: its last line, line 3 (34 bytes), was cut short" in capsys.readouterr().err
    assert [r["event"] for r in read_metrics(path)] == ["inner", "inner", "resume"]  # every line JSON again
    assert (tmp_path / "metrics.jsonl.torn").read_bytes() == b'{"event": "inner", "step": 2, "rew\n'  # nothing lost
    assert MetricsLog(path).torn is None  # a whole file is left as it is


def test_run_summary_reads_every_round_once_even_after_a_resume_repeated_one(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    rewards = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    for step in (0, 1, 2, 1, 2, 3):  # a crash after step 2's line; the resumed run logs 1 and 2 again
        for rank in (0, 1):
            skipped = step == 2 and rank == 1
            log.log("inner", step=step, round=step, rank=rank, replica=rank, reward=rewards[step], skipped=skipped)
    log.log("eval", outer_step=0, pass_at_1=0.25, pass_at_k=0.5, size=8, k=2)
    log.log("eval", outer_step=4, pass_at_1=0.5, pass_at_k=0.75, size=8, k=2)
    log.close()
    summary = run_summary(tmp_path / "metrics.jsonl")
    assert math.isclose(summary["reward_first"], 0.1) and math.isclose(summary["reward_last"], 0.4)
    assert (summary["skipped_steps"], summary["skipped_replica_steps"]) == (1, 1)
    assert (summary["eval_pass_at_1_first"], summary["eval_pass_at_1_last"]) == (0.25, 0.5)
    assert (summary["eval_pass_at_k_first"], summary["eval_pass_at_k_last"]) == (0.5, 0.75)


def test_paired_rise_counts_only_the_tasks_that_changed():
    from trainer.metrics import paired_rise

    before = [0, 0, 0, 0, 1, 1, 1, 0]
    after = [1, 1, 1, 1, 1, 1, 0, 0]  # 4 gained, 1 lost, 8 tasks
    rise, sigmas = paired_rise(before, after)
    assert math.isclose(rise, 3 / 8) and math.isclose(sigmas, (3 / 8) / (math.sqrt(5) / 8))
    assert math.isnan(paired_rise([1, 0], [1, 0])[1])


def test_paired_mean_rise_is_the_paired_t_statistic_of_per_task_pass_rates():
    from trainer.metrics import paired_mean_rise

    before = [0.0, 0.25, 0.5, 0.5, 1.0]
    after = [0.5, 0.75, 0.5, 1.0, 1.0]  # differences 0.5, 0.5, 0, 0.5, 0: mean 0.3, sample sd 0.27386
    rise, sigmas = paired_mean_rise(before, after)
    assert math.isclose(rise, 0.3) and math.isclose(sigmas, 0.3 / (math.sqrt(0.075) / math.sqrt(5)))
    assert math.isnan(paired_mean_rise([0.5, 0.5], [0.5, 0.5])[1])
    with pytest.raises(ValueError, match="evaluate the same"):
        paired_mean_rise([0.5], [0.5, 1.0])


def test_a_non_finite_value_is_logged_as_null_with_its_reason_and_the_file_is_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.log("inner", step=0, loss=float("nan"), grad_norm=float("inf"), reward=0.5, per_rank=[1.0, float("-inf")])
    log.close()
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    (record,) = read_strict_lines(path)
    assert record == dict(
        event="inner",
        step=0,
        loss=None,
        loss_reason="nan",
        grad_norm=None,
        grad_norm_reason="inf",
        reward=0.5,
        per_rank=[1.0, None],
    )


def test_a_reward_rise_with_no_variation_has_null_sigmas_and_says_why(tmp_path):
    flat = reward_rise([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    assert flat["reward_rise"] == 0.0
    assert (flat["reward_rise_sigmas"], flat["reward_rise_sigmas_reason"]) == (None, "no variation")
    single = reward_rise([[0.1], [0.9]])  # one step a span: no standard error at all
    assert (single["reward_rise_sigmas"], single["reward_rise_sigmas_reason"]) == (None, "one step per span")
    # the whole summary, as `make hub-standin` wrote it with "rise +0.0000 = nan sigma": strict JSON now
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(4):
        log.log("inner", step=step, round=step, rank=0, replica=0, reward=0.0, skipped=False)
    log.log("eval", outer_step=0, pass_at_1=0.0, pass_at_k=0.0, size=2, k=2, greedy_correct=[0, 0])
    log.log("eval", outer_step=4, pass_at_1=0.0, pass_at_k=0.5, size=2, k=2, greedy_correct=[0, 0])
    log.close()
    summary = run_summary(tmp_path / "metrics.jsonl")
    assert summary["reward_rise_sigmas"] is None and summary["reward_rise_sigmas_reason"] == "one step per span"
    assert summary["eval_pass_at_1_rise"] == 0.0
    assert (summary["eval_pass_at_1_rise_sigmas"], summary["eval_pass_at_1_rise_sigmas_reason"]) == (
        None,
        "no task changed",
    )
    write_json(tmp_path / "summary.json", summary)
    assert read_strict(tmp_path / "summary.json") == summary


# ----------------------------------------------------------------------------- the schema (issue 28)


def test_unnamed_keys_finds_a_key_or_a_record_kind_the_schema_does_not_name():
    from trainer.metrics import unnamed_keys

    named = {"event": "inner", "step": 0, "rank": 0, "reward": 0.5, "tool_calls/read_file": 2.0, "errors/bad_json": 0.0}
    assert unnamed_keys([named, {"event": "outer", "outer_step": 1, "bytes_sent": 10}]) == []
    assert unnamed_keys([{**named, "rewrad": 0.5}, {"event": "bogus", "x": 1}]) == ["bogus.*", "inner.rewrad"]
    assert unnamed_keys([{**named, "tool_calls/read_file/extra": 1.0}]) == ["inner.tool_calls/read_file/extra"]


def test_the_schema_command_prints_every_record_kind_and_every_field_with_its_unit(capsys):
    from trainer.metrics import SCHEMA, main

    assert main(["schema"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for event, fields in SCHEMA.items():
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{event}: "))
        block = lines[start + 1 : start + 1 + len(fields)]
        assert [line.split()[:3] for line in block] == [[name, f.kind, f.unit] for name, f in fields.items()]
    assert any(line.startswith("  reward ") and "fraction" in line for line in lines)
    assert any(line.startswith("  bytes_sent ") and "bytes" in line for line in lines)


def test_record_scalars_name_each_number_by_kind_rank_and_family():
    from trainer.metrics import record_scalars

    inner = dict(step=7, rank=1, replica=1, round=3, reward=0.25, teacher_reward=None, skipped=True, lr=1e-3)
    inner["tool_calls/run_tests"] = 2.0
    assert record_scalars("inner", inner) == (
        "inner",
        7,
        {
            "inner/reward/rank1": 0.25,
            "inner/skipped/rank1": 1.0,
            "inner/lr/rank1": 1e-3,
            "inner/tool_calls/run_tests/rank1": 2.0,
        },
    )
    outer = dict(outer_step=4, round=3, pseudo_grad_norm=0.5, bytes_sent=300, compute_s=[3.0, 1.0])
    outer |= dict(communication_s=[1.0, 3.0], param_hash="ab", replica_hashes=["ab", "ab"])
    assert record_scalars("outer", outer) == (
        "outer",
        4,
        {
            "outer/pseudo_grad_norm": 0.5,
            "outer/bytes_sent": 300.0,
            "outer/compute_s/rank0": 3.0,
            "outer/compute_s/rank1": 1.0,
            "outer/communication_s/rank0": 1.0,
            "outer/communication_s/rank1": 3.0,
            "outer/utilisation": 0.5,  # 4 s of compute in 8 s
        },
    )
    evaluation = dict(outer_step=0, round=0, pass_at_1=0.5, greedy_correct=[1, 0], teacher_logp={"partial": -2.0})
    assert record_scalars("eval", evaluation) == (
        "outer",
        0,
        {"eval/pass_at_1": 0.5, "eval/teacher_logp/partial": -2.0},
    )
    assert record_scalars("bogus", {"outer_step": 1, "x": 1.0}) is None


def test_curve_means_average_only_what_was_measured():
    from trainer.metrics import curve_means

    records = [
        dict(reward=0.25, teacher_reward=None, loss=1.0, dpo_reward_margin=0.5),
        dict(reward=0.75, teacher_reward=0.5, loss=3.0),  # no DPO pairs on this rank: no margin
    ]
    assert curve_means(records) == {
        "curves/reward": 0.5,
        "curves/teacher_reward": 0.5,
        "curves/loss": 2.0,
        "curves/dpo_reward_margin": 0.5,
    }


def test_a_broken_line_is_an_error_naming_the_file_and_line_or_is_counted_by_reason(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "inner", "step": 0}\n[1, 2]\n\n{"event": "outer", "outer_st')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: a JSON list, not an object"):
        read_metrics(path)
    broken = []
    assert read_metrics(path, broken) == [{"event": "inner", "step": 0}]
    assert broken == [
        "line 2: a JSON list, not an object",
        "line 4: not JSON (column 20: Unterminated string starting at)",
    ]


# ----------------------------------------------------------------------------- the report (issue 28)


def write_run(run_dir, *, seed, rewards, bytes_per_round=1000, finished=True, broken_tail=False):
    """A two-rank run as the worker writes it: inner records per step and rank, cumulative bytes."""
    log = MetricsLog(run_dir / "metrics.jsonl")
    log.log("eval", round=0, outer_step=0, pass_at_1=0.25, pass_at_k=0.5, sampled_reward=0.25, size=4, k=2)
    for round_index, reward in enumerate(rewards):
        for step in (2 * round_index, 2 * round_index + 1):
            for rank in (0, 1):
                log.log("inner", round=round_index, step=step, replica=rank, rank=rank, reward=reward + 0.1 * rank)
        log.log(
            "outer",
            outer_step=round_index + 1,
            round=round_index,
            pseudo_grad_norm=0.1,
            participants=2,
            bytes_sent=bytes_per_round * (round_index + 1),
            bytes_received=bytes_per_round * (round_index + 1),
            compute_s=[3.0, 3.0],
            communication_s=[1.0, 1.0],
        )
    log.log(
        "eval",
        round=len(rewards),
        outer_step=len(rewards),
        pass_at_1=0.75,
        pass_at_k=1.0,
        sampled_reward=0.5,
        size=4,
        k=2,
    )
    log.close()
    if broken_tail:
        with (run_dir / "metrics.jsonl").open("a") as file:
            file.write('{"event": "inner", "ste')
    (run_dir / "config.json").write_text(json.dumps({"name": "run", "seed": seed, "loss": {"alpha": 0.5}}))
    if finished:
        (run_dir / "summary.json").write_text(
            json.dumps({"status": "ok", "reason": "", **run_summary(run_dir / "metrics.jsonl")})
        )
    return run_dir


class Tables(HTMLParser):
    """Every <table id=...> of a page as rows of cell texts (header row first)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tables, self.images, self._table = {}, [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._table[-1].append("")
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._table and self._table[-1]:
            self._table[-1][-1] += data


def test_the_report_compares_runs_verdict_evaluation_traffic_and_config(tmp_path):
    from trainer.metrics import bytes_per_round, main

    a = write_run(tmp_path / "runs" / "a", seed=0, rewards=[0.1, 0.3, 0.5])
    b = write_run(tmp_path / "runs" / "b", seed=1, rewards=[0.2, 0.2, 0.2], bytes_per_round=500, finished=False)
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "report")]) == 0
    page = Tables((tmp_path / "report" / "index.html").read_text())
    verdict = {row[0]: row for row in page.tables["verdict"][1:]}
    assert verdict["a"][1] == "ok" and verdict["b"][1] == "unfinished"
    assert verdict["b"][2] == "no summary.json: the run has not finished"
    assert verdict["a"][5] == "0.150 → 0.550"  # mean over the two ranks of the first and last round
    assert verdict["a"][7] == "0.250 → 0.750"  # held-out pass@1 first and last
    evals = page.tables["eval"][1:]
    assert [(row[0], row[1], row[3]) for row in evals] == [
        ("a", "0", "0.25"),
        ("a", "3", "0.75"),
        ("b", "0", "0.25"),
        ("b", "3", "0.75"),
    ]
    traffic = {row[0]: row for row in page.tables["traffic"][1:]}
    assert traffic["a"][1:5] == ["3", "0.003", "0.001", "0.003"]  # MB: 3 rounds of 1000 bytes (cumulative counter)
    assert traffic["b"][2:4] == ["0.0015", "0.0005"]
    assert traffic["a"][6:] == ["18", "6", "0.75"]  # seconds over 2 ranks x 3 rounds; 18 / (18 + 6)
    assert page.tables["config"] == [["key", "a", "b"], ["seed", "0", "1"]]
    assert bytes_per_round(read_metrics(a / "metrics.jsonl")) == ([1, 2, 3], [1000, 1000, 1000])  # traffic.png
    assert page.images == ["comparison.png", "curves-1.png", "curves-2.png", "traffic.png"]
    for name in page.images:
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_of_one_run_shows_its_whole_config_and_says_which_lines_it_could_not_read(tmp_path):
    from trainer.metrics import write_report

    run = write_run(tmp_path / "a", seed=0, rewards=[0.1, 0.3], broken_tail=True, finished=False)
    page_path = write_report([run], tmp_path / "report")
    text = page_path.read_text()
    assert "a: metrics.jsonl lines not read: line 13: not JSON (column 20: Unterminated string starting at)" in text
    page = Tables(text)
    assert page.tables["config"] == [["key", "a"], ["loss.alpha", "0.5"], ["name", '"run"'], ["seed", "0"]]
    assert page.images == ["curves-1.png", "traffic.png"]  # no overlay for a single run


def test_the_report_command_names_a_directory_that_is_not_a_run_and_exits_2(tmp_path, capsys):
    from trainer.metrics import main

    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: no metrics.jsonl; pass run directories (runs/<name>)\n"
