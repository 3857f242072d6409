"""Supervised warm-up: a random tiny model gets a non-zero reward to learn from.

Part of the recipe for tiny models only (real instruct models start well above zero, so
`optim.sft_steps` is 0 for them). Half of each batch carries a hint in the prompt, in the forms the
SDPO teacher will read (the task's hint, a correct sibling's answer), so the hinted teacher has
learnt to read a hint before RL starts.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.batching import pad_sequences
from trainer.envs import Environment, Task, sibling_hint
from trainer.rollout import chat_prompt_ids


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
) -> list[float]:
    """Train on (prompt -> answer) with cross-entropy on the answer tokens; returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        batch = [tasks.sample(rng) for _ in range(batch_size)]
        prompts = chat_prompt_ids(
            tokenizer, [_warmup_prompt(t, hint_level, sibling_hints, rng) for t in batch], max_prompt_length
        )
        answers = [
            tokenizer(t.demonstration(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for t in batch
        ]
        ids, mask = pad_sequences(
            [p + a for p, a in zip(prompts, answers, strict=True)], tokenizer.pad_token_id, left=False
        )
        labels = ids.masked_fill(mask == 0, -100)
        for row, prompt in enumerate(prompts):
            labels[row, : len(prompt)] = -100
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _warmup_prompt(task: Task, hint_level: int | str, sibling_hints: bool, rng: random.Random) -> str:
    """No hint half of the time; else the teacher's hint (a sibling's answer, if the run uses those)."""
    if rng.random() < 0.5:
        return task.prompt()
    if (sibling_hints or hint_level == "sibling") and rng.random() < 0.5:
        return task.prompt(sibling_hint(task.demonstration()))
    # No sample exists yet to give feedback on: a feedback run learns to read the reference hint.
    level = {"partial": 0, "reference": -1, "feedback": -1, "sibling": -1}.get(hint_level, hint_level)
    return task.prompt(task.hints[level])
