"""Who is who in a run: the process groups, the lead, the disk keepers, and the seeds.

A replica is `replica_size` consecutive ranks (default: one torchrun node). Inside a replica,
gradients are averaged every inner step (data parallel; under `parallel.sharding: fsdp`, FSDP's
reduce-scatter does it and the model is sharded over the replica's group, `trainer.run.sharding`);
across replicas only DiLoCo talks, over the outer group (rank k of every replica). The lead (the
first process of replica id 0, global rank 0 unless a restart moved it) writes metrics, the
summary and the plot.
Environment: COMPOSER_REPLICA_ID (stable replica identity for data and checkpoint files when
torch ranks move around after an elastic restart).

Elastic DiLoCo (`diloco.elastic`, trainer.elastic) has no world spanning the replicas: each
replica is one process, its own world, and the replicas meet only in a shared store. Environment:
COMPOSER_ELASTIC_STORE (host:port of that TCPStore: the coordinator's, or through the gate's
tunnel across machines), COMPOSER_REPLICA_ID (this replica) and COMPOSER_REPLICAS (how many the
run starts with).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import Config, ConfigError
from trainer.elastic import ElasticDiLoCo, ElasticError, RunFinished

__all__ = ["ElasticError", "RunFinished", "Topology", "init_distributed", "step_seed"]  # the errors: for the worker

ELASTIC_STORE_ENV = "COMPOSER_ELASTIC_STORE"
STORE_TIMEOUT_S = 300.0  # a store request (a link down for longer fails the replica, which rejoins)
FIRST_CONNECT_S = 30.0  # the first connection: nothing there by then is a wrong address or a store not started


@dataclass
class Topology:
    rank: int
    world_size: int
    replicas: int
    replica_index: int  # position among replicas in this world (changes across restarts)
    replica_id: int  # stable identity: data shard and checkpoint files
    local_rank: int  # rank inside the replica
    inner_group: dist.ProcessGroup | None  # ranks of this replica (None: a replica of one)
    outer_group: dist.ProcessGroup | None  # rank `local_rank` of every replica (None: the world)
    # The rank that writes the books: the first process of replica id 0, wherever torchrun's
    # rendezvous put it (across machines it is the coordinator's host, which keeps the metrics).
    # Elastic runs: the replica's own process; who writes each outer step's books is decided then.
    lead_rank: int = 0
    elastic: ElasticDiLoCo | None = None  # diloco.elastic: this replica's side of the round boundary

    @property
    def lead(self) -> bool:
        return self.rank == self.lead_rank

    @property
    def replica_size(self) -> int:
        return 1 if self.elastic is not None else self.world_size // self.replicas

    @property
    def global_rank(self) -> int:
        """This process's rank among all the run's processes (elastic: its replica id, a replica
        being one process): the `rank` of its records and files."""
        return self.replica_id if self.elastic is not None else self.rank


def init_distributed(config: Config) -> Topology:
    """Process groups for inner data parallel (within a replica) and DiLoCo (across replicas)."""
    if config.diloco.elastic:
        return elastic_topology(config)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=config.dist_timeout_s)
    if "RANK" not in os.environ:  # plain `python -m trainer.worker`: one replica of one
        if config.parallel.sharding == "none":
            return Topology(0, 1, 1, 0, int(os.environ.get("COMPOSER_REPLICA_ID", 0)), 0, None, None)
        # FSDP's device mesh needs a process group, even of one process (an in-memory store)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if torch.cuda.is_available():  # before the process group: NCCL binds each rank to its device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    size = config.replica_size or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world % size:
        raise ConfigError(f"replica_size: {size} does not divide the world size {world}")
    replicas = world // size
    inner_group = outer_group = None
    if size > 1:  # every rank must create every group, in the same order
        for r in range(replicas):
            group = dist.new_group(list(range(r * size, (r + 1) * size)))
            inner_group = group if r == rank // size else inner_group
        for k in range(size):
            group = dist.new_group([r * size + k for r in range(replicas)])
            outer_group = group if k == rank % size else outer_group
    replica_index = rank // size
    replica_id = int(os.environ.get("COMPOSER_REPLICA_ID", replica_index))
    identities = gather((replica_id, rank % size))
    lead_rank = identities.index(min(identities))
    return Topology(rank, world, replicas, replica_index, replica_id, rank % size, inner_group, outer_group, lead_rank)


def elastic_topology(config: Config) -> Topology:
    """One replica of an elastic run: a world of its own (no process group: a replica is one
    process), connected to the run's store; its heartbeat starts when it enters the run."""
    if int(os.environ.get("WORLD_SIZE", 1)) != 1:
        raise ConfigError(
            f"diloco.elastic: a replica is one process; this one was started with WORLD_SIZE "
            f"{os.environ['WORLD_SIZE']} (run `torchrun --standalone --nproc-per-node=1` per replica)"
        )
    values = {}
    for name in (ELASTIC_STORE_ENV, "COMPOSER_REPLICA_ID", "COMPOSER_REPLICAS"):
        if not os.environ.get(name):
            raise ConfigError(
                f"diloco.elastic: set {name} ({ELASTIC_STORE_ENV}=host:port of the run's store, "
                "COMPOSER_REPLICA_ID=this replica, COMPOSER_REPLICAS=the run's replicas); "
                "docs/elastic.md shows a launch"
            )
        values[name] = os.environ[name]
    host, _, port = values[ELASTIC_STORE_ENV].rpartition(":")
    try:
        replica_id, replicas, port_number = (
            int(values["COMPOSER_REPLICA_ID"]),
            int(values["COMPOSER_REPLICAS"]),
            int(port),
        )
    except ValueError:
        raise ConfigError(
            f"diloco.elastic: {ELASTIC_STORE_ENV}, COMPOSER_REPLICA_ID, COMPOSER_REPLICAS: {values}"
        ) from None
    if not 0 <= replica_id < replicas:
        raise ConfigError(f"diloco.elastic: COMPOSER_REPLICA_ID {replica_id} is not one of {replicas} replicas")

    d = config.diloco
    if d.min_replicas > replicas:
        raise ConfigError(
            f"diloco.min_replicas: {d.min_replicas} is more than the run's {replicas} replicas (COMPOSER_REPLICAS): "
            "no outer step could ever be taken"
        )
    if config.debug.kill_replica_at is not None and not 0 <= config.debug.kill_replica_at[0] < replicas:
        raise ConfigError(
            f"debug.kill_replica_at: replica {config.debug.kill_replica_at[0]} is not one of the run's {replicas} "
            "replicas (COMPOSER_REPLICAS)"
        )

    def connect(timeout_s: float = STORE_TIMEOUT_S) -> dist.TCPStore:
        return dist.TCPStore(host, port_number, is_master=False, timeout=timedelta(seconds=timeout_s))

    try:  # the first connection fails fast: a wrong address is a setting, not a link that went down
        store = connect(FIRST_CONNECT_S)
    except (RuntimeError, TimeoutError) as error:  # torch's DistStoreError is a RuntimeError
        raise ConfigError(
            f"{ELASTIC_STORE_ENV}: no store answered at {host}:{port_number} within {FIRST_CONNECT_S:.0f} s "
            f"({type(error).__name__}); is the run's store (the coordinator) up and the address right?"
        ) from None
    store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
    elastic = ElasticDiLoCo(
        store,
        replica_id,
        replicas=replicas,
        quorum_timeout_s=d.quorum_timeout_s,
        min_replicas=d.min_replicas,
        heartbeat_s=d.heartbeat_s,
        heartbeat_timeout_s=d.heartbeat_timeout_s,
        timeout_s=d.timeout_s,
        connect=connect,
    )
    return Topology(0, 1, replicas, replica_id, replica_id, 0, None, None, 0, elastic)


def step_seed(*parts: int) -> int:
    """A seed that is a pure function of the position, so a resumed run draws the same data."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def gather(value: object) -> list:
    """Everyone's `value`, in rank order (a list of one without torch.distributed)."""
    if not dist.is_initialized():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave_together() -> None:
    """Every rank waits for the others, then the process groups are torn down."""
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def disk_of(ckpt_root: Path) -> tuple[str, int, int]:
    """(kernel boot id, device, inode) of the checkpoint directory (made if missing): equal for
    every process that sees the same directory, different between machines."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    stat = ckpt_root.stat()
    return (boot_id.read_text().strip() if boot_id.exists() else "", stat.st_dev, stat.st_ino)


def storage_keeper(topo: Topology, ckpt_root: Path) -> bool:
    """Whether this rank keeps the shared files of its disk: the tokenizer, the DPO reference and
    the checkpoint seals. One rank per checkpoint directory: the lead for its own; across machines
    (each keeps its replicas' checkpoints, issue 16) the first rank of each other one. A directory
    is known by (kernel boot id, device, inode), so one directory seen by several containers of a
    machine is one disk, and two machines never share a keeper."""
    disk = disk_of(ckpt_root)
    disks = gather(disk)
    keepers = {disks[topo.lead_rank]: topo.lead_rank}
    for rank, other in enumerate(disks):
        keepers.setdefault(other, rank)
    return keepers[disk] == topo.rank
