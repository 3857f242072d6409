"""Traffic and collective speed of `trainer.diloco` on loopback Gloo, M = 2 and M = 4 processes.

1. Bytes per outer step for each compression and M, measured from `DiLoCo.bytes_sent` (what this
   replica's messages put on the wire: its reduce-scatter shards and its all-gathered mean shard,
   ~2 (M - 1) / M payloads) on a small Qwen2 (tied 32k vocabulary), against DDP over the same H
   inner steps: the gradient bytes DDP hands to all-reduce per step (measured with a counting DDP
   comm hook) times 2 (M - 1) / M, what a ring all-reduce sends per rank. Both are bytes one
   replica sends, so the ratio is the traffic reduction, at that M.
2. Wall time spent inside `diloco.step()` per outer step (pseudo-gradient, encode, exchange,
   decode, outer Nesterov step, copy back), per compression, M = 2.
3. Gloo's fp32 all-reduce against DiLoCo's fp32 exchange (chunked point-to-point reduce-scatter +
   all-gather) on one flat tensor, against payload size, M = 2.

Writes bench/results/diloco.md and diloco.json. Run from the repo root:
`.venv/bin/python bench/bench_diloco.py`.
"""

import json
import math
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.checkpoint import strict_json
from trainer.diloco import DiLoCo
from trainer.run.placement import write_json

RESULTS = Path(__file__).resolve().parent / "results"
WORLDS = (2, 4)
MODEL = dict(
    vocab_size=32_000,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
BATCH, SEQUENCE = 2, 32
SYNC_EVERY = 8  # bytes per outer step do not depend on H; a short H keeps the bench quick
ROUNDS = 2
DDP_STEPS = 3
PUBLISHED_H = (100, 500)  # INTELLECT-1 ran H = 100, DiLoCo's headline figure H = 500
CONFIGS = [
    ("none", {}),
    ("bf16", {"compression": "bf16"}),
    ("int8", {"compression": "int8", "error_feedback": True}),
    ("int4", {"compression": "int4", "error_feedback": True}),
    (
        "int8, 4 fragments, tau 1",
        {"compression": "int8", "error_feedback": True, "fragments": 4, "fragment_delay": 1},
    ),
]
PAYLOAD_SIZES = [2**k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB
COLLECTIVE_REPEATS = 5


def _model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**MODEL))


def _inner_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
    tokens = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQUENCE), generator=generator)
    optimizer.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()


def _ddp_bytes_per_step() -> int:
    """Gradient bytes DDP hands to all-reduce per inner step (steady state, after bucketing)."""
    model = _model()
    ddp = DistributedDataParallel(model)
    counted = {"bytes": 0}

    def counting_allreduce(state: dict, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(counted, counting_allreduce)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    _inner_step(ddp, optimizer, 0)  # the first step may rebuild buckets
    counted["bytes"] = 0
    for step in range(1, DDP_STEPS + 1):
        _inner_step(ddp, optimizer, step)
    return counted["bytes"] // DDP_STEPS


def _diloco_traffic(config: dict) -> dict:
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diloco = DiLoCo(model, inner, sync_every=SYNC_EVERY, **config)
    bytes_per_step, step_seconds = [], 0.0
    for step in range(ROUNDS * SYNC_EVERY):
        _inner_step(model, inner, step)
        sent_before = diloco.bytes_sent
        dist.barrier()  # time DiLoCo itself, not waiting for the slower replica's inner step
        start = time.perf_counter()
        diloco.step()
        step_seconds += time.perf_counter() - start
        bytes_per_step.append(diloco.bytes_sent - sent_before)  # sent when an exchange starts
    sent = [0] * dist.get_world_size()
    dist.all_gather_object(sent, diloco.bytes_sent)  # shards differ by a block: report the most
    return {
        "numel": sum(p.numel() for p in model.parameters()),
        "bytes_per_outer_step": max(sent) // ROUNDS,  # per H inner steps, the busiest replica
        "peak_bytes_per_sync": max(bytes_per_step),
        "syncs_per_outer_step": diloco.fragments,
        "step_seconds_per_outer_step": step_seconds / ROUNDS,
    }


def _collective_seconds(size_bytes: int) -> dict:
    fp32 = torch.ones(size_bytes // 4)
    flat = nn.Linear(size_bytes // 4, 1, bias=False)  # one flat parameter of the payload's size
    diloco = DiLoCo(flat, torch.optim.SGD(flat.parameters(), lr=0.1), sync_every=1)
    timings: dict[str, list[float]] = {"all_reduce_fp32": [], "diloco_exchange_fp32": []}

    def exchange() -> None:
        with torch.no_grad():
            flat.weight.add_(1e-3)
        diloco.step()
        timings_exchange.append(diloco.last_exchange_seconds)

    timings_exchange: list[float] = []
    for repeat in range(COLLECTIVE_REPEATS + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(fp32)
        if repeat:  # the first round is a warm-up
            timings["all_reduce_fp32"].append(time.perf_counter() - start)
        dist.barrier()
        exchange()
    timings["diloco_exchange_fp32"] = timings_exchange[1:]
    return {name: statistics.median(values) for name, values in timings.items()}


def _rank(rank: int, world: int, store_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, world),
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=10),
    )
    try:
        results: dict[str, Any] = {"ddp_bytes_per_step": _ddp_bytes_per_step()}
        results["diloco"] = {name: _diloco_traffic(config) for name, config in CONFIGS}
        if world == 2:
            results["collectives"] = {size: _collective_seconds(size) for size in PAYLOAD_SIZES}
        if rank == 0:
            Path(out_path).write_text(strict_json(results))
    finally:
        dist.destroy_process_group()


def _size(num_bytes: float) -> str:
    power = min(int(math.log(max(num_bytes, 1), 1024)), 3)
    value = num_bytes / 1024**power
    return f"{value:.0f} B" if power == 0 else f"{value:.2f} {('KiB', 'MiB', 'GiB')[power - 1]}"


def _ring(world: int) -> float:
    """Bytes a ring all-reduce sends per rank, per byte of buffer: 2 (M - 1) / M."""
    return 2 * (world - 1) / world


WAN_ROW = {"replicas": 2, "rate_mbit": 100, "compression": "none", "fragments": 1}


def wan_link_efficiency(wan_json: Path) -> float | None:
    """The fp32 exchange's link efficiency at 100 Mbit/s, M = 2, one fragment, as `bench/bench_wan.py`
    last measured it (wan.json); None when that file or row is absent. Read, never restated, so a
    rerun of the WAN bench cannot leave this page quoting an old figure."""
    try:
        rows = json.loads(wan_json.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None
    for row in rows:
        if tuple(row.get(key) for key in WAN_ROW) == tuple(WAN_ROW.values()):
            return row.get("link_efficiency")
    return None


def _markdown(by_world: dict[int, dict]) -> str:
    two = by_world[2]
    first = next(iter(two["diloco"].values()))
    efficiency = wan_link_efficiency(RESULTS / "wan.json")
    lines = [
        "# trainer.diloco benchmark",
        "",
        f"Written by `bench/bench_diloco.py`. {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, M = {' and '.join(map(str, by_world))} processes on loopback Gloo, "
        f"1 thread each, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"## Bytes per outer step vs DDP (Qwen2, {first['numel'] / 1e6:.2f} M parameters)",
        "",
        "Bytes one replica sends per H inner steps. DiLoCo: `bytes_sent` (measured; the busiest "
        "replica), which counts the messages of the exchange itself: its shards to their owners "
        "and its mean shard to the others, about 2 (M - 1) / M payloads, the payload's bytes "
        "only (TCP/IP framing adds a few %, `bench/results/wan.md` compares with the wire). "
        "DDP: the gradient bytes it hands to all-reduce per step (measured with a counting comm "
        f"hook: {_size(two['ddp_bytes_per_step'])}) x 2 (M - 1) / M (what a ring all-reduce sends "
        "per rank) x H. int8/int4 use error feedback. Fragments are whole tensors in module order, "
        "so the largest tensor (here the tied embedding) bounds the streaming peak.",
        "",
        "| M | compression | bytes per outer step | peak bytes per sync | "
        + " | ".join(f"DDP over H = {h} | reduction at H = {h}" for h in PUBLISHED_H)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(PUBLISHED_H),
    ]
    for world, results in by_world.items():
        ddp_step = results["ddp_bytes_per_step"] * _ring(world)
        for name, row in results["diloco"].items():
            cells = [str(world), name, _size(row["bytes_per_outer_step"]), _size(row["peak_bytes_per_sync"])]
            for h in PUBLISHED_H:
                cells += [_size(h * ddp_step), f"{h * ddp_step / row['bytes_per_outer_step']:.0f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    if 4 in by_world:
        growth = {
            name: by_world[4]["diloco"][name]["bytes_per_outer_step"] / row["bytes_per_outer_step"]
            for name, row in two["diloco"].items()
        }
        lines += [
            "",
            "Growth from M = 2 to M = 4 per replica: "
            + ", ".join(f"{name} {value:.2f}x" for name, value in growth.items())
            + " (2 (M - 1) / M: 1.5x; an all-gather of whole payloads, the previous exchange, 3x).",
        ]
    lines += [
        "",
        "## Time inside `diloco.step()` per outer step (M = 2)",
        "",
        "Pseudo-gradient, encode, exchange, decode + fp32 sum, outer Nesterov step, copy back, "
        f"summed over the H steps of a round; mean of {ROUNDS} rounds, each call after a barrier "
        "so the replicas start together. With streaming the wait for an exchange started tau "
        "steps earlier is short only if compute covered it; here the steps between are empty.",
        "",
        "| compression | syncs per outer step | seconds per outer step |",
        "|---|---|---|",
    ]
    for name, row in two["diloco"].items():
        lines.append(f"| {name} | {row['syncs_per_outer_step']} | {row['step_seconds_per_outer_step']:.3f} |")
    lines += [
        "",
        "## Gloo fp32 all-reduce vs DiLoCo's fp32 exchange, by payload size (loopback, M = 2)",
        "",
        f"Median of {COLLECTIVE_REPEATS} after a warm-up. Throughput = payload / time. The exchange "
        "is `DiLoCo.last_exchange_seconds` on one flat parameter: chunked point-to-point "
        "reduce-scatter, fp32 sum of the own shard, all-gather. On loopback nothing limits the "
        "bytes, so the exchange is bound by its CPU work (a flag byte appended, decode, fp32 sum, "
        "re-encode and concatenation copy each payload; chunks are posted one by one from "
        "Python) where Gloo's all-reduce works in place: it is slower here, most at 64 MiB. Over "
        "links of a few Gbit/s or less the link sets the pace"
        + (f" (`bench/results/wan.md`: {efficiency:.2f} of 100 Mbit/s for fp32)." if efficiency is not None else "."),
        "",
        "| payload | all_reduce fp32 (ms) | MiB/s | DiLoCo exchange fp32 (ms) | MiB/s |",
        "|---|---|---|---|---|",
    ]
    for size, row in two["collectives"].items():
        reduce_s, exchange_s = row["all_reduce_fp32"], row["diloco_exchange_fp32"]
        lines.append(
            f"| {_size(int(size))} | {reduce_s * 1e3:.2f} | {int(size) / reduce_s / 2**20:.0f} "
            f"| {exchange_s * 1e3:.2f} | {int(size) / exchange_s / 2**20:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    by_world: dict[int, dict] = {}
    for world in WORLDS:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "results.json")
            mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), out_path), nprocs=world, join=True)
            by_world[world] = json.loads(Path(out_path).read_text())
    results: dict[str, Any] = {str(world): value for world, value in by_world.items()}
    results["setup"] = {
        "model": MODEL,
        "batch": BATCH,
        "sequence": SEQUENCE,
        "sync_every": SYNC_EVERY,
        "rounds": ROUNDS,
        "worlds": list(WORLDS),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "diloco.json", results)
    (RESULTS / "diloco.md").write_text(_markdown(by_world))
    print((RESULTS / "diloco.md").read_text())


if __name__ == "__main__":
    main()
