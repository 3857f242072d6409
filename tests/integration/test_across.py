"""One run across machines (issue 16) on the emulated multi-host test bed (orchestrator.testbed):
three network namespaces, each with its own address on a bridge and its own Docker engine, the
image moved into each with `docker save | docker load`. Every command is the one a user types on
that machine: `python -m orchestrator serve` on h1, `python -m orchestrator join` on h2 and h3,
run inside the host's namespace with DOCKER_HOST at its engine.

Skips where the test bed's preconditions are missing (no engine answers, or `TestBed.check()`:
not root, a tool missing), and fails there under COMPOSER_REQUIRE_DOCKER=1; an error while bringing
the bed up is always a failure.
COMPOSER_TEST_IMAGE names the image to build and use (default: the project's image).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

import docker  # noqa: E402

from orchestrator.images import DEFAULT_IMAGE, SOURCE_LABEL, ensure_image, repo_root  # noqa: E402
from orchestrator.testbed import TestBed, TestBedError  # noqa: E402
from tests.support.docker_engine import docker_client, unavailable  # noqa: E402
from trainer.checkpoint import latest_complete  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.integration]

ROOT = repo_root()
CONFIG = "configs/test.yaml"  # the refusals: they end before any training
RUN_CONFIG = "configs/smoke.yaml"  # the run to the end: the smoke config as `make smoke` runs it
IMAGE = os.environ.get("COMPOSER_TEST_IMAGE", DEFAULT_IMAGE)
RUN_TIMEOUT_S = 2400  # three replicas on two loaded cores: ~17 min
SECRET = "pytest-across-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def bed() -> Iterator[TestBed]:
    """Skips (fails under COMPOSER_REQUIRE_DOCKER=1) only where a precondition is missing: no engine
    answers, or `TestBed.check()` names what this machine lacks. Once those hold, an error from
    `up()` (an `ip` command refused, a dockerd that never answers) fails the tests that use it."""
    client = docker_client()
    try:
        TestBed.check()
    except TestBedError as error:
        missing = str(error)
    else:
        missing = None
    if missing is not None:
        unavailable(f"the multi-host test bed cannot run here: {missing}")
    testbed = TestBed(3)
    try:
        testbed.up()
        ensure_image(client, tag=IMAGE, log=lambda _line: None)
        testbed.load_image(IMAGE)
        yield testbed
    finally:
        testbed.down()


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "run.secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def orchestrator(bed: TestBed, host: int, command: str, *args: str, secret: Path, runs: Path) -> list[str]:
    """`python -m orchestrator COMMAND ARGS` as typed on emulated host `host` (1-based); ARGS come
    last, so they override the common ones."""
    common = ["--config", CONFIG, "--image", IMAGE, "--runs-dir", str(runs), "--name", f"h{host}"]
    argv = [sys.executable, "-m", "orchestrator", command, *common, "--secret-file", str(secret), *args]
    return bed.hosts[host - 1].command(*argv)


def start(bed: TestBed, host: int, command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=bed.hosts[host - 1].env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def down(bed: TestBed, run: str) -> None:
    for host in bed.hosts:
        subprocess.run(
            [sys.executable, "-m", "orchestrator", "down", "--run", run],
            cwd=ROOT,
            env=host.env(),
            capture_output=True,
        )


def test_three_hosts_run_to_the_end_with_equal_replicas_and_a_killed_host_rejoins_losing_no_outer_step(
    bed: TestBed, secret_file: Path, tmp_path: Path
) -> None:
    run = "pytest-across"
    runs = {h: tmp_path / f"h{h}-runs" for h in (1, 2, 3)}
    # The smoke config to its end (16 rounds); the kill lands after the first checkpoint.
    sets = ["--run", run, "--config", RUN_CONFIG, "--set", "dist_timeout_s=30"]
    serve = start(
        bed,
        1,
        orchestrator(
            bed, 1, "serve", "--replicas", "3", "--interface", "eth1", *sets, secret=secret_file, runs=runs[1]
        ),
        tmp_path / "serve.log",
    )
    joins = {}
    for h in (2, 3):  # one after the other, so h2 gets replica 1 and h3 replica 2
        command = orchestrator(
            bed, h, "join", "--coordinator", "10.213.0.1:29400", *sets, secret=secret_file, runs=runs[h]
        )
        joins[h] = start(bed, h, command, tmp_path / f"join-h{h}.log")
        deadline = time.monotonic() + 120
        while "joined run" not in (tmp_path / f"join-h{h}.log").read_text():
            assert joins[h].poll() is None and time.monotonic() < deadline, (tmp_path / f"join-h{h}.log").read_text()
            time.sleep(0.2)
    rejoin = None
    try:
        run_dir = runs[1] / run
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while latest_complete(run_dir / "checkpoints") is None:  # then take h3 down in the next round
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "no complete checkpoint in time"
            time.sleep(0.5)
        # h3 loses power: its join process and its worker container die at once.
        os.killpg(joins[3].pid, signal.SIGKILL)
        docker.DockerClient(base_url=bed.hosts[2].docker_host).containers.get(f"composer-{run}-worker-2").kill()
        joins[3].wait()
        time.sleep(5)
        rejoin = start(
            bed,
            3,
            orchestrator(bed, 3, "join", "--coordinator", "10.213.0.1:29400", *sets, secret=secret_file, runs=runs[3]),
            tmp_path / "rejoin-h3.log",
        )
        assert serve.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path / "serve.log").read_text()[-4000:]
        assert joins[2].wait(timeout=120) == 0, (tmp_path / "join-h2.log").read_text()
        assert rejoin.wait(timeout=120) == 0, (tmp_path / "rejoin-h3.log").read_text()
    finally:
        for process in (serve, *joins.values(), rejoin):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        down(bed, run)

    assert (
        "rejoined run pytest-across at 10.213.0.1:29400 as h3: replicas [2]" in (tmp_path / "rejoin-h3.log").read_text()
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["replicas"]) == ("ok", 3)
    assert len(summary["replica_hashes"]) == 3 and len(set(summary["replica_hashes"])) == 1
    records = read_metrics(run_dir)
    assert any(r["event"] == "resume" for r in records)
    assert {r["outer_step"] for r in records if r["event"] == "outer"} == set(range(1, summary["outer_steps"] + 1))
    cluster = json.loads((run_dir / "cluster.json").read_text())
    assert (cluster["status"], cluster["missing_outer_steps"]) == ("ok", [])
    assert {name: (h["address"], h["replicas"], h["joins"]) for name, h in cluster["hosts"].items()} == {
        "h1": ("10.213.0.1", [0], 1),
        "h2": ("10.213.0.2", [1], 1),
        "h3": ("10.213.0.3", [2], 2),
    }
    # Where state lives: each host keeps its own replica's checkpoints, only h1 the books.
    for host, replica in ((1, 0), (2, 1), (3, 2)):
        checkpoints = runs[host] / run / "checkpoints"
        last = checkpoints / f"step-{summary['outer_steps']:06d}"
        assert sorted(p.name for p in last.iterdir()) == [
            "COMPLETE",
            f"replica-{replica}.pt",
            f"replica-{replica}.safetensors",
        ]
        assert (checkpoints / "reference.safetensors").is_file()
    assert all((run_dir / name).is_file() for name in ("metrics.jsonl", "summary.json", "curves.png", "cluster.json"))
    assert not any((runs[h] / run / "metrics.jsonl").exists() for h in (2, 3))
    tokenizers = {h: sorted((runs[h] / run).glob("tokenizer-*/tokenizer.json")) for h in (1, 2, 3)}
    assert len({paths[0].read_bytes() for paths in tokenizers.values()}) == 1  # each host trained the same one
    logs = "".join((tmp_path / name).read_text() for name in ("serve.log", "join-h2.log", "rejoin-h3.log"))
    assert SECRET not in logs


@pytest.fixture(scope="module")
def waiting_run(bed: TestBed, secret_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A run served on h1 that waits for a second host: what the refusals are tried against."""
    tmp = tmp_path_factory.mktemp("refusals")
    run = "pytest-refusals"
    command = orchestrator(
        bed, 1, "serve", "--replicas", "2", "--interface", "eth1", "--run", run, secret=secret_file, runs=tmp / "h1"
    )
    serve = start(bed, 1, command, tmp / "serve.log")
    try:
        deadline = time.monotonic() + 120
        while "make join COORDINATOR=" not in (tmp / "serve.log").read_text():
            assert serve.poll() is None and time.monotonic() < deadline, (tmp / "serve.log").read_text()
            time.sleep(0.5)
        yield tmp
    finally:
        os.killpg(serve.pid, signal.SIGKILL)
        down(bed, run)


def try_join(
    bed: TestBed, host: int, secret: Path, tmp: Path, *extra: str, coordinator: str = "10.213.0.1:29400"
) -> tuple[int, str, float]:
    command = orchestrator(
        bed,
        host,
        "join",
        "--coordinator",
        coordinator,
        "--run",
        "pytest-refusals",
        *extra,
        secret=secret,
        runs=tmp / f"h{host}",
    )
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=ROOT, env=bed.hosts[host - 1].env(), capture_output=True, text=True, timeout=300
    )
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def coordinator_log(bed: TestBed) -> str:
    client = docker.DockerClient(base_url=bed.hosts[0].docker_host)
    return client.containers.get("composer-pytest-refusals-coordinator").logs().decode()


def test_a_host_with_a_different_config_is_refused_in_one_line_naming_the_key(
    bed: TestBed, secret_file: Path, waiting_run: Path
) -> None:
    code, output, _ = try_join(bed, 2, secret_file, waiting_run, "--set", "optim.lr=0.002")
    assert code == 2
    assert output.strip().splitlines()[-1] == (
        "error: refused: config differs from the coordinator's at optim.lr (coordinator 0.001, this host 0.002)"
    )
    assert not docker.DockerClient(base_url=bed.hosts[1].docker_host).containers.list(all=True)


def test_a_host_with_a_different_image_is_refused_in_one_line_naming_both(
    bed: TestBed, secret_file: Path, waiting_run: Path
) -> None:
    """An image built from another tree (its source hash differs), as a stale checkout would make."""
    client = docker.DockerClient(base_url=bed.hosts[2].docker_host)
    ours = client.images.get(IMAGE)
    dockerfile = f"FROM {ours.id}\nLABEL {SOURCE_LABEL}=0123456789abcdef\n"
    other, _ = client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag="composer-pytest:other", rm=True, forcerm=True
    )
    try:
        code, output, _ = try_join(bed, 3, secret_file, waiting_run, "--image", "composer-pytest:other")
    finally:
        client.images.remove(other.id, force=True)
    assert code == 2
    assert output.strip().splitlines()[-1] == (
        f"error: refused: image differs: this host runs {other.id} source 0123456789abcdef, "
        f"the coordinator {ours.id} source {ours.labels[SOURCE_LABEL]}"
    )


def test_a_wrong_secret_is_refused_and_logged_by_the_coordinator(bed: TestBed, waiting_run: Path) -> None:
    wrong = waiting_run / "wrong.secret"
    wrong.write_text("not-the-run-secret-0123456789\n")
    code, output, _ = try_join(bed, 2, wrong, waiting_run)
    assert code == 2
    assert (
        output.strip().splitlines()[-1]
        == "error: the coordinator at 10.213.0.1:29400 refused this machine: wrong secret"
    )
    log = coordinator_log(bed)
    assert "gate: refused 10.213.0.2:" in log and "wrong secret" in log
    assert SECRET not in log and "not-the-run-secret" not in log


def test_an_unreachable_coordinator_is_a_clear_error_after_the_timeout_not_a_hang(
    bed: TestBed, secret_file: Path, waiting_run: Path
) -> None:
    code, output, seconds = try_join(
        bed, 2, secret_file, waiting_run, "--timeout", "5", coordinator="10.213.0.99:29400"
    )
    assert code == 2
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: no coordinator answers at 10.213.0.99:29400 (")
    assert last.endswith("port 29400/tcp is open on its host; gave up after 5 s")
    assert 5 <= seconds < 60
