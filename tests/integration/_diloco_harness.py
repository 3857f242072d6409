"""Shared DiLoCo test workload (tiny MLP, deterministic batches) and a launcher that runs named
scenarios in real Gloo process groups on localhost (torch.multiprocessing spawn + FileStore).

Each scenario runs in every rank and returns plain tensors/values; the launcher saves them per
rank and hands them back to the test, which does the asserting.

Run as a module it is a fault-injecting entry point for the training worker under torchrun
(``python -m tests.integration._diloco_harness --kill-replica R --at-outer-step N --marker F
-- <worker args>``): replica R SIGKILLs itself while the exchange for outer step N is in flight,
once (the marker file keeps a restarted replica alive).
"""

from __future__ import annotations

import functools
import os
import signal
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trainer.diloco import DiLoCo, DiLoCoCommunicationError, parameters_hash

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


def run_ranks(world: int, tmp_path: Path, *jobs: Job, lost: frozenset[int] = frozenset()) -> list[list[Any]]:
    """Run each job in turn in the same ``world`` fresh processes joined by Gloo (one spawn, as
    process start-up dominates); return ``results[job][rank]``.

    Ranks in ``lost`` are expected to die or stall (fault injection): the launcher waits for the
    others only, then SIGKILLs what is left of the lost ones; their results are None."""
    out_dir = tmp_path / f"ranks-{uuid.uuid4().hex[:8]}"
    out_dir.mkdir()
    if not lost:
        mp.spawn(_entry, args=(world, str(out_dir), list(jobs)), nprocs=world, join=True)
    else:
        context = mp.start_processes(
            _entry, args=(world, str(out_dir), list(jobs)), nprocs=world, join=False, start_method="spawn"
        )
        for rank, process in enumerate(context.processes):
            if rank not in lost:
                process.join(timeout=300)
                if process.exitcode != 0:  # spawn leaves the child's traceback in its error file
                    error_file = Path(context.error_files[rank])
                    trace = error_file.read_bytes() if error_file.exists() else b""
                    raise AssertionError(f"surviving rank {rank} exited with {process.exitcode}: {trace[-3000:]!r}")
        for rank in lost:
            context.processes[rank].kill()
            context.processes[rank].join()
    per_rank = [
        None if rank in lost else torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)
    ]
    return [[None if results is None else results[job] for results in per_rank] for job in range(len(jobs))]


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
                "bytes_received": diloco.bytes_received,
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


def traffic(rank: int, world: int, *, width: int, config: dict, rounds: int) -> dict:
    """Bytes per outer step of one replica on a square linear layer of ``width`` (+ bias)."""
    torch.manual_seed(0)
    model = nn.Linear(width, width)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco = DiLoCo(model, inner, sync_every=SYNC_EVERY, **config)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(rounds * SYNC_EVERY):
        inner.zero_grad()
        model(torch.randn(4, width, generator=generator)).square().mean().backward()
        inner.step()
        diloco.step()
    return {
        "numel": sum(p.numel() for p in model.parameters()),
        "sent_per_outer_step": diloco.bytes_sent / rounds,
        "received_per_outer_step": diloco.bytes_received / rounds,
        "global_hash": parameters_hash(diloco.global_parameters()),
    }


FAULT_ROUND_STEP = SYNC_EVERY + 1  # inner step (1-based) whose step() starts outer step 3's exchange


def lose_a_replica(rank: int, world: int, *, fault: str, timeout_s: float) -> dict:
    """Streaming DiLoCo (2 fragments, tau 1). One round passes; then the last rank dies
    (``fault="kill"``: SIGKILL right after its step() started the exchange of outer step 3, so
    the exchange is in flight) or stalls (``"stall"``: SIGSTOP before it starts that exchange).
    The survivors report the DiLoCoCommunicationError their step() raised, and when."""
    victim = world - 1
    model = make_model(seed=0)
    inner = make_inner(model)
    diloco = DiLoCo(model, inner, sync_every=SYNC_EVERY, fragments=2, fragment_delay=1, timeout_s=timeout_s)
    for step in range(1, 3 * SYNC_EVERY + 1):
        inputs, targets = make_batch(rank, step)
        inner.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        inner.step()
        if step == FAULT_ROUND_STEP:
            if rank == victim and fault == "stall":
                os.kill(os.getpid(), signal.SIGSTOP)
            if rank != victim and fault == "kill":
                time.sleep(1.0)  # the victim starts (and dies with) its exchange first
        started = time.perf_counter()
        try:
            diloco.step()
        except DiLoCoCommunicationError as error:
            return {
                "step": step,
                "message": str(error),
                "missing": error.missing,
                "outer_step": error.outer_step,
                "fragment": error.fragment,
                "seconds_in_step": time.perf_counter() - started,
                "in_flight_since_step": FAULT_ROUND_STEP,
            }
        if step == FAULT_ROUND_STEP and rank == victim and fault == "kill":
            assert diloco._in_flight is not None and diloco._in_flight.thread is not None
            time.sleep(0.2)  # its exchange thread has sent what it could and waits
            os.kill(os.getpid(), signal.SIGKILL)
    return {"step": None}


SCENARIOS: dict[str, Callable[..., Any]] = {
    "identical_data": identical_data,
    "sign": sign,
    "agreement": agreement,
    "nan_guard": nan_guard,
    "outer_subgroups": outer_subgroups,
    "resume": resume,
    "traffic": traffic,
    "lose_a_replica": lose_a_replica,
}


# ------------------------------------------------------------- worker entry point with a fault


def _kill_in_flight(replica: int, outer_step: int, marker: Path) -> None:
    """Wrap DiLoCo.step so that ``replica`` SIGKILLs itself right after starting the exchange of
    ``outer_step`` (first attempt only: restarted workers run clean); the others wait a second
    before starting theirs, so the victim's exchange is certainly still in flight when it dies."""
    step = DiLoCo.step
    me = int(os.environ.get("RANK", 0))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and not marker.exists()

    def starts_exchange(diloco: DiLoCo) -> bool:
        upcoming = diloco._inner_step + 1 + diloco.fragment_delay
        return upcoming % (diloco.sync_every // diloco.fragments) == 0 and diloco.outer_step + 1 == outer_step

    def faulty_step(self: DiLoCo) -> bool:
        armed = first_attempt and starts_exchange(self)
        if armed and me != replica:
            time.sleep(1.0)  # so the victim's exchange cannot complete before it dies
        result = step(self)
        if armed and me == replica:
            assert self._in_flight is not None and self._in_flight.thread is not None
            marker.write_text(f"replica {replica} killed at outer step {outer_step}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    DiLoCo.step = faulty_step


def main() -> int:
    import argparse

    from trainer import worker

    parser = argparse.ArgumentParser(description="trainer.worker with a replica killed mid-exchange")
    parser.add_argument("--kill-replica", type=int, required=True)
    parser.add_argument("--at-outer-step", type=int, required=True)
    parser.add_argument("--marker", type=Path, required=True)
    parser.add_argument("worker_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    _kill_in_flight(args.kill_replica, args.at_outer_step, args.marker)
    return worker.main([a for a in args.worker_args if a != "--"])


if __name__ == "__main__":
    raise SystemExit(main())
