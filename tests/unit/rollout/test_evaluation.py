"""Held-out evaluation: pass@1 (greedy) and pass@k, counted so that shards add up exactly."""

import copy

import pytest
import torch

from trainer.envs import Score
from trainer.envs.addition import Addition as AdditionTasks
from trainer.envs.addition import AdditionTask as Task
from trainer.model import tiny_model_and_tokenizer
from trainer.rollout.evaluation import EvalCounts, evaluate, teacher_gate
from trainer.rollout.templates import chat_prompt_ids


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


def test_greedy_answers_are_the_same_under_any_seed_and_are_generates_own_greedy_decoding():
    tasks = AdditionTasks(5, held_out=6)
    model, tokenizer = tiny_model_and_tokenizer(tasks.corpus(), vocab_size=300, hidden_size=32, num_layers=2)
    with torch.no_grad():  # a fresh tiny model answers every prompt alike; larger weights answer each its own way
        noise = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise))
    held = tasks.held_out
    greedy = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        counts = evaluate(model, tokenizer, held, k=3, max_prompt_length=64, max_completion_length=6, temperature=1.0)
        greedy.append([text for text, _ in counts.greedy_attempts])
    assert greedy[0] == greedy[1]
    # The reference: transformers' own greedy search, one unpadded prompt at a time, cut after EOS.
    reference = []
    for ids in chat_prompt_ids(tokenizer, [task.prompt() for task in held], 64):
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=6,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[0, len(ids) :].tolist()
        completion = out[: out.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in out else out
        reference.append(tokenizer.decode(completion, skip_special_tokens=True))
    assert greedy[0] == reference
    assert len(set(reference)) > 1 and any(reference), reference  # real, varied answers: not vacuous


def mean_answer_logp(model, tokenizer, prompt_text, answer):
    """Mean per-token log-prob of `answer` + EOS behind a one-turn chat prompt, from one unpadded forward."""
    prompt = chat_prompt_ids(tokenizer, [prompt_text], max_length=10**6)[0]
    completion = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).mean().item()


def test_teacher_gate_scores_the_correct_answer_under_the_student_and_each_hinted_teacher():
    tasks = AdditionTasks(5, held_out=3)
    student, tokenizer = tiny_model_and_tokenizer(tasks.corpus(), vocab_size=300, hidden_size=32, num_layers=1)
    teacher = copy.deepcopy(student)  # a different teacher: the EMA copy of a student that moved on
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    held = tasks.held_out
    attempts = [
        ("12", Score(0.0, False, "12 is wrong.")),
        ("3", Score(1.0, True, "3 is correct.")),
        ("", Score(0, 0, "")),
    ]
    gate = teacher_gate(student, teacher, tokenizer, held, attempts, max_prompt_length=128)
    assert set(gate) == {"student", "feedback", "partial", "reference", "sibling"}
    for i, task in enumerate(held):
        assert gate["student"][i] == pytest.approx(
            mean_answer_logp(student, tokenizer, task.prompt(), task.answer), abs=1e-5
        )
        hints = {
            "feedback": f"A previous attempt {'passed' if attempts[i][1].passed else 'did not pass'}. The attempt:\n"
            f"{attempts[i][0]}\nFeedback:\n{attempts[i][1].feedback}",
            "partial": task.hints[0],
            "reference": task.hints[-1],
            "sibling": f"A correct answer is {task.answer}.",
        }
        for kind, hint in hints.items():
            expected = mean_answer_logp(teacher, tokenizer, task.prompt(hint), task.answer)
            assert gate[kind][i] == pytest.approx(expected, abs=1e-5), kind
    with pytest.raises(ValueError, match="3 tasks but 2 attempts"):
        teacher_gate(student, teacher, tokenizer, held, attempts[:2], max_prompt_length=128)


def test_evaluate_keeps_each_greedy_attempt_for_the_feedback_gate():
    tasks = AdditionTasks(5, held_out=4)
    model, tokenizer = tiny_model_and_tokenizer(tasks.corpus(), vocab_size=300, hidden_size=32, num_layers=1)
    counts = evaluate(
        model, tokenizer, tasks.held_out, k=1, max_prompt_length=64, max_completion_length=3, temperature=1.0
    )
    assert [score.passed for _, score in counts.greedy_attempts] == counts.greedy_correct
    assert [task.score(text) for task, (text, _) in zip(tasks.held_out, counts.greedy_attempts, strict=True)] == [
        score for _, score in counts.greedy_attempts
    ]
