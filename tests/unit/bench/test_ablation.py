"""`make ablation` (bench/ablation.py) on a tiny grid: the files it writes, and that a rerun skips
finished runs, resumes a run cut short after a checkpoint and restarts one cut short before any."""

import json

import pytest

from bench import ablation

TINY = [  # every run: one round of one step, 2 prompts x 2 samples, 4 held-out problems
    "rounds=1",
    "diloco.sync_every=1",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "eval.every=1",
    "eval.size=4",
    "loss.dpo_pairs_per_step=2",
]
ROW_FIELDS = {
    "task",
    "alpha",
    "beta",
    "hint",
    "sdpo_on",
    "seeds",
    "auc",
    "auc_sigma",
    "samples_to_threshold",
    "final",
    "final_sigma",
    "teacher_logp",
    "student_logp",
}


def grid(tmp_path, capsys):
    args = ["--tasks", "addition", "--cells", "+dpo", "grpo", "--seeds", "1", "--warmup-steps", "2", "--jobs", "1"]
    args += ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    args += [arg for item in TINY for arg in ("--set", item)]
    assert ablation.main(args) == 0
    return capsys.readouterr().out


def test_the_grid_writes_its_three_files_and_a_rerun_continues_where_it_stopped(tmp_path, capsys):
    out = grid(tmp_path, capsys)
    assert "ablation: 2 runs (0 already done)" in out
    # the fixed order (CELLS), whatever order the command line names the cells in
    assert out.index("addition   grpo") < out.index("addition   +dpo")
    rows = json.loads((tmp_path / "results" / "ablation.json").read_text())["rows"]
    assert [r["cell"] for r in rows] == ["grpo", "+dpo"]
    for row in rows:
        assert ROW_FIELDS <= set(row) and row["seeds"] == 1 and 0 <= row["auc"] <= 1
        assert row["teacher_logp"] < 0 and row["student_logp"] < 0
    assert (tmp_path / "results" / "ablation.png").stat().st_size > 0
    assert "| grpo | 0 | 0 |" in (tmp_path / "results" / "ablation.md").read_text()

    runs = tmp_path / "runs" / "addition"
    grpo, dpo = runs / "grpo" / "seed0", runs / "dpo" / "seed0"
    before = {d: (d / "metrics.jsonl").read_text() for d in (grpo, dpo)}
    out = grid(tmp_path, capsys)  # everything finished: nothing runs again
    assert "ablation: 2 runs (2 already done)" in out and "seed 0: pass@1" not in out
    assert all((d / "metrics.jsonl").read_text() == text for d, text in before.items())

    # +dpo cut short after its checkpoint (no summary yet); grpo cut short before any checkpoint
    (dpo / "summary.json").unlink()
    for path in sorted(grpo.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (grpo / "metrics.jsonl").write_text('{"event": "inner", "step": 0, "cut_short": true}\n')
    out = grid(tmp_path, capsys)
    assert "ablation: 2 runs (0 already done)" in out
    resumed = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in resumed].count("resume") == 1  # the worker's own resume, not a fresh start
    assert (dpo / "metrics.jsonl").read_text().startswith(before[dpo])
    restarted = (grpo / "metrics.jsonl").read_text()
    assert "cut_short" not in restarted and (grpo / "summary.json").exists()


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(0, 0.2, {}), (100, 0.4, {}), (300, 0.4, {})], (100 * 0.3 + 200 * 0.4) / 300),
        ([(0, 0.5, {})], 0.5),
    ],
)
def test_auc_is_the_mean_pass_at_1_over_the_completions_generated(points, expected):
    assert ablation.auc(points) == pytest.approx(expected)


def test_samples_to_threshold_is_the_first_evaluation_at_or_above_it():
    points = [(0, 0.2, {}), (128, 0.3, {}), (256, 0.5, {}), (384, 0.4, {})]
    assert ablation.samples_to(points, 0.3) == 128
    assert ablation.samples_to(points, 0.45) == 256
    assert ablation.samples_to(points, 0.6) is None


def test_a_subset_of_the_grid_is_refused_the_committed_results_and_a_zero_count_is_refused(capsys):
    for args in (["--seeds", "1"], ["--tasks", "addition"], ["--cells", "grpo"], ["--seeds", "0"], ["--jobs", "0"]):
        with pytest.raises(SystemExit) as stopped:
            ablation.main(args)
        assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("needs --results DIR; bench/results holds the whole grid's") == 3
    assert "argument --seeds: 0 is not >= 1" in err and "argument --jobs: 0 is not >= 1" in err
