"""Held-out evaluation: greedy pass@1 and sampled pass@k on prompts training never samples.

The training reward is measured on the batches the policy is trained on, from a problem space the
warm-up already covered; it cannot tell learning from memorising. This scores the current policy on
the environment's evaluation split, the way the field reports it: pass@1 with greedy decoding, and
pass@k with k samples at the rollout temperature, using the unbiased estimator of Chen et al. 2021
(arXiv 2107.03374, eq. 1) with n = k samples, which reduces to "any of the k is correct".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.envs import Task
from trainer.rollout import ScoreMany, chat_prompt_ids, decode_completions, sample, score_each

__all__ = ["EvalCounts", "evaluate"]


@dataclass
class EvalCounts:
    """Per-task outcomes, so shards evaluated on different ranks add up exactly."""

    greedy_correct: list[bool]  # one per task
    sampled_correct: list[int]  # correct samples out of k, one per task
    k: int

    def __add__(self, other: EvalCounts) -> EvalCounts:
        return EvalCounts(
            self.greedy_correct + other.greedy_correct, self.sampled_correct + other.sampled_correct, self.k
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
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    *,
    k: int,
    max_prompt_length: int,
    max_completion_length: int,
    temperature: float,
    score_many: ScoreMany = score_each,
) -> EvalCounts:
    """Greedy and k sampled completions of every task; sampling draws from torch's global generator.

    `score_many` scores them (an environment's pool for code); a completion counts when its reward > 0.
    """
    if not tasks:
        return EvalCounts([], [], k)
    prompts = chat_prompt_ids(tokenizer, [task.prompt() for task in tasks], max_prompt_length)
    greedy = sample(model, tokenizer, prompts, max_new_tokens=max_completion_length, temperature=1.0, greedy=True)
    greedy_texts = decode_completions(tokenizer, greedy.completion_ids, greedy.completion_mask)
    repeated = [ids for ids in prompts for _ in range(k)]
    drawn = sample(model, tokenizer, repeated, max_new_tokens=max_completion_length, temperature=temperature)
    texts = decode_completions(tokenizer, drawn.completion_ids, drawn.completion_mask)
    greedy_scores = score_many(list(tasks), greedy_texts)
    sampled_scores = score_many([task for task in tasks for _ in range(k)], texts)
    return EvalCounts(
        greedy_correct=[s.reward > 0 for s in greedy_scores],
        sampled_correct=[sum(sampled_scores[i * k + j].reward > 0 for j in range(k)) for i in range(len(tasks))],
        k=k,
    )
