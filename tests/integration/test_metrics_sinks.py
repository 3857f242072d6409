"""Issue 28 end to end: two runs of configs/test.yaml under torchrun (2 replicas, 3 rounds), seed 0
with `metrics.sinks: [jsonl, tensorboard]` and seed 1 with `[jsonl, wandb]` offline. TensorBoard's
own reader finds exactly metrics.jsonl's scalars, every key at every step; the offline W&B run's
summary holds metrics.jsonl's final values; the worker writes no key the schema does not name; and
the report of the two renders in headless Chromium without a console error."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_worker import finish, torchrun
from tests.support.browser import CHROMIUM, render
from tests.support.paths import REPO
from tests.support.sinks import tensorboard_scalars, wandb_config, wandb_history, wandb_records, wandb_summary
from trainer.metrics import SCHEMA, curve_means, read_metrics, unnamed_keys

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sinks") / "seed0"
    finish(torchrun(run_dir, "seed=0", "metrics.sinks=[jsonl, tensorboard]"))
    return run_dir


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sinks") / "seed1"
    scratch = tmp_path_factory.mktemp("wandb-home")  # W&B's settings and cache, away from the user's
    with pytest.MonkeyPatch.context() as patch:  # torchrun hands its environment to the workers
        patch.setenv("WANDB_MODE", "offline")
        for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(variable, str(scratch / variable.lower()))
        finish(torchrun(run_dir, "seed=1", "metrics.sinks=[jsonl, wandb]"))
    return run_dir


def scalars_of_the_file(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the sinks must hold, by the schema's rules written out here again: every number of every
    record (bools as 0/1), inner ones per rank against the inner step, the rest against the outer
    step; lists per rank and mappings per key; nulls, per-task lists, hashes and positions left out."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        event = record["event"]
        step = record["step"] if event == "inner" else record["outer_step"]
        suffix = f"/rank{record['rank']}" if event == "inner" else ""
        for key, value in record.items():
            kind = "index" if key == "event" else SCHEMA[event][key].kind if key in SCHEMA[event] else "scalar"
            names = {}
            if kind == "scalar" and value is not None:
                names = {f"{event}/{key}": value}
            elif kind == "per_rank":
                names = {f"{event}/{key}/rank{i}": v for i, v in enumerate(value)}
            elif kind == "per_kind":
                names = {f"{event}/{key}/{k}": v for k, v in value.items()}
            for name, v in names.items():
                expected.setdefault(name + suffix, []).append((step, float(v)))
    return expected


def derived_of_the_file(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The sinks' two derived families: curves.png's per-step means and the outer utilisation."""
    derived: dict[str, list[tuple[int, float]]] = {}
    inner = [r for r in records if r["event"] == "inner"]
    for step in sorted({r["step"] for r in inner}):
        for name, value in curve_means([r for r in inner if r["step"] == step]).items():
            derived.setdefault(name, []).append((step, value))
    for r in records:
        if r["event"] == "outer":
            utilisation = sum(r["compute_s"]) / (sum(r["compute_s"]) + sum(r["communication_s"]))
            derived.setdefault("outer/utilisation", []).append((r["outer_step"], utilisation))
    return derived


def assert_same_series(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for name, series in expected.items():
        got = found[name]
        assert [s for s, _ in got] == [s for s, _ in series], name
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for (_, a), (_, b) in zip(got, series, strict=True)), (
            name
        )


def test_tensorboard_holds_exactly_the_scalars_of_metrics_jsonl_every_key_every_step(tensorboard_run):
    records = read_metrics(tensorboard_run / "metrics.jsonl")
    expected = scalars_of_the_file(records)
    # 3 rounds x 2 steps x 2 ranks; 3 outer steps; evaluations before the first round, after 2 and 3
    assert [s for s, _ in expected["inner/reward/rank1"]] == [0, 1, 2, 3, 4, 5]
    assert [s for s, _ in expected["outer/pseudo_grad_norm"]] == [1, 2, 3]
    assert [s for s, _ in expected["eval/pass_at_1"]] == [0, 2, 3]
    names = set(expected)
    left_out = {
        key
        for r in records
        for key in r
        if not any(n == f"{r['event']}/{key}" or n.startswith(f"{r['event']}/{key}/") for n in names)
    }
    assert left_out == {
        *("event", "step", "rank", "replica", "round", "outer_step"),  # positions: the axes and the names
        *("greedy_correct", "sampled_correct", "param_hash", "replica_hashes", "rank_hashes"),  # lists, hashes
        "logits_dtype",  # text
    }
    found = tensorboard_scalars(tensorboard_run / "tensorboard")
    derived = derived_of_the_file(records)
    assert_same_series({k: v for k, v in found.items() if k not in derived}, expected)
    assert_same_series({k: v for k, v in found.items() if k in derived}, derived)
    print(f"\ntensorboard: {len(expected)} scalars, {sum(map(len, expected.values()))} values equal to metrics.jsonl's")


def test_the_offline_wandb_run_summary_holds_the_final_values_of_metrics_jsonl(wandb_run):
    (local,) = (wandb_run / "wandb").glob("offline-run-*")
    assert local.is_dir() and list(local.glob("run-*.wandb"))
    records = read_metrics(wandb_run / "metrics.jsonl")
    expected = scalars_of_the_file(records)
    log = wandb_records(wandb_run)
    summary = wandb_summary(log)
    final = {name: series[-1][1] for name, series in {**expected, **derived_of_the_file(records)}.items()}
    assert {name: summary[name] for name in final} == final
    run_summary = json.loads((wandb_run / "summary.json").read_text())
    assert summary["summary/status"] == run_summary["status"] == "ok"
    assert summary["summary/final_param_hash"] == run_summary["final_param_hash"]
    assert wandb_config(log) == json.loads((wandb_run / "config.json").read_text())
    # and not only the last values: every row W&B holds is a record's, against the right axis
    series: dict[str, list[tuple[int, float]]] = {}
    for row in wandb_history(log):
        axis = "inner_step" if "inner_step" in row else "outer_step"
        for name, value in row.items():
            if not name.startswith("_") and name != axis:
                series.setdefault(name, []).append((row[axis], value))
    assert_same_series(series, {**expected, **derived_of_the_file(records)})
    print(f"\nwandb: {len(final)} summary values equal metrics.jsonl's last ones ({local.name})")


def test_the_worker_writes_no_key_the_schema_does_not_name(tensorboard_run, wandb_run):
    for run_dir in (tensorboard_run, wandb_run):
        assert unnamed_keys(read_metrics(run_dir / "metrics.jsonl")) == []


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run installs it)"
)


@needs_chromium
def test_the_browser_check_sees_a_missing_image_a_console_error_and_an_uncaught_exception(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        '<!doctype html><link rel="icon" href="data:,"><img src="missing.png">'
        '<script>console.error("boom"); notAFunction();</script>'
    )
    rendered = render(page)
    assert rendered.images == [((tmp_path / "missing.png").as_uri(), False)]
    assert sorted(e.split(" (")[0].split("\n")[0] for e in rendered.errors) == [
        "console: boom",
        "exception: ReferenceError: notAFunction is not defined",
        "network: Failed to load resource: net::ERR_FILE_NOT_FOUND",
    ]


@needs_chromium
def test_the_report_of_two_seeds_renders_in_headless_chromium_without_console_errors(
    tensorboard_run, wandb_run, tmp_path
):
    out = tmp_path / "report"
    command = [sys.executable, "-m", "trainer.metrics", "report", str(tensorboard_run), str(wandb_run)]
    done = subprocess.run([*command, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tables = "Object.fromEntries([...document.querySelectorAll('table')].map(t => [t.id, "
    tables += "[...t.rows].map(r => [...r.cells].map(c => c.textContent))]))"
    page = render(out / "index.html", evaluate={"tables": tables, "title": "document.title"})
    (out / "screenshot.png").write_bytes(page.png)
    assert page.errors == []
    assert [(Path(src).name, ok) for src, ok in page.images] == [
        ("comparison.png", True),
        ("curves-1.png", True),
        ("curves-2.png", True),
        ("traffic.png", True),
    ]
    assert page.png[:8] == b"\x89PNG\r\n\x1a\n" and len(page.png) > 50_000
    assert page.values["title"] == "2 runs: seed0, seed1"
    tables = page.values["tables"]
    summaries = [json.loads((d / "summary.json").read_text()) for d in (tensorboard_run, wandb_run)]
    verdict = tables["verdict"][1:]
    assert [(row[0], row[1]) for row in verdict] == [("seed0", "ok"), ("seed1", "ok")]
    for row, summary in zip(verdict, summaries, strict=True):
        assert row[7] == f"{summary['eval_pass_at_1_first']:.3f} → {summary['eval_pass_at_1_last']:.3f}"
        assert row[5] == f"{summary['reward_first']:.3f} → {summary['reward_last']:.3f}"
    evals = [(row[0], int(row[1])) for row in tables["eval"][1:]]
    assert evals == [("seed0", 0), ("seed0", 2), ("seed0", 3), ("seed1", 0), ("seed1", 2), ("seed1", 3)]
    for row, run_dir in zip(tables["traffic"][1:], (tensorboard_run, wandb_run), strict=True):
        last = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "outer"][-1]
        assert row[1] == "3" and row[2] == f"{last['bytes_sent'] / 1e6:.4g}"
    diff = {row[0]: row[1:] for row in tables["config"][1:]}
    assert diff == {"seed": ["0", "1"], "metrics.sinks": ['["jsonl", "tensorboard"]', '["jsonl", "wandb"]']}
