"""bf16 fidelity of the inner optimizer: does a bf16 run train the weights an fp32 run trains?

Three runs of 10 AdamW steps at lr 1e-6 on the same batches, from the same initial Qwen2 (weights
of real-model magnitude, init std 0.02; the loss is the policy's next-token cross-entropy):

1. fp32: weights, optimizer and compute in fp32 (the reference);
2. bf16 the way the trainer does it (`trainer.precision`): fp32 master weights and optimizer
   state, forwards under `torch.autocast(bfloat16)`;
3. bf16 parameters updated in place (what the trainer did before): each update below half a bf16
   step rounds away.

Reported, against the fp32 run, with bars a run that did not train fails:
- the loss-decrease ratio: how far each run brought its training loss down (mean cross-entropy
  over the 10 batches, before and after, both measured in fp32 so that bf16 evaluation noise does
  not enter), over the fp32 run's decrease (bar >= 0.9);
- the cosine between each run's weight update (final - start, all parameters flattened) and the
  fp32 run's (bar >= 0.99);
- the fraction of weights that changed, and seconds per step.
Both bars are relative to what training did, so they fail a run that did not train; a bar on the
final loss alone would not (10 steps at this lr move it by well under 1 %).
Writes bench/results/precision.md and precision.json. `.venv/bin/python bench/bench_precision.py`.
"""

from __future__ import annotations

import copy
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.precision import autocast
from trainer.run.placement import write_json

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=True,
)
STEPS, LR, BATCH, LENGTH = 10, 1e-6, 8, 128
DECREASE_BAR, COSINE_BAR = 0.9, 0.99


def batches(generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, MODEL["vocab_size"], (BATCH, LENGTH), generator=generator) for _ in range(STEPS)]


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def fp32_loss(model: torch.nn.Module, data: list[torch.Tensor]) -> float:
    """Mean loss over `data` of `model`'s weights taken as fp32, computed in fp32: one yardstick for every run."""
    reference = copy.deepcopy(model).float()
    return sum(float(loss_of(reference, ids)) for ids in data) / len(data)


def flat(parameters: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in parameters])


def train(initial: torch.nn.Module, data: list[torch.Tensor], how: str) -> dict:
    model = copy.deepcopy(initial)
    if how == "bf16 parameters":
        model = model.to(torch.bfloat16)
    start_values = [p.detach().clone() for p in model.parameters()]  # in the run's own dtype
    loss_before = fp32_loss(model, data)
    dtype = torch.bfloat16 if how == "bf16 autocast, fp32 master" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    start = time.perf_counter()
    for ids in data:
        with autocast(torch.device("cpu"), dtype):
            loss = loss_of(model, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = (time.perf_counter() - start) / len(data)
    changed = total = 0
    for before, after in zip(start_values, model.parameters(), strict=True):
        changed += int((after.detach() != before).sum())
        total += before.numel()
    loss_after = fp32_loss(model, data)
    return {
        "how": how,
        "fraction_changed": changed / total,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "loss_decrease": loss_before - loss_after,
        "update": flat(list(model.parameters())) - flat(start_values),  # dropped before writing
        "seconds_per_step": seconds,
    }


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    initial = Qwen2ForCausalLM(Qwen2Config(**MODEL)).eval()
    data = batches(torch.Generator().manual_seed(1))
    rows = [train(initial, data, how) for how in ("fp32", "bf16 autocast, fp32 master", "bf16 parameters")]
    reference = rows[0]
    for row in rows:
        row["changed_vs_fp32"] = row["fraction_changed"] / reference["fraction_changed"]
        row["loss_decrease_ratio"] = row["loss_decrease"] / reference["loss_decrease"]
        row["update_cosine"] = float(F.cosine_similarity(row["update"].double(), reference["update"].double(), dim=0))
        row["passes"] = row["loss_decrease_ratio"] >= DECREASE_BAR and row["update_cosine"] >= COSINE_BAR
    for row in rows:
        del row["update"]
    params = sum(p.numel() for p in initial.parameters())
    RESULTS.mkdir(exist_ok=True)
    figures = dict(model=MODEL, params=params, steps=STEPS, lr=LR, batch=[BATCH, LENGTH], rows=rows)
    figures["bars"] = dict(loss_decrease_ratio=DECREASE_BAR, update_cosine=COSINE_BAR)
    figures["machine"] = platform.processor() or platform.machine()
    write_json(RESULTS / "precision.json", figures)
    lines = [
        "# bf16 fidelity of the inner optimizer (`bench/bench_precision.py`)",
        "",
        f"Qwen2 {MODEL['num_hidden_layers']}x{MODEL['hidden_size']} ({params / 1e6:.2f} M params, init std 0.02), "
        f"{STEPS} AdamW steps at lr {LR} on the same {BATCH}x{LENGTH} token batches, CPU, 1 thread.",
        f"Bars (row 2 must pass, a run that does not train must fail): loss decrease >= {DECREASE_BAR} of "
        f"fp32's, weight-update cosine to fp32's >= {COSINE_BAR}. Losses: mean over the {STEPS} batches, "
        "each run's weights evaluated in fp32.",
        "",
        "| run | loss before | loss after | decrease | decrease vs fp32 | update cosine to fp32 | "
        "weights changed | bars | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['how']} | {row['loss_before']:.6f} | {row['loss_after']:.6f} | {row['loss_decrease']:.2e} | "
            f"{row['loss_decrease_ratio']:.3f} | {row['update_cosine']:.4f} | {row['fraction_changed']:.4f} | "
            f"{'pass' if row['passes'] else 'FAIL'} | {row['seconds_per_step']:.3f} |"
        )
    lines += [
        "",
        "Row 3 is what updating bf16 parameters in place does at a real model's learning rate: most",
        "updates are below half a bf16 step and round away, so the weights barely move and the loss",
        "barely falls. Row 2 keeps the parameters (the master weights), AdamW's state and the",
        "checkpoint in fp32 and runs only the forwards' matmuls in bf16.",
    ]
    (RESULTS / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
