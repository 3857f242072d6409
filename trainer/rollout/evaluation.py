"""Held-out evaluation: greedy pass@1 and sampled pass@k on prompts training never samples.

The training reward is measured on the batches the policy is trained on, from a problem space the
warm-up already covered; it cannot tell learning from memorising. This scores the current policy on
the environment's evaluation split, the way the field reports it: pass@1 with greedy decoding, and
pass@k with k samples at the rollout temperature, using the unbiased estimator of Chen et al. 2021
(arXiv 2107.03374, eq. 1) with n = k samples, which reduces to "any of the k is correct".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.envs import Score, Task, hint_for, sibling_hint
from trainer.envs.workspace import TOOLS, WorkspaceTask
from trainer.objective.batching import pad_sequences
from trainer.objective.losses import completion_logits, token_logps
from trainer.rollout.episodes import run_episodes
from trainer.rollout.sampling import Engine, decode_completions, sample
from trainer.rollout.single_turn import ScoreMany, score_each
from trainer.rollout.templates import chat_prompt_ids, end_of_turn_id, hinted_prompt_ids, resolve_stop_ids

__all__ = ["EvalCounts", "evaluate", "evaluate_episodes", "teacher_gate", "TokenScorer", "GATE_HINT_KINDS"]

GATE_HINT_KINDS = ("feedback", "partial", "reference", "sibling")


@dataclass
class EvalCounts:
    """Per-task outcomes, so shards evaluated on different ranks add up exactly."""

    greedy_correct: list[bool]  # one per task
    sampled_correct: list[int]  # correct samples out of k, one per task
    k: int
    greedy_attempts: list[tuple[str, Score]] = field(default_factory=list)  # (text, score) per task, if kept

    def __add__(self, other: EvalCounts) -> EvalCounts:
        return EvalCounts(
            self.greedy_correct + other.greedy_correct,
            self.sampled_correct + other.sampled_correct,
            self.k,
            self.greedy_attempts + other.greedy_attempts,
        )

    def summary(self) -> dict[str, float | int]:
        """pass_at_1 (greedy), pass_at_k and sampled_reward (mean over the k samples), size, k."""
        n = len(self.greedy_correct)
        return dict(
            pass_at_1=sum(self.greedy_correct) / n,
            pass_at_k=sum(c > 0 for c in self.sampled_correct) / n,
            sampled_reward=sum(self.sampled_correct) / (n * self.k),
            size=n,
            k=self.k,
        )


def evaluate(
    sampler: Engine | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    *,
    k: int,
    max_prompt_length: int,
    max_completion_length: int,
    temperature: float,
    score_many: ScoreMany = score_each,
    stop_token_ids: Sequence[int] | None = None,
) -> EvalCounts:
    """Greedy and k sampled completions of every task; sampling draws from torch's global generator.

    `score_many` scores them (an environment's pool for code); a completion counts when its reward > 0.
    `stop_token_ids`: the ids that end a turn (None: `trainer.rollout.templates.stop_token_ids`).
    """
    if not tasks:
        return EvalCounts([], [], k)
    stops = resolve_stop_ids(tokenizer, sampler, stop_token_ids)
    settings = dict(max_new_tokens=max_completion_length, stop_token_ids=stops)
    prompts = chat_prompt_ids(tokenizer, [task.prompt() for task in tasks], max_prompt_length)
    greedy = sample(sampler, tokenizer, prompts, temperature=1.0, greedy=True, **settings)
    greedy_texts = decode_completions(tokenizer, greedy.completion_ids, greedy.completion_mask)
    repeated = [ids for ids in prompts for _ in range(k)]
    drawn = sample(sampler, tokenizer, repeated, temperature=temperature, **settings)
    texts = decode_completions(tokenizer, drawn.completion_ids, drawn.completion_mask)
    greedy_scores = score_many(list(tasks), greedy_texts)
    sampled_scores = score_many([task for task in tasks for _ in range(k)], texts)
    return EvalCounts(
        greedy_correct=[s.reward > 0 for s in greedy_scores],
        sampled_correct=[sum(sampled_scores[i * k + j].reward > 0 for j in range(k)) for i in range(len(tasks))],
        k=k,
        greedy_attempts=list(zip(greedy_texts, greedy_scores, strict=True)),
    )


class TokenScorer(ABC):
    """A teacher outside the process that scores tokens it is given (an endpoint's prompt
    log-probs: `trainer.teachers.endpoint.EndpointTeacher`), for the teacher gate."""

    @abstractmethod
    def completion_logps(
        self, prompts: Sequence[list[int]], completions: Sequence[list[int]]
    ) -> list[list[float] | None]:
        """Per (prompt, completion) pair of token ids, the log-prob (nats, at temperature 1) of each
        completion token behind its prompt and the tokens before it; None where it could not be scored."""


def gate_hint(task: Task, kind: str, attempt: str, score: Score) -> str:
    """The hint of `kind` for the gate: the environment's feedback on the student's greedy `attempt`,
    the task's partial or reference hint, or (sibling) the reference answer as a correct sibling's."""
    if kind == "sibling":
        return sibling_hint(task.demonstration() or "")
    return hint_for(task, kind, attempt, score)


@torch.no_grad()
def teacher_gate(
    student: Callable[..., Any],
    teacher: Callable[..., Any] | TokenScorer,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    attempts: Sequence[tuple[str, Score]],
    *,
    max_prompt_length: int,
    kinds: Sequence[str] = GATE_HINT_KINDS,
    written: Mapping[str, Sequence[str | None]] | None = None,
) -> dict[str, list[float | None]]:
    """SDPO's gate: does the hinted teacher know more than the student? Per task, the mean per-token
    log-probability (nats, float) of a correct completion (the task's demonstration and the
    template's end-of-turn token, `end_of_turn_id`) under
    the student behind the plain prompt ("student") and under the teacher behind each hint kind.

    SDPO (self-distillation from the hinted policy, the recipe's second channel) distils the
    teacher's token distribution into the student; it can only help where the teacher puts more
    mass on correct answers, i.e. where
    `result[kind]` exceeds `result["student"]`. `attempts` are the student's greedy (text, Score)
    per task, the context of the `feedback` kind. `written`: more kinds, each with its hint per task
    (a hint writer's, e.g. `teacher:<name>`; None: the plain prompt). `teacher` is a module, or a
    `TokenScorer` (an endpoint model, which shares the student's tokenizer). Returns
    {"student": [...], kind: [...]}, one float per task (None where a scorer could not score it), in
    task order ({} keys with empty lists for no tasks).

    Raises:
        ValueError: `attempts` and `tasks` differ in length, or a task has no demonstration.
    """
    if len(attempts) != len(tasks):
        raise ValueError(f"teacher_gate: {len(tasks)} tasks but {len(attempts)} attempts")
    written = dict(written or {})
    for kind, hints in written.items():
        if len(hints) != len(tasks):
            raise ValueError(f"teacher_gate: {len(tasks)} tasks but {len(hints)} {kind} hints")
    result: dict[str, list[float | None]] = {"student": [], **{kind: [] for kind in [*kinds, *written]}}
    if not tasks:
        return result
    answers = []
    for task in tasks:
        if task.demonstration() is None:
            raise ValueError(f"teacher_gate: task {task!r} has no demonstration (a correct completion)")
        ids = tokenizer(task.demonstration(), add_special_tokens=False)["input_ids"]
        answers.append(ids + [end_of_turn_id(tokenizer)])
    device = next(student.parameters()).device
    completion_ids, completion_mask = (t.to(device) for t in pad_sequences(answers, tokenizer.pad_token_id))
    contexts = {"student": (student, chat_prompt_ids(tokenizer, [t.prompt() for t in tasks], max_prompt_length))}
    for kind in kinds:
        hinted = [
            hinted_prompt_ids(tokenizer, task, gate_hint(task, kind, *attempt), max_prompt_length)
            for task, attempt in zip(tasks, attempts, strict=True)
        ]
        contexts[kind] = (teacher, hinted)
    for kind, hints in written.items():
        contexts[kind] = (
            teacher,
            [hinted_prompt_ids(tokenizer, t, h, max_prompt_length) for t, h in zip(tasks, hints, strict=True)],
        )
    for name, (model, prompts) in contexts.items():
        if isinstance(model, TokenScorer):
            scored = model.completion_logps(prompts, answers)
            result[name] = [None if lps is None else sum(lps) / len(lps) for lps in scored]
            continue
        prompt_ids, prompt_mask = (t.to(device) for t in pad_sequences(prompts, tokenizer.pad_token_id, left=True))
        logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        logp = token_logps(logits, completion_ids) * completion_mask
        result[name] = (logp.sum(dim=1) / completion_mask.sum(dim=1)).tolist()
    return result


def evaluate_episodes(
    sampler: Engine | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[WorkspaceTask],
    *,
    k: int,
    max_turns: int,
    max_tokens: int,
    max_turn_tokens: int | None,
    temperature: float,
    tools: Sequence[str] = TOOLS,
    sandbox: Any = None,
    stop_token_ids: Sequence[int] | None = None,
) -> EvalCounts:
    """Held-out pass@1 (one greedy episode per task) and k sampled episodes, as `evaluate`
    (each set in lockstep, `run_episodes`; `stop_token_ids` as there)."""
    settings = dict(
        tools=tools,
        max_turns=max_turns,
        max_tokens=max_tokens,
        max_turn_tokens=max_turn_tokens,
        sandbox=sandbox,
        stop_token_ids=resolve_stop_ids(tokenizer, sampler, stop_token_ids),
    )
    greedy = [e.passed for e in run_episodes(sampler, tokenizer, tasks, temperature=1.0, greedy=True, **settings)]
    sampled = run_episodes(
        sampler, tokenizer, [t for t in tasks for _ in range(k)], temperature=temperature, **settings
    )
    counts = [sum(e.passed for e in sampled[i * k : (i + 1) * k]) for i in range(len(tasks))]
    return EvalCounts(greedy_correct=greedy, sampled_correct=counts, k=k)
