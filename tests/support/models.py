"""Tiny real models the unit tests share: a Qwen2 with a tokenizer trained on a few sums, the
batches the loss tests build from it, and a policy that rolls out addition tasks."""

import copy

import pytest
import torch

from trainer.envs.addition import Addition as AdditionTasks
from trainer.model import tiny_model_and_tokenizer
from trainer.objective.batching import pad_sequences
from trainer.objective.losses import ComposerBatch, PolicyBatch, completion_logits, token_logps
from trainer.objective.replay import PreferenceReplay
from trainer.rollout.single_turn import rollout

QUESTIONS = ["What is 12 + 7?", "What is 3 + 4?", "Add 10 and 25.", "What is 2 + 2?"]
ANSWERS = ["Answer: 19", "7", "The answer is 35", "Answer: 4"]
WRONG = ["Answer: 18", "9", "It is 53", "5"]
HINT = " Hint: add the ones first, then the tens."


@pytest.fixture
def model_and_tokenizer(tmp_path_factory):
    model, tokenizer = tiny_model_and_tokenizer(seed=0, cache_dir=tmp_path_factory.getbasetemp() / "tok")
    return model, tokenizer


def chat(tokenizer, text):
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def answer(tokenizer, text):
    return tokenizer.encode(text) + [tokenizer.eos_token_id]


def policy_batch(model, tokenizer, *, snapshot_old_logps=True):
    """Four rollouts: prompts of different lengths (left pad), answers of different lengths (right pad)."""
    prompt_ids, prompt_mask = pad_sequences([chat(tokenizer, q) for q in QUESTIONS], tokenizer.pad_token_id, left=True)
    completion_ids, completion_mask = pad_sequences(
        [answer(tokenizer, a) for a in ANSWERS], tokenizer.pad_token_id, left=False
    )
    teacher_ids, teacher_mask = pad_sequences(
        [chat(tokenizer, q + HINT) for q in QUESTIONS], tokenizer.pad_token_id, left=True
    )
    old_logps = None
    if snapshot_old_logps:  # what the rollout does: score the samples with the sampling policy
        with torch.no_grad():
            old_logps = token_logps(
                completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask), completion_ids
            )
    return PolicyBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        old_logps=old_logps,
        teacher_prompt_ids=teacher_ids,
        teacher_prompt_mask=teacher_mask,
    )


def replay_buffer(model, tokenizer, **kwargs):
    buffer = PreferenceReplay(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id, **kwargs)
    for i, (q, good, bad) in enumerate(zip(QUESTIONS, ANSWERS, WRONG, strict=True)):
        prompt = chat(tokenizer, q)
        chosen, rejected = answer(tokenizer, good), answer(tokenizer, bad)
        buffer.add(
            f"pair-{i}",
            prompt + chosen,
            [0] * len(prompt) + [1] * len(chosen),
            prompt + rejected,
            [0] * len(prompt) + [1] * len(rejected),
        )
    return buffer


def composer_batch(model, tokenizer):
    preference = replay_buffer(model, tokenizer).sample(3, generator=torch.Generator().manual_seed(0))
    return ComposerBatch(policy=policy_batch(model, tokenizer), preference=preference)


class ForwardCounter:
    """Records the batch size of every forward of a module (a real hook, no mocks)."""

    def __init__(self, module):
        self.batch_sizes = []
        self.handle = module.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        self.batch_sizes.append(kwargs["input_ids"].shape[0])


# ---------------------------------------------------------------------------- completion_logits


G = 4


@pytest.fixture(scope="module")
def policy():
    tasks = AdditionTasks(9)
    model, tokenizer = tiny_model_and_tokenizer(
        tasks.corpus(), vocab_size=400, hidden_size=32, num_layers=1, num_heads=2
    )
    return model, tokenizer, tasks


def run(policy, tasks, **overrides):
    model, tokenizer, _ = policy
    kwargs = dict(
        group_size=G,
        max_prompt_length=64,
        max_completion_length=3,
        temperature=1.0,
        hint_level=2,
        sibling_hints=True,
        teacher=model,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return rollout(model, tokenizer, tasks, **kwargs)
