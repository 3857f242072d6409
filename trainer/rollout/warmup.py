"""Supervised warm-up: a random tiny model gets a non-zero reward to learn from (single-turn
completions, `supervised_warmup`, or scripted episodes, `episode_warmup`), and a probe of what it
has taught (`warmup_probe`).

Part of the recipe for tiny models only (real instruct models start well above zero, so
`optim.sft_steps` is 0 for them). Half of each batch carries a hint in the prompt, in the forms the
SDPO teacher will read (the task's hint, a correct sibling's answer), so the hinted teacher has
learnt to read a hint before RL starts.

With several processes (replicas) the warm-up is data-parallel (`sft_step`): every process draws
the same batch from the same seed, takes the loss of its own slice of the rows and the gradients
are summed across processes, so each step costs 1/world of the compute and every process ends
with the same weights (the warm-up had run the whole identical warm-up in every replica: on a
shared machine, most of an agent-smoke run's CPU time).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.envs import Environment, Task, sibling_hint
from trainer.envs.base import ProbeCandidates
from trainer.envs.workspace import SYSTEM_PROMPT, WorkspaceTask
from trainer.objective.batching import pad_sequences
from trainer.objective.losses import sequence_logps
from trainer.rollout.templates import chat_prompt_ids, demonstration_ids, end_of_turn_id


def supervised_warmup(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Environment,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    hint_level: int | str,
    sibling_hints: bool,
    max_prompt_length: int,
    rng: random.Random,
    group: dist.ProcessGroup | None = None,
    progress: bool = False,
) -> list[float]:
    """Train on (prompt -> answer, then the template's end-of-turn token) with cross-entropy on the
    answer tokens; returns the losses. group: the processes sharing the work (`sft_step`); None:
    this process alone. progress: show a progress bar (`sft_progress`)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses, end = [], end_of_turn_id(tokenizer)
    for _ in sft_progress(steps, losses, progress):
        batch = [tasks.sample(rng) for _ in range(batch_size)]
        prompts = chat_prompt_ids(
            tokenizer, [_warmup_prompt(t, hint_level, sibling_hints, rng) for t in batch], max_prompt_length
        )
        answers = [tokenizer(t.demonstration(), add_special_tokens=False)["input_ids"] + [end] for t in batch]
        ids, mask = pad_sequences(
            [p + a for p, a in zip(prompts, answers, strict=True)], tokenizer.pad_token_id, left=False
        )
        labels = ids.masked_fill(mask == 0, -100)
        for row, prompt in enumerate(prompts):
            labels[row, : len(prompt)] = -100
        losses.append(sft_step(model, optimizer, ids, mask, labels, group))
    return losses


def sft_progress(steps: int, losses: list[float], show: bool) -> Iterator[int]:
    """range(steps), with a progress bar on stderr (the last loss of `losses` beside it) if `show`."""
    with tqdm(total=steps, desc="warm-up", leave=False, disable=not show, file=sys.stderr) as bar:
        for step in range(steps):
            yield step
            if losses:  # the step just taken's loss, shown by the update that counts it
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update()


def sft_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> float:
    """One step of next-token cross-entropy, the mean over the batch's labelled tokens; returns it.

    ids, attention_mask, labels: int64 [batch, seq]; labels -100 where no loss is taken (the label
    of position t is ids[t], predicted from position t - 1). group: every process of it passes the
    same batch and takes rows rank::world; the per-process token sums are divided by the batch's
    whole token count and the gradients summed (all_reduce), which is the one-process gradient up
    to summation order. All processes then take the same AdamW step from the same gradient."""
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    targets = labels[:, 1:]
    count = int((targets != -100).sum())
    if count == 0:
        raise ValueError("sft_step: the batch has no labelled token (labels are all -100)")
    if ids.shape[0] < world:  # every process checks the same batch: none is left in the all_reduce
        raise ValueError(f"sft_step: a batch of {ids.shape[0]} rows cannot be shared by {world} processes")
    rows = slice(rank, None, world)
    logits = model(input_ids=ids[rows], attention_mask=attention_mask[rows]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[rows].flatten(), reduction="sum") / count
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([*(p.grad.reshape(-1) for p in params), loss.detach().reshape(1)])
        dist.all_reduce(flat, group=group)
        for p, part in zip(params, flat[:-1].split([p.numel() for p in params]), strict=True):
            p.grad.copy_(part.view_as(p))
        loss = flat[-1]
    optimizer.step()
    return loss.item()


def _warmup_prompt(task: Task, hint_level: int | str, sibling_hints: bool, rng: random.Random) -> str:
    """No hint half of the time; else the teacher's hint (a sibling's answer, if the run uses those)."""
    if rng.random() < 0.5:
        return task.prompt()
    if (sibling_hints or hint_level == "sibling") and rng.random() < 0.5:
        return task.prompt(sibling_hint(task.demonstration()))
    # No sample exists yet to give feedback on: a feedback run learns to read the reference hint.
    level = {"partial": 0, "reference": -1, "feedback": -1, "sibling": -1}.get(hint_level, hint_level)
    return task.prompt(task.hints[level])


def episode_warmup(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[WorkspaceTask],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    rng: random.Random,
    script: Callable[[WorkspaceTask, random.Random], list[dict[str, Any]]],
    group: torch.distributed.ProcessGroup | None = None,
    progress: bool = False,
) -> list[float]:
    """Supervised warm-up on scripted episodes: cross-entropy on the assistant tokens only; returns
    the losses. For tiny models, as `supervised_warmup` is for single-turn tasks.
    script(task, rng): an episode's messages after the prompt (the environment's `scripted_episode`,
    `trainer.envs.base.Environment`). Half the episodes
    carry the task's partial hint as a user message before the first turn, where the SDPO teacher's
    hint goes, so the teacher has learnt to read one. group: the processes sharing each step's
    rows (`sft_step`; every one passes the same rng state); None: this one alone.
    progress: show a progress bar."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in sft_progress(steps, losses, progress):
        rows = []
        for task in (rng.choice(tasks) for _ in range(batch_size)):
            prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.prompt()}]
            if task.hints and rng.random() < 0.5:
                prompt.append({"role": "user", "content": task.hints[0]})
            rows.append(demonstration_ids(tokenizer, prompt, script(task, rng)))
        ids, attention = pad_sequences([r[0] for r in rows], tokenizer.pad_token_id)
        learn, _ = pad_sequences([r[1] for r in rows], 0)
        labels = ids.masked_fill(learn == 0, -100)
        losses.append(sft_step(model, optimizer, ids, attention, labels, group))
    return losses


@torch.no_grad()
def warmup_probe(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: ProbeCandidates) -> float:
    """What the warm-up has taught, without sampling: over the probe's items, the mean probability
    the model gives the right candidate, renormalised over the item's candidates (each candidate's
    first assistant message scored teacher-forced after the prompt: its log-probability summed over
    the message's tokens, `demonstration_ids` + `sequence_logps`). For `agent_code_arith`, chance
    is 1/3 until word -> operator has begun.

    Returns the probability in [0, 1]. model: a causal LM, left in the train/eval mode it came in.
    Raises ValueError for a probe without items."""
    if not probe.items:
        raise ValueError("warmup_probe: the probe has no items")
    was_training, probabilities = model.training, []
    model.eval()
    for item in probe.items:
        rows = [demonstration_ids(tokenizer, item.prompt, candidate) for candidate in item.candidates]
        ids, attention = pad_sequences([r[0] for r in rows], tokenizer.pad_token_id)
        learn, _ = pad_sequences([r[1] for r in rows], 0)
        logps = sequence_logps(model(input_ids=ids, attention_mask=attention).logits.float(), ids, learn)
        probabilities.append(logps.softmax(0)[item.right].item())
    model.train(was_training)
    return sum(probabilities) / len(probabilities)
