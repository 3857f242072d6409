"""TensorBoard and W&B sinks fed through MetricsLog, read back with each tool's own reader: what
arrives is what metrics.jsonl holds, edge values included (NaN, bools, null, large counts)."""

from __future__ import annotations

import math

import pytest

from tests.support.sinks import (
    tensorboard_hparams,
    tensorboard_scalars,
    wandb_config,
    wandb_history,
    wandb_records,
    wandb_summary,
)
from trainer.config import Config, MetricsConfig, dump_config
from trainer.metrics import MetricsLog, read_metrics
from trainer.run.sinks import open_sinks, wandb_run_id


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its settings, cache and data under tmp_path: no account, no network, no trace left."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_both_sinks_receive_each_record_as_metrics_jsonl_holds_it(tmp_path, offline_wandb):
    config = Config(name="edge", seed=3, metrics=MetricsConfig(sinks=["jsonl", "tensorboard", "wandb"]))
    run_dir = tmp_path / "run"
    log = MetricsLog(run_dir / "metrics.jsonl", sinks=open_sinks(config, run_dir))
    log.log("eval", round=0, outer_step=0, pass_at_1=0.5, greedy_correct=[1, 0], teacher_logp={"partial": -2.5})
    inner = [
        dict(round=0, step=0, replica=r, rank=r, reward=0.1 * (r + 1), teacher_reward=None, skipped=bool(r))
        for r in (0, 1)
    ]
    inner[1]["loss"] = float("nan")  # a non-finite step: logged as it was
    for record in inner:
        log.log("inner", **record)
    log.log_curves(0, inner)
    big = 3 * 2**40  # bytes of a long run: past float32's exact integers, within float64's
    log.log("outer", outer_step=1, round=0, bytes_sent=big, bytes_sent_per_rank=[big, 0], param_hash="ab")
    log.close({"status": "ok", "reward_rise": 0.25})
    assert [r["event"] for r in read_metrics(run_dir / "metrics.jsonl")] == ["eval", "inner", "inner", "outer"]

    expected = {
        "eval/pass_at_1": [(0, 0.5)],
        "eval/teacher_logp/partial": [(0, -2.5)],
        "inner/reward/rank0": [(0, 0.1)],
        "inner/reward/rank1": [(0, 0.2)],
        "inner/skipped/rank0": [(0, 0.0)],
        "inner/skipped/rank1": [(0, 1.0)],
        "inner/loss/rank1": [(0, float("nan"))],
        "curves/reward": [(0, (0.1 + 0.2) / 2)],
        "curves/loss": [(0, float("nan"))],
        "outer/bytes_sent": [(1, float(big))],
        "outer/bytes_sent_per_rank/rank0": [(1, float(big))],
        "outer/bytes_sent_per_rank/rank1": [(1, 0.0)],
    }
    board = tensorboard_scalars(run_dir / "tensorboard")
    assert sorted(board) == sorted(expected)  # null teacher rewards and the hash are no scalars
    for tag, series in expected.items():
        assert len(board[tag]) == len(series) and all(
            s == t and same(v, w) for (s, v), (t, w) in zip(board[tag], series, strict=True)
        ), tag
    hparams = tensorboard_hparams(run_dir / "tensorboard")
    assert (hparams["name"], hparams["seed"], hparams["loss.alpha"]) == ("edge", 3, 0.5)
    assert hparams["metrics.sinks"] == '["jsonl", "tensorboard", "wandb"]'

    (offline_run,) = (run_dir / "wandb").glob(f"offline-run-*-{wandb_run_id('edge', run_dir)}")
    records = wandb_records(run_dir)
    assert wandb_config(records) == dump_config(config)
    rows = wandb_history(records)
    seen = {}
    for row in rows:
        axis = "inner_step" if "inner_step" in row else "outer_step"
        for tag, value in row.items():
            if not tag.startswith("_") and tag != axis:
                seen.setdefault(tag, []).append((row[axis], value))
    assert sorted(seen) == sorted(expected)
    for tag, series in expected.items():
        assert all(s == t and same(v, w) for (s, v), (t, w) in zip(seen[tag], series, strict=True)), tag
    summary = wandb_summary(records)
    assert summary["outer/bytes_sent"] == big and summary["inner/reward/rank1"] == 0.2
    assert (summary["summary/status"], summary["summary/reward_rise"]) == ("ok", 0.25)
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0 and offline_run.is_dir()


def test_a_run_directory_has_one_w_and_b_run_id_and_two_directories_two(tmp_path):
    first, again = (
        wandb_run_id("smoke", tmp_path / "runs" / "smoke"),
        wandb_run_id("smoke", tmp_path / "runs" / "smoke"),
    )
    other = wandb_run_id("smoke", tmp_path / "runs" / "smoke-1")
    assert first == again != other and first.startswith("smoke-") and len(first) == len("smoke-") + 8
    assert wandb_run_id("a b/c", tmp_path).startswith("a-b-c-")
