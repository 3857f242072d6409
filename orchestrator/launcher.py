"""The host side of `python -m orchestrator`: starts a run's containers through the Docker SDK,
shows its progress, restarts dead workers, and tears it down.

Everything it creates carries the label `composer-replication.run=<run>`, which is how `status`,
`logs` and `down` find a run again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.models.containers import Container

from orchestrator.cluster import LABEL_REPLICA, LABEL_ROLE, LABEL_RUN, LABEL_RUNS_DIR, RUNS_MOUNT
from orchestrator.follow import follow
from orchestrator.images import DEFAULT_IMAGE, GPU_IMAGE, ensure_image, repo_root
from orchestrator.progress import MetricsTail, RunProgress
from orchestrator.supervisor import WorkerSupervisor
from trainer.run.placement import choose_run_dir

PROGRESS_EVERY_S = 10.0


@dataclass
class UpOptions:
    workers: int
    config: str
    run: str
    overrides: list[str] = field(default_factory=list)
    image: str | None = None  # default: DEFAULT_IMAGE, or GPU_IMAGE with gpus
    runs_dir: Path = Path("runs")
    torch_restarts: int = 3
    worker_restarts: int = 3
    threads: int = 1
    gpus: bool = False
    rebuild: bool = False


def resource_name(run: str, part: str) -> str:
    return f"composer-{run}-{part}"


def container_config_path(config: str) -> str:
    """The config's path inside the containers, which see the repository's configs/ only."""
    configs = repo_root() / "configs"
    path = Path(config).resolve()
    if not path.is_relative_to(configs):
        raise ValueError(f"--config {config}: the containers see {configs} only; put the config there")
    return f"configs/{path.relative_to(configs)}"


def run_containers(client: docker.DockerClient, run: str | None = None) -> list[Container]:
    label = f"{LABEL_RUN}={run}" if run else LABEL_RUN
    return sorted(client.containers.list(all=True, filters={"label": label}), key=lambda c: c.name)


def up(client: docker.DockerClient, options: UpOptions, out: Callable[[str], None] = print) -> int:
    """Runs `options.workers` trainer containers and their coordinator to the end of the run;
    returns the coordinator's exit status (0 when the run finished with every step accounted)."""
    if options.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {options.workers}")
    config = container_config_path(options.config)
    image = options.image or (GPU_IMAGE if options.gpus else DEFAULT_IMAGE)
    ensure_image(client, tag=image, rebuild=options.rebuild, gpu=options.gpus, log=out)
    down(client, options.run, out=lambda _line: None)  # leftovers of an earlier run of this name
    runs_dir = options.runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_dir = choose_run_dir(runs_dir / options.run)  # the coordinator makes the same choice
    (run_dir / "cluster.json").unlink(missing_ok=True)  # an unfinished earlier attempt's verdict
    labels = {LABEL_RUN: options.run}
    network = client.networks.create(resource_name(options.run, "net"), driver="bridge", internal=True, labels=labels)
    volume = client.volumes.create(
        resource_name(options.run, "runs"),
        driver="local",
        driver_opts={"type": "none", "o": "bind", "device": str(runs_dir)},
        labels=labels | {LABEL_RUNS_DIR: str(runs_dir)},
    )
    env = {
        "COMPOSER_CONFIG": config,
        "COMPOSER_RUN": options.run,
        "COMPOSER_SET": " ".join(options.overrides),
        "COMPOSER_MAX_RESTARTS": str(options.torch_restarts),
    }
    common = {
        "image": image,
        "volumes": {
            volume.name: {"bind": str(RUNS_MOUNT), "mode": "rw"},
            str(repo_root() / "configs"): {"bind": "/app/configs", "mode": "ro"},  # edits need no rebuild
        },
        "network": network.name,
        "detach": True,
    }
    coordinator = client.containers.create(
        command=["python", "-m", "orchestrator.coordinator"],
        name=resource_name(options.run, "coordinator"),
        user="0",  # hands the run directory to the trainer user and back to you
        environment=env | {"COMPOSER_WORKERS": str(options.workers)},
        labels=labels | {LABEL_ROLE: "coordinator"},
        networking_config={network.name: client.api.create_endpoint_config(aliases=["coordinator"])},
        **common,
    )
    coordinator.start()
    gpu = {"device_requests": [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]} if options.gpus else {}
    for replica in range(options.workers):
        client.containers.create(
            name=resource_name(options.run, f"worker-{replica}"),
            environment=env
            | {
                "COMPOSER_REPLICA_ID": str(replica),
                "OMP_NUM_THREADS": str(options.threads),
                "COMPOSER_NPROC_PER_NODE": "gpu" if options.gpus else "1",
            },
            labels=labels | {LABEL_ROLE: "worker", LABEL_REPLICA: str(replica)},
            **common,
            **gpu,
        ).start()
    out(f"run {options.run}: {options.workers} workers on {image}, config {config}, results in {run_dir}")
    supervisor = WorkerSupervisor(client, labels | {LABEL_ROLE: "worker"}, max_restarts=options.worker_restarts)
    try:
        return watch(coordinator, supervisor, run_dir, out)
    except KeyboardInterrupt:
        out("interrupted: stopping the run's containers")
        for container in run_containers(client, options.run):
            if container.status == "running":
                container.stop(timeout=10)
        return 130


def watch(coordinator: Container, supervisor: WorkerSupervisor, run_dir: Path, out: Callable[[str], None]) -> int:
    """Follow a run from this host until its coordinator exits; its exit status is the run's."""
    tail = MetricsTail(run_dir / "metrics.jsonl")
    progress = RunProgress()

    def alive() -> str:
        workers = supervisor.workers()
        names = [w.labels.get(LABEL_REPLICA, w.name) for w in workers if w.status == "running"]
        return f" | alive {len(names)}/{len(workers)} [{','.join(names)}]"

    def coordinator_exited() -> bool:
        coordinator.reload()
        return coordinator.status in ("exited", "dead")

    finished, reason = follow(
        out=out,
        done=coordinator_exited,
        supervisor=supervisor,
        progress=progress,
        tail=tail,
        status=alive,
        progress_every_s=PROGRESS_EVERY_S,
        first_line_at_once=False,
    )
    if not finished:
        coordinator.stop(timeout=10)
        out(f"run failed: {reason}")
        return 1
    progress.update(tail.read())
    code = int(coordinator.attrs["State"]["ExitCode"])
    if code != 0:  # without their rendezvous store the workers cannot finish
        supervisor.stop_all()
    report_path = run_dir / "cluster.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        restarts = sum(int(count) for count in report.get("restarts", {}).values())
        out(
            f"run {report['status']}: {report['outer_steps_seen']}/{report['outer_steps']} outer steps, "
            f"missing {report['missing_outer_steps']}, worker restarts {restarts}, "
            f"resumes {report['resumes']}, {report['seconds']} s"
            + (f" ({report['reason']})" if report.get("reason") else "")
        )
    else:
        out(f"coordinator exited {code} without writing {report_path}; see `python -m orchestrator logs`")
    return code


def status(client: docker.DockerClient, run: str | None, out: Callable[[str], None] = print) -> int:
    containers = run_containers(client, run)
    if not containers:
        out("no runs" if run is None else f"no containers for run {run}")
        return 1 if run else 0
    runs: dict[str, list[Container]] = {}
    for container in containers:
        runs.setdefault(container.labels[LABEL_RUN], []).append(container)
    for name, members in runs.items():
        out(f"run {name}")
        for container in members:
            state = container.attrs["State"]
            exit_text = f" (exit {state['ExitCode']})" if state["Status"] == "exited" else ""
            out(f"  {container.name:<40} {state['Status']}{exit_text}")
        progress = RunProgress()
        for volume in client.volumes.list(filters={"label": f"{LABEL_RUN}={name}"}):
            run_dir = Path(volume.attrs["Labels"][LABEL_RUNS_DIR]) / name
            progress.update(MetricsTail(run_dir / "metrics.jsonl").read())
            out(f"  progress: {progress.line()}  ({run_dir})")
    return 0


def logs(
    client: docker.DockerClient,
    run: str,
    target: str,
    *,
    follow: bool,
    tail: int,
    out: Callable[[str], None] = print,
) -> int:
    """`target` is `coordinator`, a worker's replica index, or `all`."""
    containers = run_containers(client, run)
    if target != "all":
        role_match = (
            (lambda c: c.labels.get(LABEL_ROLE) == "coordinator")
            if target == "coordinator"
            else (lambda c: c.labels.get(LABEL_REPLICA) == target)
        )
        containers = [c for c in containers if role_match(c)]
    if not containers:
        out(f"no container {target!r} in run {run}")
        return 1
    if follow and len(containers) > 1:
        raise ValueError("--follow needs one container: pass coordinator or a worker index")
    for container in containers:
        if follow:
            for chunk in container.logs(stream=True, follow=True, tail=tail):
                out(chunk.decode(errors="replace").rstrip("\n"))
        else:
            for line in container.logs(tail=tail).decode(errors="replace").splitlines():
                out(f"{container.name}: {line}")
    return 0


def down(client: docker.DockerClient, run: str | None, out: Callable[[str], None] = print) -> int:
    label = {"label": f"{LABEL_RUN}={run}" if run else LABEL_RUN}
    removed = 0
    for container in run_containers(client, run):
        container.remove(force=True)
        removed += 1
    for network in client.networks.list(filters=label):
        network.remove()
    for volume in client.volumes.list(filters=label):
        volume.remove(force=True)
    out(f"removed {removed} containers" + (f" of run {run}" if run else ""))
    return 0
