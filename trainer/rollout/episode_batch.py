"""Episodes as training data: the policy batch (advantages, the SDPO teacher's hinted context at the
first failed turn), the DPO pairs of a group's passed and failed episodes, and one step's rollout of
N tasks x G episodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.envs import HintRequest, HintWriter, Score, hint_for
from trainer.envs.workspace import TOOLS, WorkspaceTask
from trainer.objective.batching import pad_sequences
from trainer.objective.losses import PolicyBatch, group_advantages
from trainer.objective.replay import PreferenceReplay
from trainer.rollout.episodes import Episode, episode_metrics, run_episodes
from trainer.rollout.sampling import Engine, as_engine
from trainer.rollout.single_turn import RolloutStats
from trainer.rollout.templates import appended_text, render_ids


def episode_hint(episode: Episode, level: int | str) -> tuple[int, str] | None:
    """(turn index, hint text) for the SDPO teacher, or None for an episode that passed.

    The turn is the first whose action failed (an error observation or failing tests), else the
    first turn. The hint at level "feedback" is what the environment said at that turn (the end
    state's feedback when no action failed); other levels are the task's layered hints
    (`trainer.envs.hint_for`).
    """
    if episode.passed or not episode.turns:
        return None
    turn = episode.first_failed_turn()
    index = 0 if turn is None else turn
    if level == "feedback":
        said = episode.feedback if turn is None else episode.turns[turn].feedback
        return index, f"A previous attempt failed here. The environment said:\n{said.strip()}"
    return index, hint_for(episode.task, level, "", Score(episode.reward, episode.passed, episode.feedback))


def episode_hint_request(episode: Episode) -> tuple[int, HintRequest] | None:
    """(turn index, what a hint writer reads) for a failed episode, None for one that passed: the
    turn `episode_hint` places the hint at (the first whose action failed, else the first), the
    attempt as the episode's assistant and tool messages up to that turn's observation (all of
    them when no action failed) and the feedback the environment gave there (else at the end)."""
    if episode.passed or not episode.turns:
        return None
    turn = episode.first_failed_turn()
    index = 0 if turn is None else turn
    feedback = episode.feedback if turn is None else episode.turns[turn].feedback
    start = episode.turns[0].message
    end = len(episode.messages)
    if turn is not None and turn + 1 < len(episode.turns):
        end = episode.turns[turn + 1].message
    attempt = "\n".join(_message_text(m) for m in episode.messages[start:end])
    return index, HintRequest(episode.task, attempt, feedback)


def _message_text(message: dict[str, Any]) -> str:
    calls = [c.get("function", c) for c in message.get("tool_calls") or []]
    said = [message.get("content") or ""] + [
        json.dumps({"name": c["name"], "arguments": c["arguments"]}) for c in calls
    ]
    return f"{message['role']}: " + "\n".join(part for part in said if part)


def written_episode_hints(episodes: Sequence[Episode], writer: HintWriter) -> list[tuple[int, str] | None]:
    """Per episode, (turn, the writer's hint) for the failed ones (one batch of requests), None for
    the episodes that passed and those whose hint did not come."""
    found = [episode_hint_request(e) for e in episodes]
    asked = [item for item in found if item is not None]
    answers = writer([request for _, request in asked])
    if len(answers) != len(asked):
        raise ValueError(f"the hint writer answered {len(answers)} of {len(asked)} requests")
    hints = iter(answers)
    result: list[tuple[int, str] | None] = []
    for item in found:
        hint = next(hints) if item is not None else None
        result.append((item[0], hint) if item is not None and hint is not None else None)
    return result


def teacher_prompt_ids(tokenizer: PreTrainedTokenizerBase, episode: Episode, turn: int, hint: str) -> list[int]:
    """The episode's own ids up to turn `turn`'s generation prompt, then the hint as a user message
    (the ids of what the template adds for it), then that generation prompt's ids again: the
    teacher's context for re-scoring the student's ids of turn `turn` onward."""
    at = episode.turns[turn]
    before = episode.messages[: at.message]
    hinted = appended_text(tokenizer, before, [*before, {"role": "user", "content": hint}], generation=False)
    return (
        episode.token_ids[: at.header_start]
        + render_ids(tokenizer, hinted)
        + episode.token_ids[at.header_start : at.start]
    )


def episode_policy_batch(
    episodes: Sequence[Episode],
    tokenizer: PreTrainedTokenizerBase,
    *,
    group_size: int,
    hint_level: int | str | None = "feedback",
    device: str | Any = "cpu",
    hint_writer: HintWriter | None = None,
) -> PolicyBatch:
    """Episodes as one `PolicyBatch` (B = len(episodes), task-major groups of `group_size`).

    prompt: each episode's ids before its first sampled token (LEFT-padded, (B, P)); completion:
    the rest, observations included (RIGHT-padded, (B, C)), `completion_mask` its attention mask
    and `loss_mask` the episode's loss_mask there (1 on sampled ids only). advantages: Dr.GRPO's
    reward minus the group mean (`group_advantages`, Liu et al. 2025, arXiv 2503.20783), one per
    episode, applied to all its sampled tokens. sampler_logps: the sampler's own log-probs.

    SDPO (hint_level not None): per episode, `episode_hint`'s turn k and hint; the teacher prompt is
    `teacher_prompt_ids(...)` and `teacher_offsets` the column where turn k's sampled ids start, so
    the teacher re-scores the student's ids from turn k on; `sdpo_weight` is 0 for passed episodes
    (nothing to correct). With `hint_writer` (an external teacher) the hint of each failed episode
    is the writer's (`written_episode_hints`); an episode whose hint did not come gets weight 0.
    Raises ValueError for an episode without a turn or a count not divisible by group_size.
    """
    if len(episodes) % group_size:
        raise ValueError(f"{len(episodes)} episodes are not groups of {group_size}")
    empty = [e.task.name for e in episodes if not e.turns]
    if empty:
        raise ValueError(f"episodes without a sampled turn cannot be trained on: {empty}")
    pad = tokenizer.pad_token_id
    starts = [e.prompt_length for e in episodes]
    prompt_ids, prompt_mask = pad_sequences(
        [e.token_ids[:s] for e, s in zip(episodes, starts, strict=True)], pad, left=True
    )
    completion_ids, completion_mask = pad_sequences(
        [e.token_ids[s:] for e, s in zip(episodes, starts, strict=True)], pad
    )
    loss_mask, _ = pad_sequences([e.loss_mask[s:] for e, s in zip(episodes, starts, strict=True)], 0)
    sampler = torch.zeros(completion_ids.shape, dtype=torch.float32)
    for row, (e, s) in enumerate(zip(episodes, starts, strict=True)):
        sampler[row, : len(e.token_ids) - s] = torch.tensor(e.sampler_logps[s:], dtype=torch.float32)
    rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32)
    batch = PolicyBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=group_advantages(rewards, group_size),
        sampler_logps=sampler,
        loss_mask=loss_mask,
    )
    if hint_level is not None:
        prompts, offsets, weights = [], [], []
        written = written_episode_hints(episodes, hint_writer) if hint_writer is not None else None
        for i, (e, s) in enumerate(zip(episodes, starts, strict=True)):
            found = written[i] if written is not None else episode_hint(e, hint_level)
            turn, hint = found if found is not None else (0, "")
            prompts.append(teacher_prompt_ids(tokenizer, e, turn, hint) if found else e.token_ids[:s])
            offsets.append(e.turns[turn].start - s)
            weights.append(float(found is not None))
        batch.teacher_prompt_ids, batch.teacher_prompt_mask = pad_sequences(prompts, pad, left=True)
        batch.teacher_offsets = torch.tensor(offsets, dtype=torch.long)
        batch.sdpo_weight = torch.tensor(weights)
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            setattr(batch, name, value.to(device))
    return batch


def episode_pairs(
    episodes: Sequence[Episode], *, group_size: int, id_prefix: str
) -> Iterator[tuple[str, list[int], list[int], list[int], list[int]]]:
    """DPO pairs from each group's episodes with different outcomes (chosen = passed), as whole
    episodes (ids and loss_mask: only sampled ids are scored): (pair_id, chosen ids, chosen mask,
    rejected ids, rejected mask). The i-th passed episode of a group is paired with its i-th failed one."""
    for group in range(0, len(episodes), group_size):
        members = episodes[group : group + group_size]
        passed = [e for e in members if e.passed]
        failed = [e for e in members if not e.passed and any(e.loss_mask)]
        for i, (chosen, rejected) in enumerate(zip(passed, failed, strict=False)):
            pair_id = f"{id_prefix}/{group // group_size}/{i}"
            yield pair_id, chosen.token_ids, chosen.loss_mask, rejected.token_ids, rejected.loss_mask


def add_episode_pairs(replay: PreferenceReplay, episodes: Sequence[Episode], *, group_size: int, id_prefix: str) -> int:
    """`episode_pairs` added to `replay`; returns the number of pairs added."""
    added = 0
    for pair_id, *tokens in episode_pairs(episodes, group_size=group_size, id_prefix=id_prefix):
        replay.add(pair_id, *tokens)
        added += 1
    return added


@dataclass
class EpisodeRollout:
    """One step's episodes: N tasks x G episodes (task-major), packed for the loss."""

    policy: PolicyBatch
    episodes: list[Episode]
    stats: RolloutStats
    metrics: dict[str, float]


def agent_rollout(
    sampler: Engine | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[WorkspaceTask],
    *,
    group_size: int,
    max_turns: int,
    max_tokens: int,
    max_turn_tokens: int | None,
    temperature: float,
    tools: Sequence[str] = TOOLS,
    hint_level: int | str | None = "feedback",
    sandbox: Any = None,
    require_finish: bool = False,
    stop_token_ids: Sequence[int] | None = None,
    hint_writer: HintWriter | None = None,
) -> EpisodeRollout:
    """G episodes per task (all N x G in lockstep, `run_episodes`), packed by `episode_policy_batch`
    on the sampler's device.

    hint_level None: no SDPO teacher context. stats: `trainer.rollout.single_turn.RolloutStats` (generation_s
    = seconds in the sampler, execution_s = seconds in tools); metrics: `episode_metrics`.
    stop_token_ids: the ids that end a turn (None: `trainer.rollout.templates.stop_token_ids`).
    hint_writer: an external teacher writing each failed episode's hint (`episode_policy_batch`).
    """
    episodes = run_episodes(
        sampler,
        tokenizer,
        [task for task in tasks for _ in range(group_size)],
        tools=tools,
        max_turns=max_turns,
        max_tokens=max_tokens,
        temperature=temperature,
        sandbox=sandbox,
        max_turn_tokens=max_turn_tokens,
        require_finish=require_finish,
        stop_token_ids=stop_token_ids,
    )
    device = as_engine(sampler, tokenizer).device
    policy = episode_policy_batch(
        episodes, tokenizer, group_size=group_size, hint_level=hint_level, device=device, hint_writer=hint_writer
    )
    passed = torch.tensor([e.passed for e in episodes]).view(len(tasks), group_size)
    stats = RolloutStats(
        reward=sum(e.reward for e in episodes) / len(episodes),
        teacher_reward=None,
        solved_groups=passed.any(dim=1).float().mean().item(),
        completion_tokens=sum(sum(e.loss_mask) for e in episodes),
        generation_s=sum(e.model_s for e in episodes),
        execution_s=sum(e.tools_s for e in episodes),
    )
    return EpisodeRollout(policy, episodes, stats, episode_metrics(episodes))
