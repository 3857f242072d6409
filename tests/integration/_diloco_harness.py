"""Shared DiLoCo test workload (tiny MLP, deterministic batches) and a launcher that runs named
scenarios in real Gloo process groups on localhost (torch.multiprocessing spawn + FileStore).

Each scenario runs in every rank and returns plain tensors/values; the launcher saves them per
rank and hands them back to the test, which does the asserting.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trainer.diloco import DiLoCo, parameters_hash

SYNC_EVERY = 4
NO_MOMENTUM_SGD = functools.partial(torch.optim.SGD, lr=1.0, momentum=0.0)


def make_model(seed: int = 0) -> nn.Module:
    """Six parameter tensors of uneven sizes, so fragments and quantization blocks are exercised."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))


def make_batch(data_seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(data_seed * 100_003 + step)
    inputs = torch.randn(16, 6, generator=generator)
    return inputs, torch.sin(inputs[:, :3]) + inputs[:, 3:] ** 2


def make_inner(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(
    model: nn.Module,
    inner: torch.optim.Optimizer,
    diloco: DiLoCo | None,
    *,
    start: int,
    stop: int,
    data_seed: int,
    after_inner: Callable[[int], None] | None = None,
    on_sync: Callable[[int], None] | None = None,
) -> None:
    """The caller-side inner loop: forward, backward, inner step, then ``diloco.step()``."""
    for step in range(start, stop):
        inputs, targets = make_batch(data_seed, step)
        inner.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        inner.step()
        if after_inner is not None:
            after_inner(step)
        if diloco is not None and diloco.step() and on_sync is not None:
            on_sync(step)


Job = tuple[str, dict[str, Any]]  # (scenario name, its keyword arguments)


def run_ranks(world: int, tmp_path: Path, *jobs: Job) -> list[list[Any]]:
    """Run each job in turn in the same ``world`` fresh processes joined by Gloo (one spawn, as
    process start-up dominates); return ``results[job][rank]``."""
    out_dir = tmp_path / f"ranks-{uuid.uuid4().hex[:8]}"
    out_dir.mkdir()
    mp.spawn(_entry, args=(world, str(out_dir), list(jobs)), nprocs=world, join=True)
    per_rank = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
    return [[results[job] for results in per_rank] for job in range(len(jobs))]


def _entry(rank: int, world: int, out_dir: str, jobs: list[Job]) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(str(Path(out_dir) / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        results = [SCENARIOS[scenario](rank, world, **kwargs) for scenario, kwargs in jobs]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _clone(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


# --------------------------------------------------------------------------------- scenarios


def identical_data(rank: int, world: int, *, configs: list[dict], rounds: int) -> list[dict]:
    """Every rank starts from its own seed (DiLoCo broadcasts rank 0's) and sees data seed 0."""
    results = []
    for config in configs:
        model = make_model(seed=rank)
        inner = make_inner(model)
        diloco = DiLoCo(model, inner, sync_every=SYNC_EVERY, **config)
        train(model, inner, diloco, start=0, stop=rounds * SYNC_EVERY, data_seed=0)
        results.append(
            {
                "model": _clone(list(model.parameters())),
                "global": _clone(diloco.global_parameters()),
            }
        )
    return results


def sign(rank: int, world: int) -> dict:
    """Different data per rank; capture the locals just before the sync and the global after."""
    model = make_model(seed=0)
    inner = make_inner(model)
    diloco = DiLoCo(model, inner, sync_every=SYNC_EVERY, outer_optimizer=NO_MOMENTUM_SGD)
    global_before = _clone(diloco.global_parameters())
    captured: dict[str, list[torch.Tensor]] = {}

    def capture_locals(step: int) -> None:
        if step == SYNC_EVERY - 1:
            captured["locals"] = _clone(list(model.parameters()))

    train(model, inner, diloco, start=0, stop=SYNC_EVERY, data_seed=rank, after_inner=capture_locals)
    return {
        "global_before": global_before,
        "locals": captured["locals"],
        "global_after": _clone(diloco.global_parameters()),
    }


def agreement(rank: int, world: int, *, configs: list[dict], rounds: int) -> list[dict]:
    """Different data per rank; a record at every sync."""
    return [_record_syncs(rank, config, rounds) for config in configs]


def _record_syncs(rank: int, config: dict, rounds: int) -> dict:
    model = make_model(seed=0)
    inner = make_inner(model)
    diloco = DiLoCo(model, inner, sync_every=SYNC_EVERY, **config)
    records: list[dict] = []

    def record(step: int) -> None:
        fragment = diloco.last_fragment
        records.append(
            {
                "step": step + 1,  # inner steps taken so far
                "fragment": fragment,
                "fragment_local": _clone(diloco.fragment_parameters(fragment)),
                "model_hash": parameters_hash(model),
                "global_hash": parameters_hash(diloco.global_parameters()),
                "bytes_sent": diloco.bytes_sent,
                "outer_step": diloco.outer_step,
                "participants": diloco.last_participants,
                "norm": diloco.last_pseudo_grad_norm,
            }
        )

    train(model, inner, diloco, start=0, stop=rounds * SYNC_EVERY, data_seed=rank, on_sync=record)
    return {
        "records": records,
        "fragments": [_clone(diloco.fragment_parameters(f)) for f in range(diloco.fragments)],
        "global": _clone(diloco.global_parameters()),
    }


def nan_guard(rank: int, world: int, *, compression: str) -> dict:
    """Run A over all ranks: round 1 the last rank goes NaN, round 2 all healthy, round 3 every
    rank goes NaN. Run B: the healthy ranks alone (a sub-group), round 1 only."""
    nan_rank = world - 1
    healthy_group = dist.new_group(list(range(world - 1)))

    model = make_model(seed=0)
    inner = make_inner(model)
    diloco = DiLoCo(model, inner, sync_every=SYNC_EVERY, compression=compression)
    syncs: list[dict] = []

    def inject(step: int) -> None:
        round_index, in_round = divmod(step + 1, SYNC_EVERY)
        if in_round == 0 and ((round_index == 1 and rank == nan_rank) or round_index == 3):
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("nan")

    def record(step: int) -> None:
        syncs.append(
            {
                "global": _clone(diloco.global_parameters()),
                "model": _clone(list(model.parameters())),
                "participants": diloco.last_participants,
                "norm": diloco.last_pseudo_grad_norm,
                "inner_state_sizes": [len(inner.state.get(p, {})) for p in model.parameters()],
            }
        )

    train(
        model,
        inner,
        diloco,
        start=0,
        stop=3 * SYNC_EVERY,
        data_seed=rank,
        after_inner=inject,
        on_sync=record,
    )

    healthy_global = None
    if rank != nan_rank:
        model_b = make_model(seed=0)
        inner_b = make_inner(model_b)
        diloco_b = DiLoCo(model_b, inner_b, sync_every=SYNC_EVERY, compression=compression, group=healthy_group)
        train(model_b, inner_b, diloco_b, start=0, stop=SYNC_EVERY, data_seed=rank)
        healthy_global = _clone(diloco_b.global_parameters())
    return {"syncs": syncs, "healthy_global": healthy_global}


def outer_subgroups(rank: int, world: int) -> dict:
    """Two replicas of two ranks each (ranks 0,1 and 2,3); rank k of each replica holds part k
    and syncs over the outer group {k, k + 2}, as the training worker arranges it."""
    part = rank % 2
    outer_groups = [dist.new_group([k, k + 2]) for k in range(2)]
    model = make_model(seed=10 + part)
    inner = make_inner(model)
    diloco = DiLoCo(model, inner, sync_every=SYNC_EVERY, group=outer_groups[part])
    train(model, inner, diloco, start=0, stop=2 * SYNC_EVERY, data_seed=rank)
    return {"part": part, "model_hash": parameters_hash(model), "outer_step": diloco.outer_step}


def resume(rank: int, world: int, *, phase: str, config: dict, checkpoint_dir: str) -> dict:
    """``straight``: 4 rounds, then 2 rounds + checkpoint; ``resumed``: load, 2 more rounds."""

    def build() -> tuple[nn.Module, torch.optim.Optimizer, DiLoCo]:
        model = make_model(seed=0)
        inner = make_inner(model)
        return model, inner, DiLoCo(model, inner, sync_every=SYNC_EVERY, **config)

    checkpoint = Path(checkpoint_dir) / f"rank{rank}.pt"
    half = 2 * SYNC_EVERY
    if phase == "straight":
        model, inner, diloco = build()
        train(model, inner, diloco, start=0, stop=2 * half, data_seed=rank)
        straight = {
            "model": _clone(list(model.parameters())),
            "global": _clone(diloco.global_parameters()),
            "bytes_sent": diloco.bytes_sent,
        }
        model, inner, diloco = build()
        train(model, inner, diloco, start=0, stop=half, data_seed=rank)
        torch.save(
            {
                "model": model.state_dict(),
                "inner": inner.state_dict(),
                "diloco": diloco.state_dict(),
            },
            checkpoint,
        )
        return straight
    model, inner, diloco = build()
    state = torch.load(checkpoint, weights_only=True)  # plain tensors and Python values only
    model.load_state_dict(state["model"])
    inner.load_state_dict(state["inner"])
    diloco.load_state_dict(state["diloco"])
    train(model, inner, diloco, start=half, stop=2 * half, data_seed=rank)
    return {
        "model": _clone(list(model.parameters())),
        "global": _clone(diloco.global_parameters()),
        "bytes_sent": diloco.bytes_sent,
    }


SCENARIOS: dict[str, Callable[..., Any]] = {
    "identical_data": identical_data,
    "sign": sign,
    "agreement": agreement,
    "nan_guard": nan_guard,
    "outer_subgroups": outer_subgroups,
    "resume": resume,
}
