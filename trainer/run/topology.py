"""Who is who in a run: the process groups, the lead, the disk keepers, and the seeds.

A replica is `replica_size` consecutive ranks (default: one torchrun node). Inside a replica,
gradients are averaged every inner step (data parallel; under `parallel.sharding: fsdp`, FSDP's
reduce-scatter does it and the model is sharded over the replica's group, `trainer.run.sharding`);
across replicas only DiLoCo talks, over the outer group (rank k of every replica). The lead (the
first process of replica id 0, global rank 0 unless a restart moved it) writes metrics, the
summary and the plot.
Environment: COMPOSER_REPLICA_ID (stable replica identity for data and checkpoint files when
torch ranks move around after an elastic restart).
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
    lead_rank: int = 0

    @property
    def lead(self) -> bool:
        return self.rank == self.lead_rank

    @property
    def replica_size(self) -> int:
        return self.world_size // self.replicas


def init_distributed(config: Config) -> Topology:
    """Process groups for inner data parallel (within a replica) and DiLoCo (across replicas)."""
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


def storage_keeper(topo: Topology, ckpt_root: Path) -> bool:
    """Whether this rank keeps the shared files of its disk: the tokenizer, the DPO reference and
    the checkpoint seals. One rank per checkpoint directory: the lead for its own; across machines
    (each keeps its replicas' checkpoints, issue 16) the first rank of each other one. A directory
    is known by (kernel boot id, device, inode), so one directory seen by several containers of a
    machine is one disk, and two machines never share a keeper."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    stat = ckpt_root.stat()
    disk = (boot_id.read_text().strip() if boot_id.exists() else "", stat.st_dev, stat.st_ino)
    disks = gather(disk)
    keepers = {disks[topo.lead_rank]: topo.lead_rank}
    for rank, other in enumerate(disks):
        keepers.setdefault(other, rank)
    return keepers[disk] == topo.rank
