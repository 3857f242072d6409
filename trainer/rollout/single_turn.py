"""Single-turn rollouts: G completions per prompt, their rewards and advantages, the hinted teacher's
context for the same tokens, and the DPO pairs a group's disagreement offers.

Layout follows the loss library: prompts LEFT-padded (as `generate` wants them), completions
RIGHT-padded, so the teacher can re-score exactly the student's completion tokens behind a
different (hinted) prompt. Generation is the only sampling (`trainer.rollout.sampling`); everything
else is bookkeeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.envs import HintRequest, HintWriter, Score, Task, hint_for, sibling_hint
from trainer.objective.batching import pad_sequences
from trainer.objective.losses import PolicyBatch, group_advantages
from trainer.rollout.sampling import Engine, decode_completions, sample
from trainer.rollout.templates import chat_prompt_ids, hinted_prompt_ids, resolve_stop_ids

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
    metrics: dict[str, float] = field(default_factory=dict)  # per-step extras a collector logs (none here)
    texts: list[str] = field(default_factory=list)  # N*G decoded completions, what was scored


def rollout(
    sampler: Engine | PreTrainedModel,
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
    stop_token_ids: Sequence[int] | None = None,
    hint_writer: HintWriter | None = None,
) -> Rollout:
    """Sample G completions per task, score them and build the teacher's context; see the module docstring.

    `teacher` is the SDPO teacher's sampler (the policy itself, or an EMA copy); with it the batch
    gets the hinted prompts (`hint_level`: see `trainer.envs.hint_for`; "feedback" is what the
    environment said about that very sample) and the stats the teacher's own reward. None: no SDPO
    channel. `score_many` scores a list of completions (an environment's `score_many`: code
    environments run them on the sandbox's pool). `stop_token_ids`: the ids that end a turn, for
    the student's and the teacher's samples (None: `trainer.rollout.templates.stop_token_ids`).
    `hint_writer` (an external teacher, `task.hint_level: teacher:<name>`) writes the hint of every
    failed sample from its task, text and feedback, in place of `hint_level`; samples that passed,
    or whose hint did not come, get none and no distillation (`sdpo_weight` 0).
    """
    stops = resolve_stop_ids(tokenizer, sampler, stop_token_ids)
    clock = time.perf_counter()
    prompts = chat_prompt_ids(tokenizer, [task.prompt() for task in tasks], max_prompt_length)
    repeated = [ids for ids in prompts for _ in range(group_size)]
    drawn = sample(
        sampler,
        tokenizer,
        repeated,
        max_new_tokens=max_completion_length,
        temperature=temperature,
        stop_token_ids=stops,
    )
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
        written = None
        if hint_writer is not None:
            written = _written_hints(hint_writer, tasks, texts, scores, group_size)
        hints = _teacher_hints(
            tasks, texts, scores, correct, hint_level=hint_level, use_siblings=sibling_hints, written=written
        )
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
            if written is None
            else next((h for h in written[n * group_size : (n + 1) * group_size] if h is not None), None)
            for n, task in enumerate(tasks)
        ]
        teacher_reward, teacher_execution_s = _teacher_reward(
            teacher, tokenizer, tasks, first, max_prompt_length, max_completion_length, temperature, score_many, stops
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
    return Rollout(
        policy=policy, prompts=prompts, rewards=rewards, correct=correct, scores=scores, stats=stats, texts=texts
    )


def _teacher_hints(
    tasks: list[Task],
    texts: list[str],
    scores: list[Score],
    correct: torch.Tensor,
    *,
    hint_level: int | str,
    use_siblings: bool,
    written: list[str | None] | None = None,
) -> list[str | None]:
    """Per row: a correct sibling's answer when one exists (not the row itself), else the hint at the level
    (or the `written` one, a hint writer's, when given).

    `hint_level` "sibling" has no fallback: a row without a correct sibling gets None (no distillation);
    neither has a written hint that did not come.
    """
    group_size = correct.shape[1]
    hints: list[str | None] = []
    for row in range(len(texts)):
        group, member = divmod(row, group_size)
        siblings = [j for j in range(group_size) if j != member and correct[group, j]]
        if (use_siblings or hint_level == "sibling") and siblings:
            hints.append(sibling_hint(texts[group * group_size + siblings[0]]))
        elif written is not None:
            hints.append(written[row])
        elif hint_level == "sibling":
            hints.append(None)
        else:
            hints.append(hint_for(tasks[group], hint_level, texts[row], scores[row]))
    return hints


def _written_hints(
    writer: HintWriter, tasks: list[Task], texts: list[str], scores: list[Score], group_size: int
) -> list[str | None]:
    """The writer's hint for every failed row (one batch of requests), None for the rows that passed."""
    failed = [row for row, score in enumerate(scores) if not score.passed]
    answers = writer([HintRequest(tasks[row // group_size], texts[row], scores[row].feedback) for row in failed])
    if len(answers) != len(failed):
        raise ValueError(f"the hint writer answered {len(answers)} of {len(failed)} requests")
    written: list[str | None] = [None] * len(texts)
    for row, hint in zip(failed, answers, strict=True):
        written[row] = hint
    return written


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
    stop_token_ids: Sequence[int],
) -> tuple[float, float]:
    """How often the hinted policy (the SDPO teacher) solves the same prompts, one sample each; and the
    seconds spent scoring them."""
    hinted = [
        hinted_prompt_ids(tokenizer, task, hint, max_prompt_length) for task, hint in zip(tasks, hints, strict=True)
    ]
    drawn = sample(
        model,
        tokenizer,
        hinted,
        max_new_tokens=max_completion_length,
        temperature=temperature,
        stop_token_ids=stop_token_ids,
    )
    texts = decode_completions(tokenizer, drawn.completion_ids, drawn.completion_mask)
    clock = time.perf_counter()
    scores = score_many(tasks, texts)
    return sum(s.reward for s in scores) / len(tasks), time.perf_counter() - clock


def sibling_pairs(
    rollout: Rollout, *, id_prefix: str
) -> Iterator[tuple[str, list[int], list[int], list[int], list[int]]]:
    """DPO pairs from each prompt whose samples disagree: (pair_id, chosen ids, chosen mask,
    rejected ids, rejected mask), pair_id `{id_prefix}-{group}`.

    The first correct and the first incorrect sample of a group, each as prompt + completion (up to
    and including its stop id); the masks mark the completion, the tokens the model wrote.
    """
    group_size = rollout.correct.shape[1]
    policy = rollout.policy
    for group, prompt in enumerate(rollout.prompts):
        good = rollout.correct[group].nonzero().flatten()
        bad = (~rollout.correct[group]).nonzero().flatten()
        if len(good) == 0 or len(bad) == 0:
            continue
        chosen, rejected = (
            policy.completion_ids[row][policy.completion_mask[row].bool()].tolist()
            for row in (group * group_size + int(good[0]), group * group_size + int(bad[0]))
        )
        yield (
            f"{id_prefix}-{group}",
            prompt + chosen,
            [0] * len(prompt) + [1] * len(chosen),
            prompt + rejected,
            [0] * len(prompt) + [1] * len(rejected),
        )
