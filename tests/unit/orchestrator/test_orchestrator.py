"""The orchestrator's pure parts: naming, settings, the torchrun command line, metrics following."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path, PurePosixPath

import pytest

from orchestrator.cluster import (
    COMPOSE_NUMBER,
    ClusterError,
    RunSettings,
    compose_replica_index,
    elastic_command,
    torchrun_command,
)
from orchestrator.coordinator import cluster_summary
from orchestrator.progress import MetricsTail, RunProgress, human_bytes, missing_outer_steps


@pytest.mark.parametrize(("number", "replica"), [("1", 0), ("8", 7), ("12", 11)])
def test_replica_index_comes_from_the_compose_container_number(number: str, replica: int) -> None:
    assert compose_replica_index({COMPOSE_NUMBER: number, "com.docker.compose.service": "worker"}) == replica


@pytest.mark.parametrize("labels", [{}, {COMPOSE_NUMBER: "0"}, {COMPOSE_NUMBER: "x"}])
def test_a_container_without_a_replica_number_is_refused_with_the_label_named(labels: dict[str, str]) -> None:
    with pytest.raises(ClusterError, match=COMPOSE_NUMBER):
        compose_replica_index(labels)


def test_settings_default_to_the_smoke_config_and_name_the_run_after_it() -> None:
    settings = RunSettings.from_env({})
    assert settings.config == "configs/smoke.yaml"
    assert settings.run == "smoke"
    assert settings.run_dir == PurePosixPath("/app/runs/smoke")
    assert (settings.coordinator, settings.port, settings.max_restarts) == ("coordinator", 29400, 3)


def test_settings_read_overrides_and_reject_a_non_integer_with_its_name() -> None:
    settings = RunSettings.from_env(
        {
            "COMPOSER_CONFIG": "configs/test.yaml",
            "COMPOSER_SET": "rounds=2  dist_timeout_s=30",
            "COMPOSER_RUN": "kill",
            "COMPOSER_RUNS_ROOT": "/tmp/r",
        }
    )
    assert settings.overrides == ("rounds=2", "dist_timeout_s=30")
    assert settings.run_dir == PurePosixPath("/tmp/r/kill")
    with pytest.raises(ClusterError, match="COMPOSER_RDZV_PORT='x29400'"):
        RunSettings.from_env({"COMPOSER_RDZV_PORT": "x29400"})


def test_torchrun_command_is_one_fixed_size_node_on_the_coordinators_store() -> None:
    settings = RunSettings.from_env({"COMPOSER_CONFIG": "configs/test.yaml", "COMPOSER_SET": "rounds=2 seed=3"})
    command = torchrun_command(settings, nnodes=4, rdzv_id="test-1a2b", local_addr="172.18.0.5")
    assert command == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=4",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=coordinator:29400",
        "--rdzv-conf=is_host=false",
        "--rdzv-id=test-1a2b",
        "--max-restarts=3",
        "--local-addr=172.18.0.5",
        "-m",
        "trainer.worker",
        "--config",
        "configs/test.yaml",
        "--set",
        "rounds=2",
        "--set",
        "seed=3",
    ]


def test_metrics_tail_holds_back_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []  # no file yet
    first = json.dumps({"event": "inner", "round": 0, "step": 0, "loss": 0.5})
    second = json.dumps({"event": "outer", "outer_step": 1, "round": 0})
    path.write_text(first + "\n" + second[:10])
    assert tail.read() == [json.loads(first)]
    with path.open("a") as file:
        file.write(second[10:] + "\n")
    assert tail.read() == [json.loads(second)]
    assert tail.read() == []


def test_metrics_tail_names_the_file_of_a_broken_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("{not json}\n")
    with pytest.raises(ValueError, match="metrics.jsonl"):
        MetricsTail(path).read()


def test_progress_averages_the_latest_round_and_counts_outer_steps_across_a_resume() -> None:
    progress = RunProgress()
    inner = {"event": "inner", "grpo": 0.5, "sdpo": 0.2, "dpo": 0.05}
    records = [
        inner | {"round": 0, "step": 0, "replica": 0, "loss": 9.0, "reward": 0.0},
        {"event": "outer", "outer_step": 1, "round": 0, "bytes_sent": 3 * 2**20, "replicas": 2},
        inner | {"round": 1, "step": 2, "replica": 0, "loss": 0.5, "reward": 0.25},
        inner | {"round": 1, "step": 2, "replica": 1, "loss": 1.0, "reward": 0.75, "dpo": 0.15},
        {"event": "outer", "outer_step": 2, "round": 1, "bytes_sent": 3 * 2**20, "replicas": 2},
        {"event": "resume", "outer_step": 1, "round": 1},
        {"event": "outer", "outer_step": 2, "round": 1, "bytes_sent": 3 * 2**20, "replicas": 2},
        {"event": "outer", "outer_step": 4, "round": 3, "bytes_sent": 3 * 2**20, "replicas": 2},
    ]
    new_outer = progress.update(records)
    assert [r["outer_step"] for r in new_outer] == [1, 2, 2, 4]
    assert progress.outer_steps == {1, 2, 4} and progress.resumes == 1
    assert missing_outer_steps(progress.outer_steps, expected=4) == [3]
    assert missing_outer_steps({1, 2, 3}, expected=3) == []
    assert progress.line() == (
        "round 1 | loss 0.7500 (grpo 0.5000 sdpo 0.2000 dpo 0.1000) | reward 0.500 | "
        "outer 4 | sent 3.0 MB | replicas 2 | resumes 1"
    )
    assert RunProgress().line() == "waiting for the first step"


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (512, 1536, 5 * 2**30, 3 * 2**40)] == ["512 B", "1.5 KB", "5.0 GB", "3072.0 GB"]


def _write_run(run_dir: Path, outer_steps: list[int], summary: dict) -> RunProgress:
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(summary))
    progress = RunProgress()
    progress.update([{"event": "outer", "outer_step": step, "round": step - 1} for step in outer_steps])
    return progress


def test_cluster_summary_accepts_a_run_with_every_outer_step_and_agreeing_replicas(tmp_path: Path) -> None:
    summary = {"status": "ok", "outer_steps": 3, "replica_hashes": ["ab", "ab"], "final_param_hash": "ab"}
    progress = _write_run(tmp_path / "run", [1, 2, 2, 3], summary)  # step 2 repeated after a resume
    report = cluster_summary(tmp_path / "run", progress, finished=True, reason="")
    assert (report["status"], report["missing_outer_steps"], report["outer_steps_seen"]) == ("ok", [], 3)


@pytest.mark.parametrize(
    ("steps", "summary", "reason"),
    [
        ([1, 3], {"status": "ok", "outer_steps": 3, "replica_hashes": ["ab", "ab"]}, r"outer steps \[2\] missing"),
        ([1, 2], {"status": "ok", "outer_steps": 2, "replica_hashes": ["ab", "cd"]}, "replica hashes differ"),
        ([1], {"status": "error", "outer_steps": 1, "replica_hashes": ["ab"]}, "summary.json says status 'error'"),
    ],
)
def test_cluster_summary_fails_a_run_that_lost_a_step_diverged_or_failed(
    tmp_path: Path, steps: list[int], summary: dict, reason: str
) -> None:
    progress = _write_run(tmp_path / "run", steps, summary)
    report = cluster_summary(tmp_path / "run", progress, finished=True, reason="")
    assert report["status"] == "failed"
    assert re.search(reason, report["reason"])


def test_cluster_summary_of_an_unfinished_run_keeps_the_coordinators_reason(tmp_path: Path) -> None:
    progress = _write_run(tmp_path / "run", [1], {"status": "ok", "outer_steps": 1, "replica_hashes": ["ab"]})
    report = cluster_summary(tmp_path / "run", progress, finished=False, reason="gave up on workers ['w-1']")
    assert (report["status"], report["reason"]) == ("failed", "gave up on workers ['w-1']")


def test_cluster_summary_takes_the_workers_verdict_that_streaming_replicas_may_differ(tmp_path: Path) -> None:
    summary = {
        "status": "ok",
        "outer_steps": 2,
        "replica_hashes": ["ab", "cd"],
        "replicas_expected_to_agree": False,
        "replicas_agree": False,
    }
    report = cluster_summary(tmp_path / "run", _write_run(tmp_path / "run", [1, 2], summary), finished=True, reason="")
    assert (report["status"], report["replicas_expected_to_agree"], report["replicas_agree"]) == ("ok", False, False)


def test_cluster_summary_repeats_the_workers_reason_for_a_failed_verdict(tmp_path: Path) -> None:
    summary = {
        "status": "failed",
        "reason": "replicas were expected to agree and do not: ['ab', 'cd']",
        "outer_steps": 1,
        "replica_hashes": ["ab", "cd"],
        "replicas_expected_to_agree": True,
        "replicas_agree": False,
    }
    report = cluster_summary(tmp_path / "run", _write_run(tmp_path / "run", [1], summary), finished=True, reason="")
    assert report["status"] == "failed"
    assert report["reason"].endswith("says status 'failed': replicas were expected to agree and do not: ['ab', 'cd']")


def test_a_streaming_round_accounts_for_every_fragment_outer_step_it_covers() -> None:
    progress = RunProgress()
    progress.update([{"event": "outer", "outer_step": 2, "first_outer_step": 1}])
    progress.update([{"event": "outer", "outer_step": 4, "first_outer_step": 3}])
    assert missing_outer_steps(progress.outer_steps, 4) == []
    progress.update([{"event": "outer", "outer_step": 6}])  # a record without the field covers itself
    assert missing_outer_steps(progress.outer_steps, 6) == [5]


def test_a_node_whose_torchrun_fails_after_the_summary_is_done_and_one_that_fails_before_is_not(
    tmp_path, capsys
) -> None:
    from orchestrator.node import after_the_end

    assert after_the_end(1, tmp_path, 2) == 1  # no summary yet: a real failure, the container restarts
    assert after_the_end(134, tmp_path, 2) == 134
    (tmp_path / "summary.json").write_text('{"status": "failed"}')
    assert after_the_end(0, tmp_path, 2) == 0 and capsys.readouterr().out == ""
    # the run has ended (whatever its verdict, which the coordinator reads): nothing to restart
    assert after_the_end(1, tmp_path, 2) == 0
    assert "replica 2: torchrun exited 1 after the run had ended" in capsys.readouterr().out


def test_join_takes_an_ipv4_or_named_coordinator_and_refuses_ipv6_and_malformed_ones_by_the_flag():
    from orchestrator.__main__ import coordinator_address

    assert coordinator_address("10.0.0.1:29400") == ("10.0.0.1", 29400)
    assert coordinator_address("gpu-box.lan:1234") == ("gpu-box.lan", 1234)
    for text in ("[fe80::1]:29400", "fe80::1:29400"):
        with pytest.raises(ValueError, match=r"--coordinator .*IPv6 addresses are not supported"):
            coordinator_address(text)
    for text in ("10.0.0.1", ":29400", "10.0.0.1:http", "10.0.0.1:70000"):
        with pytest.raises(ValueError, match=r"--coordinator .*expected HOST:PORT"):
            coordinator_address(text)


def test_an_elastic_replica_is_its_own_standalone_torchrun_and_the_node_reads_that_from_the_config() -> None:
    from orchestrator.node import elastic_run

    settings = RunSettings.from_env({"COMPOSER_CONFIG": "configs/test.yaml", "COMPOSER_SET": "diloco.elastic=true"})
    assert elastic_command(settings)[:7] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=1",
        "--max-restarts=3",
        "-m",
    ]
    assert elastic_command(settings)[-2:] == ["--set", "diloco.elastic=true"]
    assert elastic_run(settings)
    assert not elastic_run(RunSettings.from_env({"COMPOSER_CONFIG": "configs/test.yaml"}))
    broken = {"COMPOSER_CONFIG": "configs/test.yaml", "COMPOSER_SET": "diloco.min_replicas=0"}
    with pytest.raises(ClusterError, match="diloco.min_replicas"):
        elastic_run(RunSettings.from_env(broken))


def test_progress_lists_each_replicas_membership_changes_of_an_elastic_run() -> None:
    progress = RunProgress()
    progress.update([{"event": "outer", "outer_step": 1}])
    assert not progress.elastic  # a run without elastic records: no membership
    base = {"event": "outer", "joined": [], "left": [], "healed": []}
    progress.update(
        [
            {**base, "outer_step": 1, "participant_ids": [0, 1, 2]},
            {**base, "outer_step": 3, "participant_ids": [0, 1], "left": [2]},
            {**base, "outer_step": 7, "participant_ids": [0, 1, 2], "joined": [2], "healed": [2]},
        ]
    )
    assert progress.elastic and progress.membership == {
        2: [
            {"outer_step": 3, "change": "left"},
            {"outer_step": 7, "change": "healed"},
            {"outer_step": 7, "change": "joined"},
        ]
    }
