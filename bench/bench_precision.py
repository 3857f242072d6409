"""bf16 fidelity of the inner optimizer: does a bf16 run train the weights an fp32 run trains?

Three runs of 10 AdamW steps at lr 1e-6 on the same batches, from the same initial Qwen2 (weights
of real-model magnitude, init std 0.02; the loss is the policy's next-token cross-entropy):

1. fp32: weights, optimizer and compute in fp32 (the reference);
2. bf16 the way the trainer does it (`trainer.precision`): fp32 master weights and optimizer
   state, forwards under `torch.autocast(bfloat16)`;
3. bf16 parameters updated in place (what the trainer did before): each update below half a bf16
   step rounds away.

Reported: the fraction of weights that changed, as a ratio to the fp32 run's (acceptance: >= 0.99),
and the final loss's relative difference to fp32 (acceptance: < 1 %), plus seconds per step.
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


def batches(generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, MODEL["vocab_size"], (BATCH, LENGTH), generator=generator) for _ in range(STEPS)]


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def train(initial: torch.nn.Module, data: list[torch.Tensor], how: str) -> dict:
    model = copy.deepcopy(initial)
    if how == "bf16 parameters":
        model = model.to(torch.bfloat16)
    start_values = [p.detach().clone() for p in model.parameters()]  # in the run's own dtype
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
    with torch.no_grad(), autocast(torch.device("cpu"), dtype):
        final = float(loss_of(model, data[0]))
    return {"how": how, "fraction_changed": changed / total, "final_loss": final, "seconds_per_step": seconds}


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    initial = Qwen2ForCausalLM(Qwen2Config(**MODEL)).eval()
    data = batches(torch.Generator().manual_seed(1))
    rows = [train(initial, data, how) for how in ("fp32", "bf16 autocast, fp32 master", "bf16 parameters")]
    reference = rows[0]
    for row in rows:
        row["changed_vs_fp32"] = row["fraction_changed"] / reference["fraction_changed"]
        row["loss_diff_vs_fp32"] = abs(row["final_loss"] - reference["final_loss"]) / reference["final_loss"]
    params = sum(p.numel() for p in initial.parameters())
    RESULTS.mkdir(exist_ok=True)
    figures = dict(model=MODEL, params=params, steps=STEPS, lr=LR, batch=[BATCH, LENGTH], rows=rows)
    figures["machine"] = platform.processor() or platform.machine()
    write_json(RESULTS / "precision.json", figures)
    lines = [
        "# bf16 fidelity of the inner optimizer (`bench/bench_precision.py`)",
        "",
        f"Qwen2 {MODEL['num_hidden_layers']}x{MODEL['hidden_size']} ({params / 1e6:.2f} M params, init std 0.02), "
        f"{STEPS} AdamW steps at lr {LR} on the same {BATCH}x{LENGTH} token batches, CPU, 1 thread.",
        "Acceptance: the trainer's bf16 (row 2) changes >= 0.99 of the weights fp32 changes, final loss within 1 %.",
        "",
        "| run | weights changed | vs fp32 | final loss | loss vs fp32 | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['how']} | {row['fraction_changed']:.4f} | {row['changed_vs_fp32']:.4f} | "
            f"{row['final_loss']:.5f} | {100 * row['loss_diff_vs_fp32']:.3f} % | {row['seconds_per_step']:.3f} |"
        )
    lines += [
        "",
        "Row 3 is what updating bf16 parameters in place does at a real model's learning rate: most",
        "updates are below half a bf16 step and round away. Row 2 keeps the parameters (the master",
        "weights), AdamW's state and the checkpoint in fp32 and runs only the forwards' matmuls in bf16.",
    ]
    (RESULTS / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
