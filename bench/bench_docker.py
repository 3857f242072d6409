"""Container start-up cost: seconds from `docker compose up --scale worker=N` to the first outer
DiLoCo step for N = 2, 4, 8 (configs/test.yaml, so that the trainer's own work stays small), the
spread between the first and the last worker reaching the rendezvous (what an elastic
`--nnodes=MIN:MAX` last-call window would have to outlast), the whole run, and the image size.

Writes bench/results/docker.md and docker.json. Needs a Docker engine and the image
(`make image`); skips with a message when there is no engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.images import DEFAULT_IMAGE, ensure_image  # noqa: E402
from trainer.run.placement import write_json  # noqa: E402

CONFIG = "configs/test.yaml"
WORKER_COUNTS = (2, 4, 8)
TIMEOUT_S = 1800
RESULTS = ROOT / "bench" / "results"


def first_outer_step_seen(metrics: Path) -> bool:
    if not metrics.exists():
        return False
    return any('"event": "outer"' in line or '"event":"outer"' in line for line in metrics.read_text().splitlines())


def node_ready_times(client: docker.DockerClient, project: str) -> list[float]:
    """When each worker container was ready to rendezvous (its launcher's first `[node]` line)."""
    times = []
    for container in client.containers.list(
        all=True, filters={"label": [f"com.docker.compose.project={project}", "com.docker.compose.service=worker"]}
    ):
        for line in container.logs(timestamps=True).decode(errors="replace").splitlines():
            stamp, _, text = line.partition(" ")
            if text.startswith("[node] "):
                times.append(datetime.fromisoformat(stamp[:26] + "+00:00").timestamp())
                break
    return sorted(times)


def measure(client: docker.DockerClient, workers: int) -> dict:
    project = run = f"bench-docker-{workers}"
    run_dir = ROOT / "runs" / run
    shutil.rmtree(run_dir, ignore_errors=True)
    env = os.environ | {
        "COMPOSE_PROJECT_NAME": project,
        "COMPOSER_CONFIG": CONFIG,
        "COMPOSER_RUN": run,
        "COMPOSER_IMAGE": DEFAULT_IMAGE,
        "COMPOSE_BAKE": "false",
    }
    compose = ["docker", "compose", "-f", str(ROOT / "docker-compose.yml")]
    try:
        start = time.time()
        subprocess.run(
            [*compose, "up", "--detach", "--scale", f"worker={workers}"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        started = time.time()
        first_outer = None
        coordinator = client.containers.get(f"{project}-coordinator-1")
        while time.time() - start < TIMEOUT_S:
            if first_outer is None and first_outer_step_seen(run_dir / "metrics.jsonl"):
                first_outer = time.time()
            coordinator.reload()
            if coordinator.status == "exited":
                break
            time.sleep(0.25)
        end = time.time()
        ready = node_ready_times(client, project)
        cluster = json.loads((run_dir / "cluster.json").read_text())
        return {
            "workers": workers,
            "containers_started_s": round(started - start, 1),
            "first_outer_step_s": round(first_outer - start, 1) if first_outer else None,
            "rendezvous_spread_s": round(ready[-1] - ready[0], 1) if len(ready) == workers else None,
            "run_s": round(end - start, 1),
            "exit_code": coordinator.attrs["State"]["ExitCode"],
            "status": cluster["status"],
            "outer_steps": cluster["outer_steps"],
            "replica_hashes_agree": cluster["replica_hashes_agree"],
        }
    finally:
        subprocess.run([*compose, "down", "--remove-orphans"], env=env, cwd=ROOT, check=False, capture_output=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        print(f"bench_docker: skipped, no Docker engine answers ({error}); `make image` provisions one")
        return 0
    image = ensure_image(client, tag=DEFAULT_IMAGE)
    rows = [measure(client, workers) for workers in WORKER_COUNTS]
    for row in rows:
        print(json.dumps(row))
    size_mib = image.attrs["Size"] / 2**20
    result = {
        "image": DEFAULT_IMAGE,
        "image_size_mib": round(size_mib),
        "config": CONFIG,
        "cpus": os.cpu_count(),
        "runs": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "docker.json", result)
    lines = [
        "# Containers: `docker compose up --scale worker=N`",
        "",
        f"`bench/bench_docker.py`, {CONFIG}, {os.cpu_count()} CPUs, no GPU. Image `{DEFAULT_IMAGE}`: "
        f"{size_mib:.0f} MiB.",
        "",
        "Seconds from `compose up` (containers created, nothing running) to: all containers started; the "
        "first outer DiLoCo step in metrics.jsonl; the run's end (coordinator exited). Rendezvous spread: "
        "seconds between the first and the last worker container ready to rendezvous. On a machine "
        "shared with other work these seconds vary with its load: all containers together compete as "
        "one cgroup (cgroup v1, cpu.shares 1024) against each host process.",
        "",
        "| workers | started | first outer step | rendezvous spread | whole run | status | replicas agree |",
        "| ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['workers']} | {row['containers_started_s']} | {row['first_outer_step_s']} | "
            f"{row['rendezvous_spread_s']} | {row['run_s']} | {row['status']} (exit {row['exit_code']}) | "
            f"{row['replica_hashes_agree']} |"
        )
    (RESULTS / "docker.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'docker.md'}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
