"""Held-out evaluation: pass@1 (greedy) and pass@k, counted so that shards add up exactly."""

import torch

from trainer.envs import Score
from trainer.envs.addition import Addition as AdditionTasks
from trainer.envs.addition import AdditionTask as Task
from trainer.evaluation import EvalCounts, evaluate
from trainer.model import tiny_model_and_tokenizer


def test_shards_add_up_and_pass_at_k_is_any_of_k_correct():
    left = EvalCounts(greedy_correct=[True, False], sampled_correct=[0, 3], k=4)
    right = EvalCounts(greedy_correct=[False], sampled_correct=[1], k=4)
    figures = (left + right).summary()
    assert figures == dict(pass_at_1=1 / 3, pass_at_k=2 / 3, sampled_reward=4 / 12, size=3, k=4)


class AnythingGoes(Task):
    def score(self, completion: str) -> Score:
        return Score(1.0, True, "anything goes")


def test_evaluate_scores_greedy_and_k_samples_of_every_task():
    tasks = AdditionTasks(5, held_out=6)
    model, tokenizer = tiny_model_and_tokenizer(tasks.corpus(), vocab_size=300, hidden_size=32, num_layers=1)
    held = tasks.held_out
    torch.manual_seed(0)
    never = evaluate(model, tokenizer, held, k=3, max_prompt_length=64, max_completion_length=3, temperature=1.0)
    assert len(never.greedy_correct) == 6 and len(never.sampled_correct) == 6
    always = evaluate(
        model,
        tokenizer,
        [AnythingGoes(t.question, t.answer, t.hints) for t in held],
        k=3,
        max_prompt_length=64,
        max_completion_length=3,
        temperature=1.0,
    )
    assert always.summary() == dict(pass_at_1=1.0, pass_at_k=1.0, sampled_reward=1.0, size=6, k=3)
    # greedy decoding is deterministic: the same model answers the same way twice
    again = evaluate(model, tokenizer, held, k=3, max_prompt_length=64, max_completion_length=3, temperature=1.0)
    assert again.greedy_correct == never.greedy_correct
