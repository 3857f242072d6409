"""trainer.rollout.sampling: a completion ends at the first id that ends the model's turn (the
tokenizer's EOS, a declared EOS id, the template's end-of-turn token), the mask covers it and
nothing after it, and the list the caller passes is the one that stops. A tiny real Qwen2 made to
write what a Gemma-style chat model writes (tests/support/chat_templates.py), through `generate`."""

from __future__ import annotations

import pytest

from tests.support.chat_templates import Forced, chat_tokenizer, declared_eos, tiny_chat_model
from trainer.envs.addition import AdditionTask
from trainer.rollout.sampling import decode_completions, sample
from trainer.rollout.templates import chat_prompt_ids, stop_token_ids


@pytest.fixture(scope="module")
def gemma():
    return chat_tokenizer("gemma")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_then_a_made_up_turn(tokenizer, answer: str, end: str) -> list[int]:
    """What a chat model writes when nobody stops it: its answer, its turn's end, then a new turn."""
    token = tokenizer.convert_tokens_to_ids
    return [
        *ids(tokenizer, answer),
        token(end),
        *ids(tokenizer, "\n"),
        token("<start_of_turn>"),
        *ids(tokenizer, "user\nWhat is 1 + 1? Answer: 2"),
        token("<end_of_turn>"),
    ]


def test_sampling_stops_at_the_end_of_turn_token_that_is_not_the_tokenizers_eos(gemma):
    model = tiny_chat_model(gemma, declared_eos("gemma", gemma))
    forced = Forced(model, [[answer_then_a_made_up_turn(gemma, "19", "<end_of_turn>")]])
    prompts = chat_prompt_ids(gemma, ["What is 12 + 7?"], max_length=64)
    drawn = sample(model, gemma, prompts, max_new_tokens=40, temperature=1.0, stop_token_ids=[1, 4])
    assert forced.forwards == 3  # generation itself stopped there, it was not only masked
    eot = gemma.convert_tokens_to_ids("<end_of_turn>")
    assert drawn.completion_ids[0, :3].tolist() == [*ids(gemma, "19"), eot]
    assert drawn.completion_mask.sum().item() == 3  # trained on: "1", "9", <end_of_turn>
    assert set(drawn.completion_ids[0, 3:].tolist()) <= {gemma.pad_token_id}
    assert float(drawn.sampler_logps[0, 3:].abs().sum()) == 0.0
    texts = decode_completions(gemma, drawn.completion_ids, drawn.completion_mask)
    assert texts == ["19"] and AdditionTask("What is 12 + 7?", "19", ()).score(texts[0]).reward == 1.0


def test_without_a_list_the_sampler_stops_where_the_models_turn_ends(gemma):
    # a library caller that passes no list gets stop_token_ids(tokenizer, model): the template's
    # <end_of_turn> stops even when the model declares the tokenizer's EOS alone
    model = tiny_chat_model(gemma)
    assert model.generation_config.eos_token_id == gemma.eos_token_id
    Forced(model, [[answer_then_a_made_up_turn(gemma, "19", "<end_of_turn>")]])
    prompts = chat_prompt_ids(gemma, ["What is 12 + 7?"], max_length=64)
    drawn = sample(model, gemma, prompts, max_new_tokens=40, temperature=1.0)
    assert drawn.completion_mask.sum().item() == 3


def test_each_row_ends_at_its_own_first_stop_id_whichever_it_is(gemma):
    model = tiny_chat_model(gemma, declared_eos("gemma", gemma))
    rows = [
        answer_then_a_made_up_turn(gemma, "19", "<end_of_turn>"),
        answer_then_a_made_up_turn(gemma, "123", "<eos>"),
        ids(gemma, "4444444444"),  # never stops: runs to max_new_tokens
    ]
    Forced(model, [rows])
    prompts = chat_prompt_ids(gemma, ["What is 12 + 7?", "What is 100 + 23?", "Say 4."], max_length=64)
    stops = stop_token_ids(gemma, model)
    drawn = sample(model, gemma, prompts, max_new_tokens=8, temperature=1.0, stop_token_ids=stops)
    assert drawn.completion_mask.sum(dim=1).tolist() == [3, 4, 8]
    assert decode_completions(gemma, drawn.completion_ids, drawn.completion_mask) == ["19", "123", "4444444444"[:8]]


def test_the_list_the_caller_passes_is_the_one_that_stops(gemma):
    # the tokenizer's EOS alone (what the sampler used before): <end_of_turn> does not stop, the
    # made-up user turn is sampled and scored, and the correct 19 reads as the 2 it ends with
    model = tiny_chat_model(gemma, declared_eos("gemma", gemma))
    Forced(model, [[answer_then_a_made_up_turn(gemma, "19", "<end_of_turn>")]])
    prompts = chat_prompt_ids(gemma, ["What is 12 + 7?"], max_length=64)
    drawn = sample(model, gemma, prompts, max_new_tokens=40, temperature=1.0, stop_token_ids=[gemma.eos_token_id])
    assert drawn.completion_mask.sum().item() == 40
    text = decode_completions(gemma, drawn.completion_ids, drawn.completion_mask)[0]
    assert text.startswith("19\nuser\nWhat is 1 + 1? Answer: 2")
