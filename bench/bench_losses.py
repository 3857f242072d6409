"""Speed and peak memory of `trainer.losses` on the CPU.

1. `composer_total_loss` (GRPO and SDPO share one student forward, one backward for all) against
   the three channels computed in separate passes (each its own forwards and backward), on the
   same batch of a Qwen2 with a 32k vocabulary.
2. `sdpo_loss` at V = 32k: full vocabulary against the student's top-K (with and without the
   tail bucket), forward + backward on random logits.

Peak memory is the process's resident high-water mark above the level before the measured call
(Linux: reset through /proc/self/clear_refs, read from VmHWM). glibc is told to return every
freed block above 64 KiB to the OS, so RSS follows live tensors. Writes bench/results/losses.md
and losses.json. Run from the repo root: `.venv/bin/python bench/bench_losses.py`.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.losses import (
    ComposerBatch,
    PolicyBatch,
    PreferenceBatch,
    completion_logits,
    composer_total_loss,
    dpo_loss,
    grpo_loss,
    sdpo_loss,
    sequence_logps,
    token_logps,
)
from trainer.run.placement import write_json

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 32_000
REPEATS = 5
ALPHA, BETA = 0.5, 0.5
TOP_K = 64
# Model and batch for part 1: a small Qwen2 with a real-sized vocabulary, so the logits dominate
# as they do for Qwen (V = 150k) at scale.
MODEL = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
ROLLOUTS, PROMPT, HINTED_PROMPT, COMPLETION, PAIRS, PAIR_LENGTH = 8, 32, 48, 64, 4, 96
# Part 2: random logits.
SDPO_SHAPE = (4, 128, VOCAB)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _return_freed_memory_to_os() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure(step: Callable[[], None]) -> dict[str, float]:
    """Best wall and CPU time of `step` over REPEATS (after one warm-up), and its peak extra memory.

    The minimum, not the median: on a shared machine the noise only ever adds time.
    """
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the high-water mark to the current RSS
    baseline = _rss_kib("VmRSS")
    wall, cpu = [], []
    for _ in range(REPEATS):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return {"seconds": min(wall), "cpu_seconds": min(cpu), "peak_mib": (_rss_kib("VmHWM") - baseline) / 1024}


def random_batch(generator: torch.Generator) -> ComposerBatch:
    def ids(rows: int, width: int) -> torch.Tensor:
        return torch.randint(3, VOCAB, (rows, width), generator=generator)

    def ragged_mask(rows: int, width: int, *, left: bool) -> torch.Tensor:
        lengths = torch.randint(width // 2, width + 1, (rows,), generator=generator)
        positions = torch.arange(width).expand(rows, width)
        return (positions >= width - lengths[:, None] if left else positions < lengths[:, None]).long()

    pair_mask = ragged_mask(2 * PAIRS, PAIR_LENGTH, left=False)
    loss_mask = pair_mask * (torch.arange(PAIR_LENGTH) >= PAIR_LENGTH // 3)
    policy = PolicyBatch(
        prompt_ids=ids(ROLLOUTS, PROMPT),
        prompt_mask=ragged_mask(ROLLOUTS, PROMPT, left=True),
        completion_ids=ids(ROLLOUTS, COMPLETION),
        completion_mask=ragged_mask(ROLLOUTS, COMPLETION, left=False),
        advantages=torch.randn(ROLLOUTS, generator=generator),
        teacher_prompt_ids=ids(ROLLOUTS, HINTED_PROMPT),
        teacher_prompt_mask=ragged_mask(ROLLOUTS, HINTED_PROMPT, left=True),
    )
    pair_ids = ids(2 * PAIRS, PAIR_LENGTH)
    preference = PreferenceBatch(
        chosen_ids=pair_ids[:PAIRS],
        chosen_attention_mask=pair_mask[:PAIRS],
        chosen_loss_mask=loss_mask[:PAIRS],
        rejected_ids=pair_ids[PAIRS:],
        rejected_attention_mask=pair_mask[PAIRS:],
        rejected_loss_mask=loss_mask[PAIRS:],
        ref_chosen_logps=torch.zeros(PAIRS),
        ref_rejected_logps=torch.zeros(PAIRS),
    )
    return ComposerBatch(policy=policy, preference=preference)


def composed_step(model: torch.nn.Module, batch: ComposerBatch, top_k: int | None) -> None:
    model.zero_grad(set_to_none=True)
    composer_total_loss(model, batch, alpha=ALPHA, beta=BETA, sdpo_top_k=top_k).total.backward()


def separate_steps(model: torch.nn.Module, batch: ComposerBatch, top_k: int | None) -> None:
    """What a trainer without the composed loss does: one forward + backward per channel."""
    model.zero_grad(set_to_none=True)
    policy, pairs = batch.policy, batch.preference
    student = (policy.prompt_ids, policy.prompt_mask, policy.completion_ids, policy.completion_mask)
    logits = completion_logits(model, *student)
    grpo_loss(
        token_logps(logits, policy.completion_ids), policy.old_logps, policy.advantages, policy.completion_mask
    ).backward()
    del logits
    with torch.no_grad():
        teacher = completion_logits(
            model, policy.teacher_prompt_ids, policy.teacher_prompt_mask, policy.completion_ids, policy.completion_mask
        )
    (ALPHA * sdpo_loss(completion_logits(model, *student), teacher, policy.completion_mask, top_k=top_k)).backward()
    del teacher
    sides = [
        sequence_logps(model(input_ids=ids, attention_mask=attention).logits, ids, loss_mask)
        for ids, attention, loss_mask in (
            (pairs.chosen_ids, pairs.chosen_attention_mask, pairs.chosen_loss_mask),
            (pairs.rejected_ids, pairs.rejected_attention_mask, pairs.rejected_loss_mask),
        )
    ]
    losses = dpo_loss(*sides, pairs.ref_chosen_logps, pairs.ref_rejected_logps)[0]
    (BETA * losses.mean()).backward()


def bench_composed(generator: torch.Generator) -> list[dict]:
    config = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=512, **MODEL)
    model = Qwen2ForCausalLM(config)
    batch = random_batch(generator)
    rows = []
    for top_k in (None, TOP_K):
        for name, step in (("composer_total_loss", composed_step), ("separate passes", separate_steps)):
            result = measure(lambda step=step, top_k=top_k: step(model, batch, top_k))
            rows.append({"how": name, "sdpo_top_k": top_k, **result})
    return rows


def bench_sdpo(generator: torch.Generator) -> list[dict]:
    student = torch.randn(SDPO_SHAPE, generator=generator).requires_grad_(True)
    teacher = torch.randn(SDPO_SHAPE, generator=generator)
    mask = torch.ones(SDPO_SHAPE[:2])
    rows = []
    for top_k, add_tail in ((None, True), (TOP_K, True), (TOP_K, False)):

        def step(top_k: int | None = top_k, add_tail: bool = add_tail) -> None:
            student.grad = None
            sdpo_loss(student, teacher, mask, alpha=0.5, top_k=top_k, add_tail=add_tail).backward()

        rows.append({"top_k": top_k, "add_tail": add_tail, **measure(step)})
    return rows


def write_results(composed: list[dict], sdpo: list[dict]) -> None:
    logits_mib = torch.Size(SDPO_SHAPE).numel() * 4 / 2**20
    setup = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end",
        "model": {"vocab_size": VOCAB, **MODEL},
        "batch": {
            "rollouts": ROLLOUTS,
            "prompt": PROMPT,
            "hinted_prompt": HINTED_PROMPT,
            "completion": COMPLETION,
            "pairs": PAIRS,
            "pair_length": PAIR_LENGTH,
            "alpha": ALPHA,
            "beta": BETA,
        },
        "sdpo_logits_shape": list(SDPO_SHAPE),
        "repeats": REPEATS,
    }
    write_json(RESULTS / "losses.json", {"setup": setup, "composed": composed, "sdpo": sdpo})

    full = next(r for r in sdpo if r["top_k"] is None)
    lines = [
        "# trainer.losses benchmark",
        "",
        f"Written by `bench/bench_losses.py`. {setup['machine']}.",
        f"Times: best of {REPEATS} runs after a warm-up, wall clock and process CPU time (all threads; less",
        "sensitive to other load on the machine). Peak: resident high-water mark above the level before",
        "the call (forward + backward).",
        "",
        f"## composer_total_loss vs the channels in separate passes (Qwen2 {MODEL['num_hidden_layers']} layers, "
        f"hidden {MODEL['hidden_size']}, V = {VOCAB})",
        "",
        f"{ROLLOUTS} rollouts (prompt {PROMPT}, hinted prompt {HINTED_PROMPT}, completion {COMPLETION} tokens), "
        f"{PAIRS} DPO pairs of {PAIR_LENGTH} tokens, alpha = {ALPHA}, beta = {BETA}.",
        "",
        "| how | SDPO top-k | fwd+bwd wall (s) | CPU (s) | peak (MiB) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['how']} | {r['sdpo_top_k'] or 'full vocab'} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | "
            f"{r['peak_mib']:.0f} |"
            for r in composed
        ),
        "",
        f"## sdpo_loss at V = {VOCAB}, logits {tuple(SDPO_SHAPE)} (one logits tensor = {logits_mib:.0f} MiB)",
        "",
        "| top-k | tail bucket | fwd+bwd wall (s) | CPU (s) | peak (MiB) | peak vs full vocab |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['top_k'] or 'full vocab'} | {'yes' if r['add_tail'] else 'no'} | {r['seconds']:.3f} | "
            f"{r['cpu_seconds']:.3f} | {r['peak_mib']:.0f} | {r['peak_mib'] / full['peak_mib']:.2f}x |"
            for r in sdpo
        ),
        "",
    ]
    (RESULTS / "losses.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    _return_freed_memory_to_os()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sdpo = bench_sdpo(generator)
    composed = bench_composed(generator)
    write_results(composed, sdpo)


if __name__ == "__main__":
    main()
