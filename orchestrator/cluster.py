"""What the coordinator, the worker nodes and the host orchestrator must agree on: names of the
environment variables, store keys, labels and paths, and the torchrun command line.

Imported inside worker containers, so it must not import `docker`.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath

from torch.distributed import TCPStore

RDZV_PORT = 29400
RUNS_MOUNT = PurePosixPath("/app/runs")  # in the image; COMPOSER_RUNS_ROOT moves it outside one
TRAINER_USER = "trainer"

# Store keys, under one prefix so that they never meet torchrun's rendezvous keys.
KEY_NNODES = "composer/nnodes"
KEY_RDZV_ID = "composer/rdzv_id"
KEY_RUN_DIR = "composer/run_dir"  # the directory the coordinator chose (a finished run's is never reused)


def key_starts(replica: int) -> str:
    """Counter bumped by each start of a replica's container: starts - 1 = restarts."""
    return f"composer/starts/{replica}"


def key_beat(replica: int) -> str:
    """Counter a replica's node bumps every few seconds: the coordinator's sign of a live host."""
    return f"composer/beat/{replica}"


def key_done(replica: int) -> str:
    """Set when a replica's torchrun exited 0, i.e. the replica finished the run."""
    return f"composer/done/{replica}"


COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
COMPOSE_NUMBER = "com.docker.compose.container-number"

# Labels on the containers, networks and volumes that `python -m orchestrator` creates.
LABEL_RUN = "composer-replication.run"
LABEL_ROLE = "composer-replication.role"
LABEL_REPLICA = "composer-replication.replica"
LABEL_RUNS_DIR = "composer-replication.runs-dir"


class ClusterError(RuntimeError):
    """A misconfigured cluster: the message says which setting to fix."""


@dataclass(frozen=True)
class RunSettings:
    """The run as both the coordinator and the workers read it from their environment."""

    config: str
    run: str
    overrides: tuple[str, ...]
    coordinator: str
    port: int
    max_restarts: int
    nproc_per_node: str
    runs_root: PurePosixPath = RUNS_MOUNT

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RunSettings:
        env = dict(os.environ if env is None else env)
        config = env.get("COMPOSER_CONFIG") or "configs/smoke.yaml"
        return cls(
            config=config,
            run=env.get("COMPOSER_RUN") or run_name(config),
            overrides=tuple(env.get("COMPOSER_SET", "").split()),
            coordinator=env.get("COMPOSER_COORDINATOR") or "coordinator",
            port=int_env(env, "COMPOSER_RDZV_PORT", RDZV_PORT),
            max_restarts=int_env(env, "COMPOSER_MAX_RESTARTS", 3),
            nproc_per_node=env.get("COMPOSER_NPROC_PER_NODE") or "1",
            runs_root=PurePosixPath(env.get("COMPOSER_RUNS_ROOT") or RUNS_MOUNT),
        )

    @property
    def run_dir(self) -> PurePosixPath:
        return self.runs_root / self.run


def int_env(env: dict[str, str], key: str, default: int) -> int:
    """An integer setting from the environment; a bad value is an error that names the variable."""
    raw = env.get(key)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ClusterError(f"environment variable {key}={raw!r} is not an integer") from None


def run_name(config: str) -> str:
    """A run is named after its config file unless COMPOSER_RUN says otherwise."""
    return Path(config).stem


def key_replica_of(container: str) -> str:
    """Replica index of a container (by its hostname, the short container id), published by the
    Compose coordinator, which reads it from Compose's container-number label."""
    return f"composer/replica_of/{container}"


def compose_replica_index(labels: dict[str, str]) -> int:
    """0-based replica index of a Compose container (Compose numbers them from 1).

    The index is stable across restarts and re-rendezvous, unlike torchrun's ranks, so it names
    the replica's data shard and checkpoint files.
    """
    number = labels.get(COMPOSE_NUMBER, "")
    if not number.isdigit() or int(number) < 1:
        raise ClusterError(f"container label {COMPOSE_NUMBER}={number!r} is not a replica number")
    return int(number) - 1


def torchrun_command(settings: RunSettings, *, nnodes: int, rdzv_id: str, local_addr: str) -> list[str]:
    """One torchrun node per container: fixed N nodes, the coordinator's store for rendezvous.

    torchrun is run as `python -m torch.distributed.run` (the same program) with this Python, so
    that it needs no PATH set-up.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={settings.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={settings.coordinator}:{settings.port}",
        "--rdzv-conf=is_host=false",  # the coordinator hosts the store, never a node
        f"--rdzv-id={rdzv_id}",
        f"--max-restarts={settings.max_restarts}",
        f"--local-addr={local_addr}",
        *worker_args(settings),
    ]


def elastic_command(settings: RunSettings) -> list[str]:
    """One replica of an elastic run (`diloco.elastic`): its own `torchrun --standalone`, a world
    of one process that torchrun restarts alone (the replica then rejoins the others through the
    coordinator's store, which the caller names in COMPOSER_ELASTIC_STORE); no rendezvous spans
    the replicas, so a membership change never restarts anyone else."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=1",
        f"--max-restarts={settings.max_restarts}",
        *worker_args(settings),
    ]


def worker_args(settings: RunSettings) -> list[str]:
    """What torchrun runs in every launch: the worker module, the run's config and its overrides."""
    return ["-m", "trainer.worker", "--config", settings.config, *(a for o in settings.overrides for a in ("--set", o))]


def connect_store(host: str, port: int, timeout_s: float) -> TCPStore:
    """Client of the coordinator's store, retrying while the coordinator is still starting
    (a worker container can be up before the coordinator listens)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, TimeoutError) as error:
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"no rendezvous store answers at {host}:{port} after {timeout_s:.0f} s: {error}"
                ) from error
            time.sleep(1.0)


def interface_address(interface: str) -> str:
    """The IPv4 address of a network interface (SIOCGIFADDR), e.g. eth1 -> 10.0.0.2.

    Raises:
        ClusterError: no such interface, or it has no IPv4 address; the message lists the interfaces.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", interface[:15].encode()))
    except OSError:
        names = ", ".join(name for _, name in socket.if_nameindex())
        raise ClusterError(f"interface {interface!r} has no IPv4 address here (interfaces: {names})") from None
    finally:
        probe.close()
    return socket.inet_ntoa(packed[20:24])


def route_interface(host: str, port: int = RDZV_PORT) -> tuple[str, str]:
    """The interface (and its address) this machine's kernel routes traffic to `host` through:
    what the collectives should bind to when the coordinator is reached that way. No packet is sent.

    Raises:
        ClusterError: no route to `host`, or the source address belongs to no interface.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((socket.gethostbyname(host), port))
        source = probe.getsockname()[0]
    except OSError as error:
        raise ClusterError(f"no route to {host} from this machine ({error.strerror or error})") from None
    finally:
        probe.close()
    for _, name in socket.if_nameindex():
        try:
            if interface_address(name) == source:
                return name, source
        except ClusterError:
            continue
    raise ClusterError(f"the route to {host} leaves from {source}, which no interface holds")
