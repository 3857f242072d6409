"""trainer.model: a hub model loaded from disk keeps the EOS ids its generation_config.json declares
(the turn terminators of chat models) while its sampling settings are set aside."""

from __future__ import annotations

import json

from transformers import GenerationConfig

from tests.support.chat_templates import chat_tokenizer, declared_eos, tiny_chat_model
from trainer.model import pretrained_model_and_tokenizer
from trainer.rollout.templates import stop_token_ids


def test_the_loader_keeps_the_declared_eos_list_while_it_drops_sampling_knobs(tmp_path):
    tokenizer = chat_tokenizer("gemma")
    model = tiny_chat_model(tokenizer)
    eos = declared_eos("gemma", tokenizer)  # [<eos>, <end_of_turn>] = [1, 4], as Gemma ships [1, 106]
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, do_sample=True, top_k=5, repetition_penalty=1.3
    )
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [1, 4]

    loaded, loaded_tokenizer = pretrained_model_and_tokenizer(str(tmp_path))
    config = loaded.generation_config
    assert config.eos_token_id == [1, 4]
    assert (config.top_k, config.repetition_penalty, config.do_sample) == (None, None, None)  # unset
    assert stop_token_ids(loaded_tokenizer, loaded) == [1, 4]


def test_a_declared_eos_that_is_not_the_tokenizers_comes_after_it(tmp_path):
    tokenizer = chat_tokenizer("llama3")
    end_of_text, eom, eot = declared_eos("llama3", tokenizer)
    model = tiny_chat_model(tokenizer, [eot, eom])  # Llama-3-Instruct style: the tokenizer's EOS not declared
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = pretrained_model_and_tokenizer(str(tmp_path))
    assert loaded.generation_config.eos_token_id == [end_of_text, eot, eom]
