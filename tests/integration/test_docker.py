"""Multi-node runs in real containers (testcontainers + the orchestrator) on the local image.

They skip only when no Docker engine answers and COMPOSER_REQUIRE_DOCKER is unset (.ci/run sets
it: there they run or fail, `tests.support.docker_engine`). `bash compose/provision.sh` starts an
engine and builds what the image needs on a bare machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # Ryuk's image cannot be pulled here

import docker  # noqa: E402
from testcontainers.compose import DockerCompose  # noqa: E402
from testcontainers.core.container import DockerContainer  # noqa: E402

from orchestrator.cluster import LABEL_RUN  # noqa: E402
from orchestrator.images import DEFAULT_IMAGE, ensure_image, repo_root  # noqa: E402
from orchestrator.supervisor import WorkerSupervisor  # noqa: E402
from tests.support.docker_engine import docker_client  # noqa: E402
from tests.support.torchrun import failure, torchrun_command, torchrun_env  # noqa: E402
from trainer.checkpoint import latest_complete  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.integration]

ROOT = repo_root()
CONFIG = "configs/test.yaml"
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def client() -> docker.DockerClient:
    return docker_client()


@pytest.fixture(scope="module")
def image(client: docker.DockerClient) -> str:
    """The trainer image of this tree: rebuilt only when its inputs changed. COMPOSER_TEST_IMAGE
    names another tag, so that checkouts sharing one engine do not rebuild each other's image."""
    tag = os.environ.get("COMPOSER_TEST_IMAGE", DEFAULT_IMAGE)
    ensure_image(client, tag=tag, log=lambda _line: None)
    return tag


@pytest.fixture
def run_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh run under runs/, removed afterwards (the tests read what they need first)."""
    name = f"pytest-{request.node.name.split('[')[0][5:25].replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    yield name
    shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_compose_file_validates_and_keeps_the_socket_away_from_workers(client: docker.DockerClient) -> None:
    for files in (["docker-compose.yml"], ["docker-compose.yml", "compose/gpu.yml"]):
        compose = DockerCompose(context=ROOT, compose_file_name=files)
        config = compose.get_config()
        services = config["services"]
        assert set(services) == {"coordinator", "worker"}
        sockets = {
            name: [v for v in service.get("volumes", []) if v["target"] == "/var/run/docker.sock"]
            for name, service in services.items()
        }
        assert len(sockets["coordinator"]) == 1 and sockets["worker"] == []
        assert config["networks"]["cluster"]["internal"] is True
        assert services["worker"]["command"] == ["python", "-m", "orchestrator.node"]
    gpu_worker = services["worker"]
    assert gpu_worker["environment"]["COMPOSER_NPROC_PER_NODE"] == "gpu"
    assert gpu_worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu_worker["build"]["args"]["WHEELHOUSE"] == "off"


def test_image_runs_the_trainer_as_a_non_root_user_without_the_wheelhouse(image: str) -> None:
    probe = DockerContainer(image).with_command(
        ["python", "-c", "import os, torch; print(os.getuid(), os.path.exists('/build'), torch.__version__)"]
    )
    with probe:
        container = probe.get_wrapped_container()
        assert container.wait(timeout=120)["StatusCode"] == 0
        out = container.logs().decode().split()
    assert out[:2] == ["10001", "False"]
    assert out[2].startswith("2.13.0")


def test_supervisor_restarts_a_crashing_worker_a_bounded_number_of_times_and_spares_a_stopped_one(
    client: docker.DockerClient, image: str
) -> None:
    labels = {LABEL_RUN: f"pytest-supervisor-{uuid.uuid4().hex[:6]}"}
    crasher = DockerContainer(image).with_command(["python", "-c", "import time; time.sleep(1); raise SystemExit(3)"])
    stopped = DockerContainer(image).with_command(["python", "-c", "import time; time.sleep(600)"])
    with crasher.with_kwargs(labels=labels), stopped.with_kwargs(labels=labels):
        supervisor = WorkerSupervisor(client, labels, max_restarts=2)
        stopped.get_wrapped_container().stop(timeout=1)  # as `compose down` or Ctrl-C would
        events = []
        deadline = time.monotonic() + 120
        while not supervisor.failed:
            assert time.monotonic() < deadline, f"no give-up in time: {events}"
            events += supervisor.poll()
            time.sleep(0.5)
        events += supervisor.poll()
        crasher_name = crasher.get_wrapped_container().name
        stopped_state = client.containers.get(stopped.get_wrapped_container().id).attrs["State"]
    assert [(e.kind, e.name, e.exit_code, e.restarts) for e in events] == [
        ("restarted", crasher_name, 3, 1),
        ("restarted", crasher_name, 3, 2),
        ("gave_up", crasher_name, 3, 2),
    ]
    assert stopped_state["Status"] == "exited" and stopped_state["ExitCode"] != 0
    assert supervisor.given_up == {crasher_name}


def compose_run(run_name: str, image: str, workers: int, monkeypatch: pytest.MonkeyPatch, sets: str = "") -> dict:
    """`docker compose up` with WORKERS containers to the end; the coordinator's and workers' exits."""
    # DockerCompose has no scale argument but passes the environment on: WORKERS feeds
    # deploy.replicas, exactly as `--scale worker=N` would.
    for key, value in {
        "COMPOSE_PROJECT_NAME": run_name,
        "WORKERS": str(workers),
        "COMPOSER_CONFIG": CONFIG,
        "COMPOSER_RUN": run_name,
        "COMPOSER_SET": sets,
        "COMPOSER_IMAGE": image,
        "COMPOSE_BAKE": "false",
    }.items():
        monkeypatch.setenv(key, value)
    compose = DockerCompose(context=ROOT, wait=False)
    with compose:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (coordinator := compose.get_container("coordinator", include_all=True)).State != "exited":
            assert time.monotonic() < deadline, "the run did not finish in time"
            time.sleep(2)
        logs = "".join(compose.get_logs())
        worker_states = {
            c.Name: (c.State, c.ExitCode) for c in compose.get_containers(include_all=True) if c.Service == "worker"
        }
    return dict(coordinator_exit=coordinator.ExitCode, workers=worker_states, logs=logs)


def why_it_failed(result: dict, run_name: str) -> str:
    """What a failed compose run's reader needs first: the coordinator's lines and, per container,
    its first error with the lines before it (a restarted worker's last traceback is usually only
    the closed rendezvous that the first failure left behind). The whole log is kept in
    $TMPDIR/<run>.log."""
    path = Path(tempfile.gettempdir()) / f"{run_name}.log"
    path.write_text(result["logs"])
    lines = result["logs"].splitlines()
    coordinator = [line for line in lines if line.startswith("coordinator")]
    first_errors = {}
    for i, line in enumerate(lines):
        service = line.split("|", 1)[0].strip()
        if service not in first_errors and re.search(r"Error|error|Traceback|exited [1-9]", line):
            first_errors[service] = lines[max(0, i - 15) : i + 25]
    report = ["coordinator:", *coordinator[-40:]]
    for service, excerpt in sorted(first_errors.items()):
        report += [f"first error of {service}:", *excerpt]
    return "\n".join(report + [f"(whole log: {path})"])


@pytest.mark.parametrize("workers", [2, 4])
def test_compose_up_scale_runs_to_the_end_with_identical_replicas(
    workers: int, image: str, run_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = compose_run(run_name, image, workers, monkeypatch)
    assert result["coordinator_exit"] == 0, why_it_failed(result, run_name)
    assert result["workers"] == {f"{run_name}-worker-{i}": ("exited", 0) for i in range(1, workers + 1)}

    run_dir = ROOT / "runs" / run_name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["replicas"] == summary["world_size"] == workers
    assert len(summary["replica_hashes"]) == workers and len(set(summary["replica_hashes"])) == 1
    outer = [r for r in read_metrics(run_dir) if r["event"] == "outer"]
    assert [r["outer_step"] for r in outer] == list(range(1, summary["outer_steps"] + 1))
    assert all(r["replicas"] == workers and len(set(r["replica_hashes"])) == 1 for r in outer)
    cluster = json.loads((run_dir / "cluster.json").read_text())
    assert (cluster["status"], cluster["workers"], cluster["missing_outer_steps"]) == ("ok", workers, [])
    assert cluster["final_param_hash"] == summary["final_param_hash"]
    assert (run_dir / "checkpoints").is_dir()
    assert os.stat(run_dir / "summary.json").st_uid == os.stat(ROOT / "runs").st_uid  # handed back


def test_a_streaming_diloco_run_under_compose_ends_ok_by_the_workers_verdict(
    image: str, run_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming DiLoCo's replicas legitimately differ; the coordinator takes the worker's word for it."""
    sets = "diloco.fragments=2 diloco.fragment_alpha=0.5"
    result = compose_run(run_name, image, 2, monkeypatch, sets=sets)
    assert result["coordinator_exit"] == 0, why_it_failed(result, run_name)
    assert result["workers"] == {f"{run_name}-worker-{i}": ("exited", 0) for i in (1, 2)}
    run_dir = ROOT / "runs" / run_name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["replicas_expected_to_agree"]) == ("ok", False)
    assert len(set(summary["replica_hashes"])) == 2  # they did differ: the verdict, not luck, made it ok
    cluster = json.loads((run_dir / "cluster.json").read_text())
    assert (cluster["status"], cluster["replicas_expected_to_agree"], cluster["replicas_agree"]) == ("ok", False, False)


def test_a_worker_aborting_after_the_summary_leaves_the_compose_run_ok_and_unrepeated(
    image: str, run_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in CI with 4 workers: one trainer aborted in teardown after the summary (exit -6);
    torchrun restarted the group into a new run in <run>-2, which failed until the rendezvous
    closed and the coordinator gave up on every worker. Injected here on rank 1."""
    result = compose_run(run_name, image, 2, monkeypatch, sets="debug.abort_at_exit_rank=1")
    assert result["coordinator_exit"] == 0, why_it_failed(result, run_name)
    assert result["workers"] == {f"{run_name}-worker-{i}": ("exited", 0) for i in (1, 2)}
    assert "exitcode: -6" in result["logs"]  # the abort did happen
    assert "already holds this run's summary" in result["logs"] or "after the run had ended" in result["logs"]
    run_dir = ROOT / "runs" / run_name
    assert not run_dir.with_name(f"{run_name}-2").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and len(set(summary["replica_hashes"])) == 1
    cluster = json.loads((run_dir / "cluster.json").read_text())
    assert (cluster["status"], cluster["missing_outer_steps"], cluster["resumes"]) == ("ok", [], 0)


def test_orchestrator_restarts_a_killed_worker_and_loses_no_outer_step(
    client: docker.DockerClient, image: str, run_name: str
) -> None:
    run_dir = ROOT / "runs" / run_name
    command = [
        sys.executable,
        "-m",
        "orchestrator",
        "up",
        "--workers",
        "2",
        "--config",
        CONFIG,
        "--run",
        run_name,
        "--image",
        image,
        "--set",
        "dist_timeout_s=30",
    ]
    up = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while latest_complete(run_dir / "checkpoints") is None:  # then kill in the next round
            assert up.poll() is None, up.stdout.read()
            assert time.monotonic() < deadline, "no complete checkpoint in time"
            time.sleep(0.5)
        # The replica holding global rank 0: the worst one to lose (pytorch issue 135712).
        rank0_replica = next(r["replica"] for r in read_metrics(run_dir) if r["event"] == "inner" and r["rank"] == 0)
        client.containers.get(f"composer-{run_name}-worker-{rank0_replica}").kill()
        output, _ = up.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if up.poll() is None:
            up.kill()
        subprocess.run(
            [sys.executable, "-m", "orchestrator", "down", "--run", run_name],
            cwd=ROOT,
            check=False,
            capture_output=True,
        )
    assert up.returncode == 0, output
    assert f"worker composer-{run_name}-worker-{rank0_replica} died (exit 137); restarted (1 so far)" in output

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["replicas"] == 2
    assert len(set(summary["replica_hashes"])) == 1
    records = read_metrics(run_dir)
    assert any(r["event"] == "resume" for r in records)
    assert {r["outer_step"] for r in records if r["event"] == "outer"} == set(range(1, summary["outer_steps"] + 1))
    cluster = json.loads((run_dir / "cluster.json").read_text())
    assert cluster["status"] == "ok" and cluster["missing_outer_steps"] == []
    assert cluster["restarts"] == {str(rank0_replica): 1, str(1 - rank0_replica): 0}
    assert cluster["resumes"] >= 1


def test_a_local_run_then_compose_with_eight_workers_under_the_same_name_both_finish(
    image: str, run_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make smoke` then `docker compose up --scale worker=8` in one clone: the second run must not
    resume the finished two-replica run (its checkpoint has no files for six of the eight)."""
    first = ROOT / "runs" / run_name
    local = subprocess.run(
        torchrun_command(2, "-m", "trainer.worker", "--config", CONFIG, "--set", f"name={run_name}"),
        cwd=ROOT,
        env=torchrun_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert local.returncode == 0, failure(local.stdout)
    finished = (first / "summary.json").read_text()
    try:
        result = compose_run(run_name, image, 8, monkeypatch)
        second = first.with_name(f"{run_name}-2")
        assert result["coordinator_exit"] == 0, why_it_failed(result, run_name)
        assert f"holds a finished run; this run writes to /app/runs/{run_name}-2" in result["logs"]
        assert result["workers"] == {f"{run_name}-worker-{i}": ("exited", 0) for i in range(1, 9)}
        assert (first / "summary.json").read_text() == finished  # the finished run is left as it was
        summary = json.loads((second / "summary.json").read_text())
        assert (summary["status"], summary["replicas"]) == ("ok", 8)
        assert not [r for r in read_metrics(second) if r["event"] == "resume"]
    finally:
        shutil.rmtree(first.with_name(f"{run_name}-2"), ignore_errors=True)
