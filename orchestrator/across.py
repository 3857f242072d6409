"""One run over several machines (issue 16): `python -m orchestrator serve` on the first machine,
`python -m orchestrator join` (`make join`) on each of the others.

`serve` starts the coordinator (the rendezvous store behind the authenticating gate, the run
directory, the verdict) and this machine's workers, and prints what the others need. `join` asks
the coordinator for replica indices with this machine's image and config (refused in one line when
either differs), then starts its workers, which reach the store only through the gate and run
Gloo/NCCL over the chosen interface. Every container uses the host's network: torchrun advertises
the host's address and the collectives open peer-to-peer connections on ports the kernel picks,
which published ports cannot cover. Each machine keeps its replicas' checkpoints in its own runs
directory; the coordinator's machine also keeps metrics, summary.json, curves.png and cluster.json.

Engine: torchrun's c10d rendezvous, as on one host (docs/deployment.md, "Across machines", says why).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import docker
from docker.models.containers import Container
from docker.models.images import Image

from orchestrator import gate
from orchestrator.cluster import (
    LABEL_REPLICA,
    LABEL_ROLE,
    LABEL_RUN,
    RDZV_PORT,
    RUNS_MOUNT,
    ClusterError,
    interface_address,
    route_interface,
)
from orchestrator.follow import follow
from orchestrator.images import DEFAULT_IMAGE, GPU_IMAGE, ensure_image, image_identity, repo_root
from orchestrator.launcher import container_config_path, down, resource_name, watch
from orchestrator.supervisor import WorkerSupervisor
from trainer.config import ConfigError, dump_config, load_config

SECRET_MOUNT = "/run/secrets/composer"
TRAINER_UID = "10001"  # the image's trainer user (Dockerfile)


class JoinError(RuntimeError):
    """This machine may not join (refused, unreachable, misconfigured): one line saying why."""


@dataclass
class AcrossOptions:
    config: str
    run: str
    secret: bytes
    overrides: list[str] = field(default_factory=list)
    workers: int = 1  # this machine's workers (= replicas)
    image: str | None = None  # as given, never rebuilt; default: DEFAULT_IMAGE, built when stale
    runs_dir: Path = Path("runs")
    interface: str | None = None
    port: int = RDZV_PORT
    name: str = field(default_factory=socket.gethostname)  # how the coordinator knows this machine
    timeout_s: float = 60.0  # for the coordinator to answer
    torch_restarts: int = 3
    worker_restarts: int = 3
    threads: int = 1
    gpus: bool = False


def local_image(
    client: docker.DockerClient, options: AcrossOptions, out: Callable[[str], None], *, joining: bool
) -> Image:
    """The image this machine runs: `--image` exactly as it is here, else the default tag. The
    serving machine's tree defines the run's image, so `serve` builds the tag when it is missing or
    stale. A joining machine runs the tag as it has it (moved in by `docker save | docker load`:
    never rebuilt, since a rebuild from a checkout provisioned differently gives another image,
    which the coordinator refuses) and builds it from its tree only when the tag is missing."""
    if options.image is None:
        tag = GPU_IMAGE if options.gpus else DEFAULT_IMAGE
        if joining:
            try:
                return client.images.get(tag)
            except docker.errors.ImageNotFound:
                pass
        return ensure_image(client, tag=tag, gpu=options.gpus, log=out)
    try:
        return client.images.get(options.image)
    except docker.errors.ImageNotFound:
        raise JoinError(
            f"image {options.image} is not on this machine: `docker save {options.image} | ssh HOST docker load` "
            "copies it, or `python -m orchestrator build` builds it from the same tree"
        ) from None


def run_config(options: AcrossOptions) -> dict:
    try:
        return dump_config(load_config(options.config, options.overrides))
    except ConfigError as error:
        raise JoinError(str(error)) from None


def secret_file(runs_dir: Path, run: str, secret: bytes) -> Path:
    """The secret as a file to mount into the containers (never an environment variable, which
    `docker inspect` shows): readable inside, in a folder only the owner can enter here."""
    folder = runs_dir / ".secrets"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / run
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secret.decode())
    return path


def choose_interface(options: AcrossOptions, toward: str | None, out: Callable[[str], None]) -> tuple[str, str]:
    """(interface, address) the collectives bind to: `--interface`, else the one the kernel routes
    `toward` the coordinator through (or the default route's on the coordinator's machine). Logged."""
    if options.interface:
        interface, address, why = options.interface, interface_address(options.interface), "--interface"
    else:
        try:
            interface, address = route_interface(toward or "192.0.2.1")  # TEST-NET-1: the default route
        except ClusterError as error:
            raise JoinError(f"{error}: pass --interface (the network card the other machines reach)") from None
        why = "the route to the coordinator" if toward else "the default route"
    out(f"interface {interface} ({address}): {why}; Gloo/NCCL bind to it (--interface to choose another)")
    return interface, address


def hello(
    options: AcrossOptions,
    image: Image,
    coordinator: tuple[str, int],
    address: str,
    local: Container | None = None,
) -> dict:
    """Ask the coordinator for this machine's replicas; retries while nothing answers, up to
    `options.timeout_s`, then one clear error. A refusal is final; so is the exit of the `local`
    coordinator container (serve), whose last log lines the error carries."""
    message = {
        "kind": "join",
        "host": options.name,
        "workers": options.workers,
        "image": image_identity(image),
        "config": run_config(options),
        "address": address,
    }
    deadline = time.monotonic() + options.timeout_s
    while True:
        try:
            answer = gate.request(options.secret, coordinator, message, timeout_s=min(10.0, options.timeout_s))
            break
        except gate.GateError as error:
            if "no coordinator answers" not in str(error):
                raise JoinError(str(error)) from None  # refused, or not this run's coordinator
            if time.monotonic() > deadline:
                raise JoinError(f"{error}; gave up after {options.timeout_s:.0f} s") from None
            if local is not None:
                local.reload()
                if local.status in ("exited", "dead"):
                    tail = local.logs(tail=3).decode(errors="replace").strip()
                    raise JoinError(f"the coordinator exited before it answered: {tail}") from None
            time.sleep(1.0)
    if not answer.get("ok"):
        raise JoinError(f"refused: {answer.get('error')}")
    return answer


def _worker_env(options: AcrossOptions, coordinator: tuple[str, int], interface: str, replica: int) -> dict:
    return {
        "COMPOSER_CONFIG": container_config_path(options.config),
        "COMPOSER_RUN": options.run,
        "COMPOSER_SET": " ".join(options.overrides),
        "COMPOSER_MAX_RESTARTS": str(options.torch_restarts),
        "COMPOSER_COORDINATOR": coordinator[0],
        "COMPOSER_RDZV_PORT": str(coordinator[1]),
        "COMPOSER_REPLICA_ID": str(replica),
        "COMPOSER_INTERFACE": interface,
        gate.SECRET_FILE_ENV: SECRET_MOUNT,
        "OMP_NUM_THREADS": str(options.threads),
        "COMPOSER_NPROC_PER_NODE": "gpu" if options.gpus else "1",
    }


def _mounts(options: AcrossOptions, secret_path: Path) -> dict:
    return {
        str(options.runs_dir.resolve()): {"bind": str(RUNS_MOUNT), "mode": "rw"},
        str(repo_root() / "configs"): {"bind": "/app/configs", "mode": "ro"},
        str(secret_path): {"bind": SECRET_MOUNT, "mode": "ro"},
    }


def start_workers(
    client: docker.DockerClient,
    options: AcrossOptions,
    image: Image,
    replicas: list[int],
    coordinator: tuple[str, int],
    interface: str,
    secret_path: Path,
) -> None:
    gpu = {"device_requests": [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]} if options.gpus else {}
    for replica in replicas:
        client.containers.create(
            image.id,
            name=resource_name(options.run, f"worker-{replica}"),
            environment=_worker_env(options, coordinator, interface, replica),
            labels={LABEL_RUN: options.run, LABEL_ROLE: "worker", LABEL_REPLICA: str(replica)},
            volumes=_mounts(options, secret_path),
            network_mode="host",
            detach=True,
            **gpu,
        ).start()


def _chown(
    client: docker.DockerClient, image: Image, options: AcrossOptions, run_dir: PurePosixPath, owner: str
) -> None:
    """chown -R inside a throwaway root container: the trainer user writes the run, you get it back."""
    client.containers.run(
        image.id,
        ["chown", "-R", owner, str(run_dir)],
        user="0",
        volumes={str(options.runs_dir.resolve()): {"bind": str(RUNS_MOUNT), "mode": "rw"}},
        network_mode="none",
        remove=True,
    )


def serve(
    client: docker.DockerClient, options: AcrossOptions, replicas: int, out: Callable[[str], None] = print
) -> int:
    """The first machine: coordinator + this machine's workers, to the end of the run; returns the
    coordinator's exit status (0: the run finished with every outer step accounted for)."""
    if not 1 <= options.workers <= replicas:
        raise JoinError(f"--workers {options.workers} must be between 1 and --replicas {replicas}")
    image = local_image(client, options, out, joining=False)
    interface, address = choose_interface(options, None, out)
    down(client, options.run, out=lambda _line: None)
    runs_dir = options.runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    secret_path = secret_file(runs_dir, options.run, options.secret)
    coordinator = client.containers.create(
        image.id,
        ["python", "-m", "orchestrator.coordinator"],
        name=resource_name(options.run, "coordinator"),
        user="0",  # hands the run directory to the trainer user and back to you
        environment={
            "COMPOSER_CONFIG": container_config_path(options.config),
            "COMPOSER_RUN": options.run,
            "COMPOSER_SET": " ".join(options.overrides),
            "COMPOSER_WORKERS": str(replicas),
            "COMPOSER_RDZV_PORT": str(options.port),
            "COMPOSER_GATE_BIND": address,
            "COMPOSER_IMAGE_ID": image_identity(image),
            "COMPOSER_HOST_NAME": options.name,  # this machine holds replicas 0.. (the lead's)
            "COMPOSER_HOST_WORKERS": str(options.workers),
            gate.SECRET_FILE_ENV: SECRET_MOUNT,
        },
        labels={LABEL_RUN: options.run, LABEL_ROLE: "coordinator"},
        volumes=_mounts(options, secret_path),
        network_mode="host",
        detach=True,
    )
    coordinator.start()
    endpoint = (address, options.port)
    answer = hello(options, image, endpoint, address, local=coordinator)
    run_dir = runs_dir / PurePosixPath(answer["run_dir"]).name
    start_workers(client, options, image, answer["replicas"], endpoint, interface, secret_path)
    out(
        f"run {options.run}: coordinator at {address}:{options.port}, {replicas} replicas over all hosts, "
        f"this host has {answer['replicas']}; results in {run_dir}"
    )
    out(
        f"on each other machine (same tree, same image), with the secret in {secret_path} copied there:\n"
        f"  make join COORDINATOR={address}:{options.port} SECRET_FILE=<its copy> CONFIG={options.config}"
        + (f" SET='{' '.join(options.overrides)}'" if options.overrides else "")
    )
    labels = {LABEL_RUN: options.run, LABEL_ROLE: "worker"}
    supervisor = WorkerSupervisor(client, labels, max_restarts=options.worker_restarts)
    try:
        return watch(coordinator, supervisor, run_dir, out)
    except KeyboardInterrupt:
        out("interrupted: stopping this machine's containers")
        supervisor.stop_all()
        coordinator.stop(timeout=10)
        return 130


def join(
    client: docker.DockerClient,
    options: AcrossOptions,
    coordinator: tuple[str, int],
    out: Callable[[str], None] = print,
) -> int:
    """Another machine: ask to join, start this machine's workers, keep them alive (restarting a
    dead one) until each has finished; returns 0 when all did."""
    image = local_image(client, options, out, joining=True)
    interface, address = choose_interface(options, coordinator[0], out)
    answer = hello(options, image, coordinator, address)
    out(
        f"{'rejoined' if answer['rejoined'] else 'joined'} run {options.run} at {coordinator[0]}:{coordinator[1]} "
        f"as {options.name}: replicas {answer['replicas']}"
    )
    down(client, options.run, out=lambda _line: None)
    runs_dir = options.runs_dir.resolve()
    run_dir = PurePosixPath(answer["run_dir"])
    (runs_dir / run_dir.name).mkdir(parents=True, exist_ok=True)
    _chown(client, image, options, run_dir, f"{TRAINER_UID}:{TRAINER_UID}")
    secret_path = secret_file(runs_dir, options.run, options.secret)
    start_workers(client, options, image, answer["replicas"], coordinator, interface, secret_path)
    supervisor = WorkerSupervisor(client, {LABEL_RUN: options.run, LABEL_ROLE: "worker"}, options.worker_restarts)
    try:
        return follow_workers(supervisor, out)
    except KeyboardInterrupt:
        out("interrupted: stopping this machine's workers")
        supervisor.stop_all()
        return 130
    finally:
        owner = runs_dir.stat()
        _chown(client, image, options, run_dir, f"{owner.st_uid}:{owner.st_gid}")


def follow_workers(supervisor: WorkerSupervisor, out: Callable[[str], None]) -> int:
    """Follow this machine's workers until each has exited 0 (restarting dead ones); 0 then, else 1."""

    def all_finished() -> bool:
        states = [w.attrs["State"] for w in supervisor.workers()]
        return bool(states) and all(s["Status"] == "exited" and s["ExitCode"] == 0 for s in states)

    finished, reason = follow(out=out, done=all_finished, supervisor=supervisor)
    if not finished:
        out(f"run failed on this machine: {reason}")
        return 1
    out(f"this machine's {len(supervisor.workers())} workers finished")
    return 0
