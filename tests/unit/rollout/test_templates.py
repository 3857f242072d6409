"""trainer.rollout.templates: where each chat family ends a turn (the stop ids every sampler gets),
what is appended after a sampled turn when the template renders the last assistant turn
differently, and which templates are still refused. Tokenizers and templates are built here
(tests/support/chat_templates.py), in the shapes Gemma, Llama-3, ChatML and Qwen3 ship."""

from __future__ import annotations

import json

import pytest
from transformers import GenerationConfig

from tests.support.chat_templates import STYLES, chat_tokenizer, declared_eos, tiny_chat_model
from trainer.rollout.templates import (
    TemplateError,
    appended_text,
    demonstration_ids,
    end_of_turn,
    stop_token_ids,
)


@pytest.fixture(scope="module")
def tokenizers():
    return {style: chat_tokenizer(style) for style in STYLES}


@pytest.mark.parametrize(
    ("style", "end", "stops"),
    [
        # Gemma: the tokenizer's EOS is <eos>, a chat turn ends with <end_of_turn>; the model declares both
        ("gemma", "<end_of_turn>", ["<eos>", "<end_of_turn>"]),
        # Llama-3-Instruct: <|end_of_text|> is EOS, turns end with <|eot_id|>, <|eom_id|> is declared too
        ("llama3", "<|eot_id|>", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
        # a Qwen base checkpoint: EOS <|endoftext|>, ChatML turns end with <|im_end|>, declared: EOS only
        ("chatml", "<|im_end|>", ["<|endoftext|>", "<|im_end|>"]),
        ("qwen3", "<|im_end|>", ["<|im_end|>"]),  # Qwen3's tokenizer EOS already is <|im_end|>
        ("plain", "<|endoftext|>", ["<|endoftext|>"]),  # no special token after a turn: the EOS
    ],
)
def test_the_stop_ids_are_the_tokenizers_eos_the_models_declared_ids_and_the_templates_end_of_turn(
    tokenizers, style, end, stops
):
    tokenizer = tokenizers[style]
    model = tiny_chat_model(tokenizer, declared_eos(style, tokenizer) or None)
    assert end_of_turn(tokenizer) == end
    assert stop_token_ids(tokenizer, model) == tokenizer.convert_tokens_to_ids(stops)
    # the same ids from a GenerationConfig, and from the tokenizer alone (its EOS and its template)
    assert stop_token_ids(tokenizer, model.generation_config) == stop_token_ids(tokenizer, model)
    alone = list(dict.fromkeys([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end)]))
    assert stop_token_ids(tokenizer) == alone


def test_a_declared_id_outside_the_template_still_stops(tokenizers):
    tokenizer = tokenizers["chatml"]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")  # Phi-3 declares its <|assistant|> as EOS
    assert stop_token_ids(tokenizer, GenerationConfig(eos_token_id=im_start)) == [0, im_start, 2]


def test_a_tokenizer_without_a_template_ends_turns_with_its_eos(tokenizers):
    tokenizer = chat_tokenizer("chatml")
    tokenizer.chat_template = None
    assert end_of_turn(tokenizer) == "<|endoftext|>" and stop_token_ids(tokenizer) == [0]


def tool_turn(text: str, name: str = "read_file", **arguments) -> dict:
    call = {"id": "call_0_0", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return {"role": "assistant", "content": text, "tool_calls": [call]}


PROMPT = [{"role": "system", "content": "You edit code."}, {"role": "user", "content": "Fix calc.py."}]
RESULT = {"role": "tool", "tool_call_id": "call_0_0", "content": "def f(x):\n    return x ? 6\n"}
AFTER_QWEN3 = "\n<|im_start|>user\n<tool_response>\n" + RESULT["content"] + "\n</tool_response><|im_end|>\n"


@pytest.mark.parametrize(
    "content",
    ["", "<think>\n\n</think>\n\n", "<think>\nRead calc.py first.\n</think>\n\n"],
    ids=["no reasoning", "empty think", "reasoning"],
)
def test_after_a_qwen3_turn_what_is_appended_is_what_follows_its_end_of_turn(tokenizers, content):
    # Qwen3 renders the LAST assistant turn with a think block and an earlier one without (unless it
    # has reasoning): the renderings before and after differ inside the sampled turn, which is
    # never re-tokenized; what follows its <|im_end|> is well defined.
    tokenizer = tokenizers["qwen3"]
    before = [*PROMPT, tool_turn(content, path="calc.py")]
    assert appended_text(tokenizer, before, [*before, RESULT], generation=False) == AFTER_QWEN3
    with_prompt = appended_text(tokenizer, before, [*before, RESULT], generation=True)
    assert with_prompt == AFTER_QWEN3 + "<|im_start|>assistant\n"


def test_after_a_chatml_turn_the_closing_newline_comes_first(tokenizers):
    tokenizer = tokenizers["chatml"]
    before = [*PROMPT, tool_turn("Reading.", path="calc.py")]
    text = appended_text(tokenizer, before, [*before, RESULT], generation=False)
    assert text == "\n<|im_start|>tool\n" + RESULT["content"] + "<|im_end|>\n"


def test_a_template_that_keeps_reasoning_on_the_last_turn_alone_can_be_appended_to(tokenizers):
    tokenizer = tokenizers["last_reasoning"]
    first = tool_turn("<think>\nLook first.\n</think>\n\n", path="calc.py")
    second = tool_turn("<think>\nNow the test.\n</think>\n\n", path="test_calc.py")
    conversation = [*PROMPT, first, RESULT]
    assert appended_text(tokenizer, [*PROMPT, first], conversation, generation=False) == AFTER_QWEN3
    # the second turn: the first is shown without its reasoning in both renderings, only the
    # sampled (last) turn loses it once a result follows
    result = {**RESULT, "content": "assert f(1) == 7"}
    after = appended_text(tokenizer, [*conversation, second], [*conversation, second, result], generation=False)
    assert after == "\n<|im_start|>user\n<tool_response>\nassert f(1) == 7\n</tool_response><|im_end|>\n"


def test_a_template_that_writes_the_tool_results_inside_the_sampled_turn_is_refused(tokenizers):
    tokenizer = tokenizers["results_inside"]
    before = [*PROMPT, tool_turn("Reading.", path="calc.py")]
    with pytest.raises(TemplateError, match="rewrites the sampled assistant turn"):
        appended_text(tokenizer, before, [*before, RESULT], generation=False)


def test_a_template_that_rewrites_the_turns_before_the_sampled_one_is_refused(tokenizers):
    tokenizer = chat_tokenizer("chatml")
    # shows only the last message's content: the user's prompt disappears once the model answered
    tokenizer.chat_template = (
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{%- if loop.last %}{{ m['content'] }}{%- endif %}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    )
    before = [*PROMPT, tool_turn("Reading.", path="calc.py")]
    with pytest.raises(TemplateError, match="renders earlier turns differently"):
        appended_text(tokenizer, before, [*before, RESULT], generation=False)


def test_a_scripted_qwen3_episode_is_laid_out_as_a_sampled_one(tokenizers):
    # body (mask 1): the turn as the template writes it when last, up to and including <|im_end|>;
    # then (mask 0) what follows that token; nothing after the final turn (an episode ends there)
    tokenizer = tokenizers["qwen3"]
    steps = [tool_turn("", path="calc.py"), RESULT, {"role": "assistant", "content": "Done."}]
    ids, mask = demonstration_ids(tokenizer, PROMPT, steps)
    spans, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            spans.append((mask[start], tokenizer.decode(ids[start:i], skip_special_tokens=False)))
            start = i
    call = '{"name": "read_file", "arguments": {"path": "calc.py"}}'
    assert [learn for learn, _ in spans] == [0, 1, 0, 1]
    assert spans[1][1] == f"<think>\n\n</think>\n\n\n<tool_call>\n{call}\n</tool_call><|im_end|>"
    assert spans[2][1] == AFTER_QWEN3 + "<|im_start|>assistant\n"
    assert spans[3][1] == "<think>\n\n</think>\n\nDone.<|im_end|>"
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
