import json
import math

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
    assert moved == ["line 1 (inner): reward: 0.5 != 0.5000000000000001"]


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
