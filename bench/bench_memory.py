"""Memory per rank under `parallel.sharding: fsdp`, measured on the CPU, against `trainer.plan`.

1. Model states: a ~100M-parameter Qwen2 (the tiny shape at hidden 768, 10 layers, vocab 16,384)
   sharded with `trainer.run.sharding.shard` over S = 1, 2, 4 ranks of one replica (torchrun, Gloo),
   AdamW and DiLoCo (fp32, outer Nesterov momentum) on the local shards, one inner step and one
   outer sync. Then each rank counts the bytes of the storages it holds per category
   (parameters, gradients, AdamW state, DiLoCo's global copy and momentum; FSDP's padding
   included) and reads its peak resident set (VmHWM, less the process's resident set before the
   model was built). The largest rank is reported against S = 1, and the states against
   `trainer.plan`'s figures for the same shape.
2. Activations at 1,024 tokens: one forward + backward of the same model in fp32 (one process,
   a batch of one 1,024-token row, language-model loss), with and without activation
   checkpointing, under `torch.distributed._tools.mem_tracker.MemTracker`: activation bytes are
   the peak of its ACT + TEMP categories (what the forward keeps and the backward makes) over the
   step. The two losses must be equal; the plan's
   `activation_bytes` is compared with both.

Writes bench/results/memory.{md,json,png}. About 3-5 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import Config, DiLoCoConfig, ModelConfig  # noqa: E402
from trainer.model import tiny_config  # noqa: E402
from trainer.plan import activation_bytes, model_shape, plan  # noqa: E402

RESULTS = REPO / "bench" / "results"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SHAPE = dict(hidden_size=768, num_layers=10, num_heads=12, vocab_size=16384)  # ~100M parameters
TOKENS = 1024
RANKS = (1, 2, 4)


def bench_config() -> Config:
    """The run config the plan is asked about: fsdp, fp32, no EMA teacher or DPO reference (the
    measurement holds the policy, AdamW and DiLoCo only)."""
    config = Config(model=ModelConfig(name="tiny", **SHAPE), diloco=DiLoCoConfig(sync_every=1))
    config.parallel.sharding = "fsdp"
    config.loss.beta, config.loss.alpha = 0.0, 0.0
    return config


def build_model() -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(tiny_config(None, **SHAPE))


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor by its local shard)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor._local_tensor if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def states_worker(out: Path) -> None:
    """One rank of the S-rank replica (under torchrun): build, shard, one step + sync, count."""
    import functools

    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from trainer.diloco import DiLoCo
    from trainer.run.sharding import local_shards, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    baseline = resident_kib("VmRSS")
    model = build_model()
    shard(model, DeviceMesh.from_group(dist.group.WORLD, "cpu"))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diloco = DiLoCo(
        model,
        adamw,
        sync_every=1,
        group=None if dist.get_world_size() == 1 else dist.new_group([rank]),
        outer_optimizer=functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True),
        parameters=local_shards(model),
    )
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    adamw.step()
    diloco.step()  # the outer step: global copy and momentum exist from here on
    parameters = list(model.parameters())
    outer = diloco.outer_optimizer
    measured = dict(
        parameters=storage_bytes(parameters),
        gradients=storage_bytes(p.grad for p in parameters),
        adamw=storage_bytes(t for s in adamw.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()),
        diloco_global=storage_bytes(diloco.global_parameters()),
        diloco_momentum=storage_bytes(s.get("momentum_buffer") for s in outer.state.values()),
    )
    record = dict(
        rank=rank, ranks=dist.get_world_size(), **measured, peak_rss=(resident_kib("VmHWM") - baseline) * 1024
    )
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def model_states(ranks: int, tmp: Path) -> dict:
    out = tmp / f"s{ranks}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(REPO)}
    command = [TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", __file__, "--states-worker", str(out)]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    per_rank = [json.loads((out / f"rank{k}.json").read_text()) for k in range(ranks)]
    largest = max(per_rank, key=lambda r: r["parameters"])
    largest["states"] = sum(
        largest[k] for k in ("parameters", "gradients", "adamw", "diloco_global", "diloco_momentum")
    )
    largest["peak_rss"] = max(r["peak_rss"] for r in per_rank)
    return largest


def activation_tracker():
    """MemTracker (it follows every storage an op creates, by category) that also keeps the peak of
    the activation categories on their own (ACT: made in the forward, TEMP: in the backward),
    wherever in the step it falls: with checkpointing it is not where the step's total peaks."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class ActivationPeak(MemTracker):
        activation_peak = 0

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            for snap in self._curr_mem_snap.values():
                now = snap.get(_MemRefType.ACT, 0) + snap.get(_MemRefType.TEMP, 0)
                self.activation_peak = max(self.activation_peak, now)

    return ActivationPeak()


def activations(checkpointing: bool) -> dict:
    from trainer.run.sharding import checkpoint_activations

    model = build_model().train()
    if checkpointing:
        checkpoint_activations(model)  # what parallel.activation_checkpointing switches on
    ids = torch.randint(0, SHAPE["vocab_size"], (1, TOKENS), generator=torch.Generator().manual_seed(1))
    tracker = activation_tracker()
    tracker.track_external(model)
    with tracker:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    peak = {str(k).rsplit(".", 1)[-1]: v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    return dict(checkpointing=checkpointing, loss=float(loss), activation_bytes=tracker.activation_peak, step_peak=peak)


def main() -> None:
    config = bench_config()
    shape = model_shape(config)
    with tempfile.TemporaryDirectory() as tmp:
        states = []
        for ranks in RANKS:
            print(f"model states at S = {ranks} ...", flush=True)
            measured = model_states(ranks, Path(tmp))
            planned = plan(config, ranks=ranks, shape=shape)
            planned_states = sum(planned["device"][k] for k in ("parameters", "gradients", "adamw"))
            planned_states += planned["host"]["diloco_global"] + planned["host"]["diloco_momentum"]
            states.append(dict(ranks=ranks, measured=measured, planned_states=planned_states))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    acts = []
    for checkpointing in (False, True):
        print(f"activations at {TOKENS} tokens, checkpointing {checkpointing} ...", flush=True)
        row = activations(checkpointing)
        row["planned"] = activation_bytes(
            shape, tokens=TOKENS, logit_tokens=TOKENS, compute_bytes=4, checkpointing=checkpointing
        )
        acts.append(row)
    report(shape.parameters, states, acts)


def report(parameters: int, states: list[dict], acts: list[dict]) -> None:
    mib = 2**20
    one = states[0]["measured"]
    for row in states:
        m = row["measured"]
        row["states_vs_s1"] = m["states"] / one["states"]
        row["rss_vs_s1"] = m["peak_rss"] / one["peak_rss"]
        row["plan_error"] = row["planned_states"] / m["states"] - 1
    for row in acts:
        row["plan_error"] = row["planned"] / row["activation_bytes"] - 1
    result = dict(parameters=parameters, model=SHAPE, states=states, activations=acts, tokens=TOKENS)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Memory per rank under FSDP, measured on the CPU (`bench/bench_memory.py`)",
        "",
        f"A {parameters / 1e6:.1f}M-parameter Qwen2 (hidden {SHAPE['hidden_size']}, {SHAPE['num_layers']} layers, "
        f"vocab {SHAPE['vocab_size']:,}), fp32, one replica of S ranks (torchrun, Gloo), AdamW + DiLoCo (momentum).",
        "Model states are the bytes of the storages the largest rank holds after one inner step and one outer",
        "sync; peak RSS is its VmHWM above the resident set before the model was built (the full model is",
        "built on every rank before sharding, which the RSS includes). The plan is `trainer.plan`.",
        "",
        "| S | parameters | gradients | AdamW | DiLoCo global + momentum | model states | vs S = 1 | plan | plan error "
        "| peak RSS | vs S = 1 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in states:
        m = row["measured"]
        lines.append(
            f"| {row['ranks']} | {m['parameters'] / mib:.1f} MiB | {m['gradients'] / mib:.1f} MiB "
            f"| {m['adamw'] / mib:.1f} MiB "
            f"| {(m['diloco_global'] + m['diloco_momentum']) / mib:.1f} MiB | **{m['states'] / mib:.1f} MiB** "
            f"| **{row['states_vs_s1']:.3f}** | {row['planned_states'] / mib:.1f} MiB | {row['plan_error']:+.2%} "
            f"| {m['peak_rss'] / mib:.0f} MiB | {row['rss_vs_s1']:.2f} |"
        )
    lines += [
        "",
        f"Activations of one forward + backward at {TOKENS:,} tokens (batch 1, language-model loss, fp32), "
        "the peak of MemTracker's ACT + TEMP over the step:",
        "",
        "| activation checkpointing | loss | activations | plan | plan error |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in acts:
        lines.append(
            f"| {'on' if row['checkpointing'] else 'off'} | {row['loss']:.6f} "
            f"| {row['activation_bytes'] / mib:.1f} MiB "
            f"| {row['planned'] / mib:.1f} MiB | {row['plan_error']:+.2%} |"
        )
    same = acts[0]["loss"] == acts[1]["loss"]
    lines += [
        "",
        f"Losses with and without checkpointing are {'identical' if same else 'DIFFERENT'}; checkpointing keeps "
        f"{acts[1]['activation_bytes'] / acts[0]['activation_bytes']:.2f} of the activation memory.",
        "",
    ]
    (RESULTS / "memory.md").write_text("\n".join(lines))
    plot(states, acts)
    print("\n".join(lines))


def plot(states: list[dict], acts: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    parts = ("parameters", "gradients", "adamw", "diloco_global", "diloco_momentum")
    bottom = [0.0] * len(states)
    labels = [f"S = {row['ranks']}" for row in states]
    for part in parts:
        values = [row["measured"][part] / mib for row in states]
        left.bar(labels, values, bottom=bottom, label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.plot(labels, [row["planned_states"] / mib for row in states], "k_", markersize=40, label="trainer.plan")
    left.set_ylabel("MiB per rank")
    left.set_title("model states, largest rank")
    left.legend(fontsize=8)
    names = ["without", "with"]
    right.bar(names, [row["activation_bytes"] / mib for row in acts], color="tab:purple", label="measured")
    right.plot(names, [row["planned"] / mib for row in acts], "k_", markersize=40, label="trainer.plan")
    right.set_title(f"activations at {TOKENS} tokens, checkpointing")
    right.set_ylabel("MiB")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "memory.png", dpi=100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--states-worker", type=Path, default=None)
    args = parser.parse_args()
    if args.states_worker is not None:
        states_worker(args.states_worker)
    else:
        main()
