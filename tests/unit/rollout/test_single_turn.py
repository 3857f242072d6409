"""Rollouts on a real tiny model: layout, masks, rewards and the teacher context."""

import random

import pytest
import torch

from tests.support.models import G, run
from trainer.envs import Score
from trainer.envs.addition import AdditionTask as Task
from trainer.rollout.templates import chat_prompt_ids


def test_prompt_longer_than_limit_is_an_error(policy):
    with pytest.raises(ValueError, match="rollout.max_prompt_length=3"):
        chat_prompt_ids(policy[1], ["What is 1+2?"], max_length=3)


def test_batch_layout_and_masks(policy):
    model, tokenizer, tasks = policy
    prompts = [tasks.sample(random.Random(i)) for i in range(3)]
    samples = run(policy, prompts)
    p, stats = samples.policy, samples.stats
    assert p.prompt_ids.shape[0] == p.completion_ids.shape[0] == 3 * G
    assert p.completion_ids.shape[1] <= 3
    # prompts are left-padded: the last column is always a real token
    assert bool(p.prompt_mask[:, -1].all())
    # completions: mask covers the tokens up to and including the first EOS, nothing after
    for ids, mask in zip(p.completion_ids.tolist(), p.completion_mask.tolist(), strict=True):
        valid = sum(mask)
        assert mask == [1] * valid + [0] * (len(mask) - valid)
        assert tokenizer.eos_token_id not in ids[: valid - 1]
        assert all(t == tokenizer.pad_token_id for t in ids[valid:])
    assert 0.0 <= stats.reward <= 1.0 and stats.teacher_reward is not None
    assert stats.completion_tokens == int(p.completion_mask.sum())


def length_reward(tasks, completions):
    """A checker whose rewards differ inside a group even for a random model (whose samples the
    addition checker scores 0 every time, which makes every advantage 0): the completion's length
    in characters over 10, capped at 1."""
    return [Score(min(1.0, len(text) / 10), False, f"{len(text)} characters") for text in completions]


def test_dr_grpo_advantages_are_each_reward_minus_its_group_mean_on_mixed_rewards(policy):
    _, tokenizer, tasks = policy
    prompts = [tasks.sample(random.Random(i)) for i in range(3)]
    samples = run(policy, prompts, score_many=length_reward)
    p = samples.policy
    texts = [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(p.completion_ids, p.completion_mask, strict=True)
    ]
    rewards = [min(1.0, len(text) / 10) for text in texts]  # from the sampled tokens themselves
    assert samples.rewards.tolist() == pytest.approx(rewards)
    groups = [rewards[n * G : (n + 1) * G] for n in range(3)]
    assert sum(len(set(group)) > 1 for group in groups) >= 2, groups  # mixed inside groups
    expected = [r - sum(group) / G for group in groups for r in group]  # Dr.GRPO: no std division
    assert p.advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert any(abs(a) > 0.05 for a in expected)  # and they are not all zero


def test_teacher_reads_the_hint_and_a_correct_sibling(policy):
    model, tokenizer, _ = policy
    task = Task("What is 2+2?", "4", ("even", "between", "The answer is 4."))
    batch = run(policy, [task])
    teacher_text = tokenizer.batch_decode(batch.policy.teacher_prompt_ids, skip_special_tokens=True)
    student_text = tokenizer.batch_decode(batch.policy.prompt_ids, skip_special_tokens=True)
    assert all("Hint:" not in text for text in student_text)
    completions = tokenizer.batch_decode(batch.policy.completion_ids, skip_special_tokens=True)
    correct = [task.reward(c) > 0 for c in completions]
    for row, text in enumerate(teacher_text):
        others_correct = [j for j in range(G) if j != row and correct[j]]
        expected = "A correct answer is" if others_correct else "Hint: The answer is 4."
        assert expected in text, (text, correct)


def test_a_hint_too_long_for_the_prompt_budget_keeps_its_end(policy):
    from trainer.rollout.templates import hinted_prompt_ids

    _, tokenizer, _ = policy
    task = Task("What is 2+2?", "4", ("even", "between", "The answer is 4."))
    hint = "Traceback: " + "x" * 2000 + " AssertionError: 5 != 4"
    ids = hinted_prompt_ids(tokenizer, task, hint, max_length=64)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert (
        len(ids) <= 64 and "...xxx" in text and "AssertionError: 5 != 4\nassistant" in text and "What is 2+2?" in text
    )
    assert (
        hinted_prompt_ids(tokenizer, task, "even", max_length=64)
        == chat_prompt_ids(tokenizer, [task.prompt("even")], max_length=64)[0]
    )
    with pytest.raises(ValueError, match="rollout.max_prompt_length=3"):
        hinted_prompt_ids(tokenizer, task, hint, max_length=3)


class EvenLength(Task):
    """Passes about half of a random model's samples, so a group mixes passes and failures."""

    def score(self, completion: str) -> Score:
        even = len(completion) % 2 == 0
        return Score(float(even), even, "even" if even else "odd")


def test_hint_level_sibling_distils_only_rows_that_have_a_correct_sibling(policy):
    """`hint_level: sibling`: a row's teacher reads a correct sibling's answer; a row without one is not
    distilled (sdpo_weight 0) and its teacher prompt is the plain prompt."""
    _, tokenizer, _ = policy
    task = EvenLength("What is 2+2?", "4", ("even", "between", "The answer is 4."))
    for seed in range(40):  # a rollout whose group has exactly one correct sample
        torch.manual_seed(seed)
        batch = run(policy, [task], hint_level="sibling", sibling_hints=False)
        correct = [s.passed for s in batch.scores]
        if sum(correct) == 1:
            break
    assert sum(correct) == 1
    weight = batch.policy.sdpo_weight.tolist()
    teacher_text = tokenizer.batch_decode(batch.policy.teacher_prompt_ids, skip_special_tokens=True)
    student_text = tokenizer.batch_decode(batch.policy.prompt_ids, skip_special_tokens=True)
    for row in range(G):
        has_sibling = any(correct[j] for j in range(G) if j != row)
        assert weight[row] == float(has_sibling)
        assert ("A correct answer is" in teacher_text[row]) == has_sibling
        if not has_sibling:
            assert teacher_text[row] == student_text[row]
