"""Turn tasks into samples: G completions per prompt, their rewards and advantages, and the hinted
teacher's context for the same tokens.

Layout follows the loss library: prompts LEFT-padded (as `generate` wants them), completions
RIGHT-padded, so the teacher can re-score exactly the student's completion tokens behind a
different (hinted) prompt. Generation is the only sampling; everything else is bookkeeping.
What the DPO channel makes of a rollout (sibling pairs) is `trainer.replay.PreferenceFeed`'s call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from trainer.batching import pad_sequences
from trainer.envs import Score, Task, hint_for, sibling_hint
from trainer.losses import PolicyBatch, group_advantages

ScoreMany = Callable[[Sequence[Task], Sequence[str]], list[Score]]


def score_each(tasks: Sequence[Task], completions: Sequence[str]) -> list[Score]:
    """The default scorer: each task's own `score`, one at a time (code environments pool them)."""
    return [task.score(text) for task, text in zip(tasks, completions, strict=True)]


@dataclass
class RolloutStats:
    reward: float  # mean checker reward of the student's samples
    teacher_reward: float | None  # same prompts sampled with the hint in context (None: not measured)
    solved_groups: float  # fraction of prompts with at least one correct sample
    completion_tokens: int
    generation_s: float  # seconds in `generate` (student and teacher-reward samples)
    execution_s: float  # seconds scoring them (the sandbox, for code environments)


@dataclass
class Rollout:
    """One step's samples: N prompts x G completions (rows are prompt-major: row = n * G + g)."""

    policy: PolicyBatch  # (N*G, ...) samples, Dr.GRPO advantages and, with a teacher, its hinted prompts
    prompts: list[list[int]]  # the N prompts' token ids, unpadded
    rewards: torch.Tensor  # (N*G,) float32 checker rewards
    correct: torch.Tensor  # (N, G) bool, reward > 0
    scores: list[Score]  # N*G, with the environment's feedback on each sample
    stats: RolloutStats


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, user_messages: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each message as a one-turn chat that ends where the assistant starts."""
    rendered = []
    for text in user_messages:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
        if len(ids) > max_length:
            raise ValueError(
                f"prompt of {len(ids)} tokens exceeds rollout.max_prompt_length={max_length}: {text[:80]!r}"
            )
        rendered.append(list(ids))
    return rendered


def generation_config(
    tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int, temperature: float, greedy: bool = False
) -> GenerationConfig:
    """The sampler's whole configuration, written out: nothing is inherited from the model's files.

    Pure sampling at `temperature` (no top-k, top-p or repetition penalty), the distribution the
    loss scores; `greedy` is argmax decoding (held-out pass@1). Scores are returned so the sampler's
    own log-probs can be compared with the trainer's (`sampler_logp_diff`).
    """
    # Greedy decoding reads none of the sampling knobs: leaving them unset keeps generate quiet.
    sampling = {} if greedy else dict(temperature=temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0)
    return GenerationConfig(
        do_sample=not greedy,
        **sampling,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )


def hinted_prompt_ids(tokenizer: PreTrainedTokenizerBase, task: Task, hint: str | None, max_length: int) -> list[int]:
    """The teacher's prompt (the task with `hint`; None: the plain prompt), the hint shortened from
    the front until it fits.

    Environment feedback (a traceback, a long failing assertion) can outgrow
    `rollout.max_prompt_length`; its end says the most (the exception comes last), so the start goes.

    Raises:
        ValueError: the task's prompt does not fit even with an empty hint.
    """
    if hint is None:
        return chat_prompt_ids(tokenizer, [task.prompt()], max_length)[0]
    keep = len(hint)
    while True:
        text = hint if keep >= len(hint) else "..." + hint[len(hint) - keep :]
        ids = chat_prompt_ids(tokenizer, [task.prompt(text)], max_length=10**9)[0]
        if len(ids) <= max_length:
            return ids
        if keep == 0:
            chat_prompt_ids(tokenizer, [task.prompt()], max_length)  # raises, naming the limit
            return ids
        keep //= 2


@dataclass
class Samples:
    """One completion per prompt, as `sample` returns them (B rows; all int64 but the log-probs)."""

    prompt_ids: torch.Tensor  # (B, P) LEFT-padded
    prompt_mask: torch.Tensor  # (B, P) 0/1
    completion_ids: torch.Tensor  # (B, C) RIGHT-padded after the first EOS
    completion_mask: torch.Tensor  # (B, C) 1 up to and including the first EOS
    sampler_logps: torch.Tensor  # (B, C) float32: log-prob the sampler drew each token with (nats)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
) -> Samples:
    """One completion per prompt, on the model's device, with the sampler's own log-probs.

    The completion mask covers the tokens up to and including the first EOS; what `generate`
    emits after it is padding. `sampler_logps` is log_softmax of the scores `generate` sampled
    from (the logits after its processors, i.e. divided by `temperature`).
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in pad_sequences(prompts, tokenizer.pad_token_id, left=True))
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=generation_config(
            tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy
        ),
    )
    model.train(was_training)
    completion_ids = out.sequences[:, prompt_ids.shape[1] :]
    scores = torch.stack(out.scores, dim=1).float()  # (B, C, V)
    sampler_logps = torch.log_softmax(scores, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    is_eos = completion_ids == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    completion_ids = completion_ids.masked_fill(after_eos, tokenizer.pad_token_id)
    sampler_logps = sampler_logps.masked_fill(after_eos, 0.0)
    return Samples(prompt_ids, prompt_mask, completion_ids, completion_mask, sampler_logps)


def decode_completions(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask, strict=True)]


def rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[Task],
    *,
    group_size: int,
    max_prompt_length: int,
    max_completion_length: int,
    temperature: float,
    hint_level: int | str,
    sibling_hints: bool,
    teacher: PreTrainedModel | None,
    score_many: ScoreMany = score_each,
) -> Rollout:
    """Sample G completions per task, score them and build the teacher's context; see the module docstring.

    `teacher` is the SDPO teacher's model (the policy itself, or an EMA copy); with it the batch
    gets the hinted prompts (`hint_level`: see `trainer.envs.hint_for`; "feedback" is what the
    environment said about that very sample) and the stats the teacher's own reward. None: no SDPO
    channel. `score_many` scores a list of completions (an environment's `score_many`: code
    environments run them on the sandbox's pool).
    """
    clock = time.perf_counter()
    prompts = chat_prompt_ids(tokenizer, [task.prompt() for task in tasks], max_prompt_length)
    repeated = [ids for ids in prompts for _ in range(group_size)]
    drawn = sample(model, tokenizer, repeated, max_new_tokens=max_completion_length, temperature=temperature)
    texts = decode_completions(tokenizer, drawn.completion_ids, drawn.completion_mask)
    generation_s, clock = time.perf_counter() - clock, time.perf_counter()
    scores = score_many([tasks[row // group_size] for row in range(len(texts))], texts)
    execution_s = time.perf_counter() - clock
    rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
    correct = rewards.view(len(tasks), group_size) > 0

    policy = PolicyBatch(
        prompt_ids=drawn.prompt_ids,
        prompt_mask=drawn.prompt_mask,
        completion_ids=drawn.completion_ids,
        completion_mask=drawn.completion_mask,
        advantages=group_advantages(rewards, group_size).to(drawn.prompt_ids.device),
        sampler_logps=drawn.sampler_logps,
    )
    teacher_reward = None
    device = drawn.prompt_ids.device
    if teacher is not None:
        hints = _teacher_hints(tasks, texts, scores, correct, hint_level=hint_level, use_siblings=sibling_hints)
        hinted = [
            hinted_prompt_ids(tokenizer, tasks[row // group_size], hint, max_prompt_length)
            for row, hint in enumerate(hints)
        ]
        teacher_ids, teacher_mask = pad_sequences(hinted, tokenizer.pad_token_id, left=True)
        policy.teacher_prompt_ids, policy.teacher_prompt_mask = teacher_ids.to(device), teacher_mask.to(device)
        if any(hint is None for hint in hints):  # hint_level "sibling": no correct sibling, no teacher
            policy.sdpo_weight = torch.tensor([float(hint is not None) for hint in hints], device=device)
        clock = time.perf_counter()
        # the level's hint for each task (never a sibling's answer; for "sibling", the group's first
        # correct sample, or no hint), with its first sample's feedback
        first = [
            _group_hint(task, hint_level, texts[n * group_size : (n + 1) * group_size], scores[n * group_size :])
            for n, task in enumerate(tasks)
        ]
        teacher_reward, teacher_execution_s = _teacher_reward(
            teacher, tokenizer, tasks, first, max_prompt_length, max_completion_length, temperature, score_many
        )
        generation_s += time.perf_counter() - clock - teacher_execution_s
        execution_s += teacher_execution_s

    stats = RolloutStats(
        reward=rewards.mean().item(),
        teacher_reward=teacher_reward,
        solved_groups=correct.any(dim=1).float().mean().item(),
        completion_tokens=int(drawn.completion_mask.sum()),
        generation_s=generation_s,
        execution_s=execution_s,
    )
    return Rollout(policy=policy, prompts=prompts, rewards=rewards, correct=correct, scores=scores, stats=stats)


def _teacher_hints(
    tasks: list[Task],
    texts: list[str],
    scores: list[Score],
    correct: torch.Tensor,
    *,
    hint_level: int | str,
    use_siblings: bool,
) -> list[str | None]:
    """Per row: a correct sibling's answer when one exists (not the row itself), else the hint at the level.

    `hint_level` "sibling" has no fallback: a row without a correct sibling gets None (no distillation).
    """
    group_size = correct.shape[1]
    hints: list[str | None] = []
    for row in range(len(texts)):
        group, member = divmod(row, group_size)
        siblings = [j for j in range(group_size) if j != member and correct[group, j]]
        if (use_siblings or hint_level == "sibling") and siblings:
            hints.append(sibling_hint(texts[group * group_size + siblings[0]]))
        elif hint_level == "sibling":
            hints.append(None)
        else:
            hints.append(hint_for(tasks[group], hint_level, texts[row], scores[row]))
    return hints


def _group_hint(task: Task, hint_level: int | str, texts: list[str], scores: list[Score]) -> str | None:
    """The hint the teacher-reward probe reads for one group: the level's hint on the first sample, or
    (level "sibling") the first correct sample's answer, or no hint when none is correct."""
    if hint_level != "sibling":
        return hint_for(task, hint_level, texts[0], scores[0])
    return next((sibling_hint(text) for text, score in zip(texts, scores, strict=False) if score.reward > 0), None)


def _teacher_reward(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[Task],
    hints: list[str | None],
    max_prompt_length: int,
    max_completion_length: int,
    temperature: float,
    score_many: ScoreMany,
) -> tuple[float, float]:
    """How often the hinted policy (the SDPO teacher) solves the same prompts, one sample each; and the
    seconds spent scoring them."""
    hinted = [
        hinted_prompt_ids(tokenizer, task, hint, max_prompt_length) for task, hint in zip(tasks, hints, strict=True)
    ]
    drawn = sample(model, tokenizer, hinted, max_new_tokens=max_completion_length, temperature=temperature)
    texts = decode_completions(tokenizer, drawn.completion_ids, drawn.completion_mask)
    clock = time.perf_counter()
    scores = score_many(tasks, texts)
    return sum(s.reward for s in scores) / len(tasks), time.perf_counter() - clock
