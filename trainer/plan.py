"""`python -m trainer.plan CONFIG [--set K=V ...] [--ranks S] [--device-gib 80]`: what one rank of
the run will hold, in bytes, before anything is launched.

Why: whether a run fits is otherwise found out by starting it on the cluster. The plan builds the
config's model on the meta device (its shape only: a hub name, a local directory such as
`configs/models/llama3-8b`, or the tiny model; no weights are read or downloaded) and adds up,
per rank of a replica of S ranks:

- model states: fp32 master parameters, gradients and AdamW's two moments (4 + 4 + 8 bytes a
  parameter; under `parallel.sharding: fsdp` each FSDP group's rows ceil(d0 / S), as FSDP2 pads
  them, else the whole model), the EMA teacher and the DPO reference (fp32 copies, sharded alike);
- DiLoCo: the global copy, the outer momentum and the error-feedback residuals (4 bytes a
  parameter each; this rank's 1/S share or shard), and the pseudo-gradient buffers one exchange
  needs, on `diloco.backup_device` (host memory by default);
- transients of the training step: under fsdp the gathered root and two decoder layers (the one
  computing, the one prefetched) in the compute dtype and one layer's unsharded fp32 gradients;
  unsharded in bf16, autocast's bf16 copy of the weights; and the activations of the config's
  batch (`rollout.prompts_per_step` x `group_size` rows of `max_prompt_length +
  max_completion_length` tokens, plus the DPO pairs), with or without activation checkpointing;
- transients of sampling with the `hf` engine: every sharded module gathered whole in the compute
  dtype (policy, EMA teacher, DPO reference) and the KV cache.

The device peak is the persistent states plus the larger of the two transients. Activations are
a model of what a Hugging Face decoder layer keeps for its backward, per token (elements):
8 h + 2 kv + 4 i for a layer (hidden h, key/value width kv, MLP width i), 3.5 h outside the
layers, and 3 fp32 copies of the logits (logits, log-softmax, its gradient; 6 when the SDPO
channel adds the teacher's); with checkpointing each layer keeps only its input (h) and one
layer is recomputed at a time. The coefficients were measured with
`torch.distributed._tools.mem_tracker.MemTracker` on Qwen2 layers in fp32 (bench/bench_memory.py
checks them against a ~100M-parameter model at 1,024 tokens); bf16 splits the same elements into
fp32 (the RMSNorms upcast) and bf16, a model not measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.config import Config, load_config_or_exit
from trainer.model import tiny_config
from trainer.run.collectors import collector_type

__all__ = ["Shape", "activation_bytes", "format_plan", "model_shape", "plan", "table"]

GIB = 2**30
# Bytes per value each DiLoCo compression puts on the wire (int8/int4: + one fp32 scale per 128).
WIRE_BYTES = {"none": 4.0, "bf16": 2.0, "int8": 1 + 4 / 128, "int4": 0.5 + 4 / 128}


@dataclass
class Shape:
    """What the plan needs of a model: its widths and the parameters of each FSDP group."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # key/value heads x head dim
    vocab: int
    groups: list[list[tuple[int, ...]]]  # FSDP groups (root first, then each layer): parameter shapes

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for group in self.groups for shape in group)

    def shard(self, ranks: int) -> int:
        """Elements of the largest rank's shard (FSDP2 cuts dim 0 into ceil(d0 / S) rows and pads)."""
        return sum(-(-shape[0] // ranks) * math.prod(shape[1:]) for group in self.groups for shape in group)

    def group_size(self, index: int) -> int:
        return sum(math.prod(shape) for shape in self.groups[index])


def model_shape(config: Config) -> Shape:
    """The config's model built on the meta device: the tiny shape, or a hub name / local directory's
    `config.json` (read from the Hugging Face cache or the directory; no weights)."""
    m = config.model
    if m.name == "tiny":
        hf = tiny_config(
            None, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads, vocab_size=m.vocab_size
        )
    else:
        hf = AutoConfig.from_pretrained(m.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    layers = list(model.model.layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = [tuple(p.shape) for p in model.parameters() if id(p) not in in_layers]  # tied ones once
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return Shape(
        name=m.name,
        layers=len(layers),
        hidden=hf.hidden_size,
        intermediate=hf.intermediate_size,
        kv_width=hf.num_key_value_heads * head_dim,
        vocab=hf.vocab_size,
        groups=[root, *[[tuple(p.shape) for p in layer.parameters()] for layer in layers]],
    )


def activation_bytes(
    shape: Shape,
    *,
    tokens: int,
    logit_tokens: int,
    compute_bytes: int,
    checkpointing: bool,
    logit_copies: int = 3,
) -> int:
    """Peak bytes of activations for one forward + backward over `tokens` tokens (all rows) whose
    last `logit_tokens` are projected to the vocabulary (see the module docstring for the model)."""
    h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
    if compute_bytes == 4:
        layer = 4 * (8 * h + 2 * kv + 4 * i)
        outside = 4 * 3.5 * h
    else:  # the RMSNorms keep 4 h in fp32 and 2 h in the compute dtype; the rest is in the compute dtype
        layer = 4 * 4 * h + compute_bytes * (4 * h + 2 * kv + 4 * i)
        outside = 4 * 2 * h + compute_bytes * 1.5 * h
    logits = 4 * logit_tokens * shape.vocab
    if not checkpointing:
        return int(tokens * (shape.layers * layer + outside) + logit_copies * logits)
    kept = tokens * (shape.layers * compute_bytes * h + outside)
    return int(kept + max(logit_copies * logits, tokens * layer + logits))


def plan(config: Config, *, ranks: int | None = None, device_gib: float = 80.0, shape: Shape | None = None) -> dict:
    """Bytes per rank of a replica of `ranks` (default `replica_size`, else 1) for `config`; see the
    module docstring. Returns a JSON-able dict: `device` and `host` categories, `training_peak`,
    `sampling_peak`, `device_peak`, `host_total` (bytes), `fits` (device_peak <= device_gib GiB)."""
    shape = shape or model_shape(config)
    S = ranks or config.replica_size or 1
    sharded = config.parallel.sharding == "fsdp"
    compute = 2 if config.model.dtype == "bfloat16" else 4
    P = shape.parameters
    local = shape.shard(S) if sharded else P  # elements of each model-sized state on this rank
    share = shape.shard(S) if sharded else -(-P // S)  # what this rank's DiLoCo syncs
    loss, d, r = config.loss, config.diloco, config.rollout
    ema = loss.alpha > 0 and loss.teacher == "ema"
    states = {
        "parameters": 4 * local,
        "gradients": 4 * local,
        "adamw": 8 * local,
        "ema_teacher": 4 * local if ema else 0,
        "dpo_reference": 4 * local if loss.beta > 0 else 0,
    }
    wire = WIRE_BYTES[d.compression]
    diloco = {
        "diloco_global": 4 * share,
        "diloco_momentum": 4 * share if d.outer_momentum > 0 else 0,
        "diloco_error_feedback": 8 * share if d.error_feedback else 0,
        # the exchange: pseudo-gradient and decoded mean (fp32), payloads out and in
        "diloco_exchange": int((4 + 4 + 2 * wire) * share),
    }
    on_device = d.backup_device == "device"
    # One inner step's batch: the rollout's rows, and the DPO pairs (both sides, whole sequences).
    collector = collector_type(config)(config, None)
    rows, length = r.prompts_per_step * r.group_size, collector.max_sample_length
    logit_length = min(length, collector.max_completion_length + 1)
    pairs = 2 * loss.dpo_pairs_per_step if loss.beta > 0 else 0
    tokens = (rows + pairs) * length
    logit_tokens = rows * logit_length + pairs * length
    activations = activation_bytes(
        shape,
        tokens=tokens,
        logit_tokens=logit_tokens,
        compute_bytes=compute,
        checkpointing=config.parallel.activation_checkpointing,
        logit_copies=6 if loss.alpha > 0 else 3,
    )
    largest_layer = max(shape.group_size(k) for k in range(1, len(shape.groups)))
    if sharded:
        gathered = compute * (shape.group_size(0) + 2 * largest_layer) + 4 * largest_layer
    else:
        gathered = 2 * P if compute == 2 else 0  # autocast's cached bf16 copy of the weights
    training = {"gathered_parameters": gathered, "activations": activations}
    # Sampling (hf engine): sharded modules gathered whole in the compute dtype; the KV cache.
    copies = 1 + ema + (loss.beta > 0)
    kv_cache = rows * length * shape.layers * 2 * shape.kv_width * compute
    if sharded:
        weights = copies * compute * P
    else:
        weights = (copies * 2 * P) if compute == 2 else 0  # autocast's bf16 copies
    sampling = {"sampling_weights": weights, "kv_cache": kv_cache}
    device = {**states, **({**diloco} if on_device else {})}
    host = {} if on_device else diloco
    persistent = sum(device.values()) - (diloco["diloco_exchange"] if on_device else 0)
    exchange = diloco["diloco_exchange"] if on_device else 0
    training_peak = persistent + max(sum(training.values()), exchange)
    sampling_peak = persistent + sum(sampling.values())
    device_peak = max(training_peak, sampling_peak)
    return dict(
        model=shape.name,
        parameters=P,
        ranks=S,
        sharding=config.parallel.sharding,
        dtype=config.model.dtype,
        activation_checkpointing=config.parallel.activation_checkpointing,
        batch=dict(rows=rows, dpo_rows=pairs, tokens=tokens, logit_tokens=logit_tokens),
        device=device,
        training=training,
        sampling=sampling,
        host=host,
        training_peak=training_peak,
        sampling_peak=sampling_peak,
        device_peak=device_peak,
        host_total=sum(host.values()),
        device_gib=device_gib,
        fits=device_peak <= device_gib * GIB,
    )


def gib(value: float) -> str:
    return f"{value / GIB:,.2f}"


def format_plan(p: dict) -> str:
    """The plan as the table the command prints (GiB)."""
    lines = [
        f"{p['model']}: {p['parameters']:,} parameters, {p['ranks']} rank(s) a replica, sharding {p['sharding']}, "
        f"{p['dtype']}, activation checkpointing {'on' if p['activation_checkpointing'] else 'off'}",
        f"batch per rank: {p['batch']['rows']} rollout rows + {p['batch']['dpo_rows']} DPO rows, "
        f"{p['batch']['tokens']:,} tokens, {p['batch']['logit_tokens']:,} scored",
        f"{'per rank':<28}{'GiB':>10}",
    ]
    for title, part in (("device", p["device"]), ("training step", p["training"]), ("sampling (hf)", p["sampling"])):
        lines.append(f"  {title}")
        lines += [f"    {name:<24}{gib(value):>10}" for name, value in part.items()]
    lines.append("  host")
    lines += [f"    {name:<24}{gib(value):>10}" for name, value in p["host"].items()]
    lines += [
        f"{'training peak':<28}{gib(p['training_peak']):>10}",
        f"{'sampling peak':<28}{gib(p['sampling_peak']):>10}",
        f"{'device peak':<28}{gib(p['device_peak']):>10}",
        f"{'host':<28}{gib(p['host_total']):>10}",
        f"fits {p['device_gib']:g} GiB: {'yes' if p['fits'] else 'NO'}",
    ]
    return "\n".join(lines)


def table(config_path: str, overrides: list[str], models: list[str], ranks: list[int], device_gib: float) -> str:
    """A markdown table of device peaks: every model x ranks x activation checkpointing off/on
    (the config's other settings, fsdp)."""
    rows = [
        f"| model | parameters | ranks | act. ckpt | params+grads+AdamW (+EMA, ref) | activations "
        f"| training peak | sampling peak | per-GPU peak | fits {device_gib:g} GiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for model in models:
        shape = None
        for s in ranks:
            for checkpointing in (False, True):
                sets = [*overrides, f"model.name={model}", "parallel.sharding=fsdp"]
                sets.append(f"parallel.activation_checkpointing={str(checkpointing).lower()}")
                config = load_config_or_exit(config_path, sets)
                shape = shape or model_shape(config)
                p = plan(config, ranks=s, device_gib=device_gib, shape=shape)
                rows.append(
                    f"| {Path(model).name} | {p['parameters'] / 1e9:.2f} B | {s} | {'on' if checkpointing else 'off'} "
                    f"| {gib(sum(p['device'].values()))} | {gib(p['training']['activations'])} "
                    f"| {gib(p['training_peak'])} | {gib(p['sampling_peak'])} | {gib(p['device_peak'])} "
                    f"| {'yes' if p['fits'] else 'no'} |"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--ranks", type=int, default=None, help="ranks a replica (default: replica_size, else 1)")
    parser.add_argument("--device-gib", type=float, default=80.0, help="device memory to fit in (default 80)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="MODEL",
        help="markdown table for these models (hub names or directories) at --table-ranks, checkpointing off/on",
    )
    parser.add_argument("--table-ranks", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.config, args.set, args.table, args.table_ranks, args.device_gib))
        return 0
    config = load_config_or_exit(args.config, args.set)
    p = plan(config, ranks=args.ranks, device_gib=args.device_gib)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
