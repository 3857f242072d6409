"""Traffic and collective speed of `trainer.diloco` on loopback Gloo (2 processes).

1. Bytes per outer step for each compression, measured from `DiLoCo.bytes_sent` on a small Qwen2
   (tied 32k vocabulary), against what DDP hands to its gradient all-reduces over the same H
   inner steps (measured per step with a counting DDP comm hook, times H). Both count the payload
   one replica puts into a collective, so the ratio is the traffic reduction.
2. Wall time spent inside `diloco.step()` per outer step (pseudo-gradient, encode, exchange,
   decode, outer Nesterov step, copy back), per compression.
3. All-reduce (fp32 sum, the `none` path) and all-gather (uint8, the compressed paths) time
   against payload size.

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
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.diloco import DiLoCo

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 2
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
    return {
        "numel": sum(p.numel() for p in model.parameters()),
        "bytes_per_outer_step": diloco.bytes_sent // ROUNDS,  # per H inner steps
        "peak_bytes_per_sync": max(bytes_per_step),
        "syncs_per_outer_step": diloco.fragments,
        "step_seconds_per_outer_step": step_seconds / ROUNDS,
    }


def _collective_seconds(size_bytes: int) -> dict:
    fp32 = torch.ones(size_bytes // 4)
    payload = torch.ones(size_bytes, dtype=torch.uint8)
    gathered = [torch.empty_like(payload) for _ in range(WORLD)]
    timings: dict[str, list[float]] = {"all_reduce_fp32": [], "all_gather_uint8": []}
    for repeat in range(COLLECTIVE_REPEATS + 1):
        for name, run in (
            ("all_reduce_fp32", lambda: dist.all_reduce(fp32)),
            ("all_gather_uint8", lambda: dist.all_gather(gathered, payload)),
        ):
            dist.barrier()
            start = time.perf_counter()
            run()
            if repeat:  # the first round is a warm-up
                timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def _rank(rank: int, store_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, WORLD),
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(minutes=10),
    )
    try:
        results: dict[str, Any] = {"ddp_bytes_per_step": _ddp_bytes_per_step()}
        results["diloco"] = {name: _diloco_traffic(config) for name, config in CONFIGS}
        results["collectives"] = {size: _collective_seconds(size) for size in PAYLOAD_SIZES}
        if rank == 0:
            Path(out_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _size(num_bytes: float) -> str:
    power = min(int(math.log(max(num_bytes, 1), 1024)), 3)
    value = num_bytes / 1024**power
    return f"{value:.0f} B" if power == 0 else f"{value:.2f} {('KiB', 'MiB', 'GiB')[power - 1]}"


def _markdown(results: dict) -> str:
    ddp_step = results["ddp_bytes_per_step"]
    first = next(iter(results["diloco"].values()))
    lines = [
        "# trainer.diloco benchmark",
        "",
        f"Written by `bench/bench_diloco.py`. {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {WORLD} processes on loopback Gloo, 1 thread each, "
        f"load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"## Bytes per outer step vs DDP (Qwen2, {first['numel'] / 1e6:.2f} M parameters)",
        "",
        "Payload one replica hands to collectives: DiLoCo's `bytes_sent` per H inner steps "
        "(measured), DDP's gradient all-reduce buckets per inner step (measured with a counting "
        f"comm hook: {_size(ddp_step)} per step) times H. int8/int4 use error feedback. "
        "Fragments are whole tensors in module order, so the largest tensor (here the tied "
        "embedding) bounds the streaming peak.",
        "",
        "| compression | bytes per outer step | peak bytes per sync | "
        + " | ".join(f"DDP over H = {h} | reduction at H = {h}" for h in PUBLISHED_H)
        + " |",
        "|---|---|---|" + "---|---|" * len(PUBLISHED_H),
    ]
    for name, row in results["diloco"].items():
        cells = [name, _size(row["bytes_per_outer_step"]), _size(row["peak_bytes_per_sync"])]
        for h in PUBLISHED_H:
            cells += [_size(h * ddp_step), f"{h * ddp_step / row['bytes_per_outer_step']:.0f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Time inside `diloco.step()` per outer step",
        "",
        "Pseudo-gradient, encode, exchange, decode + fp32 sum, outer Nesterov step, copy back, "
        f"summed over the H steps of a round; mean of {ROUNDS} rounds, each call after a barrier "
        "so the replicas start together. With streaming the wait for an exchange started tau "
        "steps earlier is short only if compute covered it; here the steps between are empty.",
        "",
        "| compression | syncs per outer step | seconds per outer step |",
        "|---|---|---|",
    ]
    for name, row in results["diloco"].items():
        lines.append(f"| {name} | {row['syncs_per_outer_step']} | {row['step_seconds_per_outer_step']:.3f} |")
    lines += [
        "",
        "## Collective time vs payload size (loopback Gloo, 2 processes)",
        "",
        f"Median of {COLLECTIVE_REPEATS} after a warm-up. Throughput = payload / time.",
        "",
        "| payload | all_reduce fp32 (ms) | MiB/s | all_gather uint8 (ms) | MiB/s |",
        "|---|---|---|---|---|",
    ]
    for size, row in results["collectives"].items():
        reduce_s, gather_s = row["all_reduce_fp32"], row["all_gather_uint8"]
        lines.append(
            f"| {_size(int(size))} | {reduce_s * 1e3:.2f} | {int(size) / reduce_s / 2**20:.0f} "
            f"| {gather_s * 1e3:.2f} | {int(size) / gather_s / 2**20:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "results.json")
        mp.spawn(_rank, args=(os.path.join(tmp, "store"), out_path), nprocs=WORLD, join=True)
        results = json.loads(Path(out_path).read_text())
    results["setup"] = {
        "model": MODEL,
        "batch": BATCH,
        "sequence": SEQUENCE,
        "sync_every": SYNC_EVERY,
        "rounds": ROUNDS,
        "world": WORLD,
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "diloco.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "diloco.md").write_text(_markdown(results))
    print((RESULTS / "diloco.md").read_text())


if __name__ == "__main__":
    main()
