"""Framework overhead of the worker's inner step against a bare torch loop doing the same work.

Same tiny model (the smoke shape), same batch, same forward/backward/AdamW: the worker's step is
`composer_total_loss` + clip + AdamW + `diloco.step()`; the bare loop is a hand-written Dr.GRPO
step. With alpha = beta = 0 both do exactly one forward, and both project only the completion's
positions onto the vocabulary (`logits_to_keep`, as `trainer.objective.losses.completion_logits`
does), so the ratio is pure overhead. A bare step projecting every position (the baseline this
page once used: it made the worker look faster than bare torch) is reported beside it, as are the
full three-channel step and the rollout (generation), to show where time goes.
Writes bench/results/worker.md and .json.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

from trainer.config import load_config
from trainer.diloco import DiLoCo
from trainer.envs import make_env
from trainer.losses import ComposerBatch, composer_total_loss
from trainer.model import tiny_model_and_tokenizer
from trainer.objective.replay import PreferenceFeed, PreferenceReplay
from trainer.rollout.single_turn import rollout, sibling_pairs
from trainer.run.placement import write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WARMUP, REPEATS = 3, 15


def interleaved(steps: dict) -> dict[str, float]:
    """Median seconds per step of each variant, run in turn so machine load hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(WARMUP + REPEATS):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if repeat >= WARMUP:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    torch.set_num_threads(1)
    config = load_config(REPO / "configs" / "smoke.yaml")
    tasks = make_env(config.task.source, max_operand=config.task.max_operand)
    model, tokenizer = tiny_model_and_tokenizer(
        tasks.corpus(),
        vocab_size=config.model.vocab_size,
        hidden_size=config.model.hidden_size,
        num_layers=config.model.num_layers,
        num_heads=config.model.num_heads,
        seed=0,
    )
    rng = random.Random(0)
    torch.manual_seed(0)
    feed = PreferenceFeed(
        PreferenceReplay(model, pad_token_id=tokenizer.pad_token_id), pairs_per_step=config.loss.dpo_pairs_per_step
    )
    r = config.rollout

    def make_batch():
        samples = rollout(
            model,
            tokenizer,
            [tasks.sample(rng) for _ in range(r.prompts_per_step)],
            group_size=r.group_size,
            max_prompt_length=r.max_prompt_length,
            max_completion_length=r.max_completion_length,
            temperature=r.temperature,
            hint_level=config.task.hint_level,
            sibling_hints=True,
            teacher=model,
        )
        preference = feed.step(sibling_pairs(samples, id_prefix=str(rng.random())), rng=rng)
        return ComposerBatch(policy=samples.policy, preference=preference)

    rollout_seconds = interleaved({"rollout": make_batch})["rollout"]
    batch = make_batch()
    while batch.preference is None:  # a random model needs a few tries to disagree with itself
        batch = make_batch()
    policy = batch.policy

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    diloco = DiLoCo(model, optimizer, sync_every=config.diloco.sync_every)

    def worker_step(alpha: float, beta: float):
        def step():
            out = composer_total_loss(
                model, batch, alpha=alpha, beta=beta, max_completion_length=r.max_completion_length
            )
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
            optimizer.step()
            diloco.step()

        return step

    def bare_step(every_position: bool):
        def step():
            ids = torch.cat([policy.prompt_ids, policy.completion_ids], dim=1)
            mask = torch.cat([policy.prompt_mask, policy.completion_mask], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            width = policy.completion_ids.shape[1]
            keep = 0 if every_position else width + 1  # 0: every position, as a plain forward
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False
            ).logits
            logits = logits[:, -(width + 1) : -1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, policy.completion_ids.unsqueeze(-1)).squeeze(-1)
            ratio = torch.exp(logp - logp.detach())
            loss = -(ratio * policy.advantages[:, None] * policy.completion_mask).sum() / policy.completion_mask.numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
            optimizer.step()

        return step

    seconds = interleaved(
        {
            "bare": bare_step(every_position=False),
            "bare_every_position": bare_step(every_position=True),
            "grpo_only": worker_step(0.0, 0.0),
            "full": worker_step(config.loss.alpha, config.loss.beta),
        }
    )
    bare, grpo_only, full = seconds["bare"], seconds["grpo_only"], seconds["full"]
    every = seconds["bare_every_position"]
    figures = dict(
        model=f"Qwen2 tiny {config.model.num_layers}x{config.model.hidden_size}, "
        f"{sum(p.numel() for p in model.parameters()):,} params",
        batch=f"{policy.completion_ids.shape[0]} rollouts x {policy.completion_ids.shape[1]} completion tokens, "
        f"{batch.preference.chosen_ids.shape[0]} DPO pairs",
        bare_torch_step_s=bare,
        worker_step_grpo_only_s=grpo_only,
        overhead_ratio=grpo_only / bare,
        bare_torch_step_every_position_s=every,
        overhead_ratio_vs_every_position=grpo_only / every,
        worker_step_three_channels_s=full,
        rollout_s=rollout_seconds,
        threads=1,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "worker.json", figures)
    (RESULTS / "worker.md").write_text(
        "# Worker inner step vs a bare torch loop\n\n"
        f"{figures['model']}; {figures['batch']}; median of {REPEATS} steps each, variants interleaved, 1 thread.\n\n"
        "Both the bare step and the worker project only the completion's positions onto the vocabulary "
        "(`logits_to_keep`), so the ratio compares equal work.\n\n"
        "| step | seconds |\n|---|---|\n"
        f"| bare torch Dr.GRPO step (forward, backward, clip, AdamW; completion logits only) | {bare:.4f} |\n"
        f"| worker step, alpha = beta = 0 (same single forward) | {grpo_only:.4f} |\n"
        f"| **framework overhead ratio** (worker / bare, like for like) | **{grpo_only / bare:.3f}** |\n"
        f"| bare step projecting every position onto the vocabulary (unequal work) | {every:.4f} |\n"
        f"| worker / that step (the unequal ratio this page once reported) | {grpo_only / every:.3f} |\n"
        f"| worker step, all three channels (alpha={config.loss.alpha}, beta={config.loss.beta}) | {full:.4f} |\n"
        f"| rollout: generate {r.group_size}x{r.prompts_per_step} + teacher reward + pairs | {rollout_seconds:.4f} |\n"
    )
    print((RESULTS / "worker.md").read_text())


if __name__ == "__main__":
    main()
