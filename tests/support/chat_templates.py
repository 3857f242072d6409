"""Chat tokenizers in the shapes real models ship, built offline, and a tiny model made to write
given ids: where each family ends a turn and how it renders the last assistant turn.

The templates are written in the spirit of the real ones (Gemma's `<end_of_turn>` with `<eos>` as
the tokenizer's EOS, Llama-3's `<|eot_id|>` with `<|end_of_text|>`, ChatML with `<|endoftext|>` as
EOS as Qwen base checkpoints ship it, Qwen3's empty `<think></think>` on the last assistant turn
only), reduced to what the tests need; each renders tool calls and tool results the way the
project's episodes read and write them.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from trainer.model import DEFAULT_CORPUS

_CALLS = (
    "{%- for call in message.tool_calls or [] %}"
    "{{- '<tool_call>' }}{{- {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}"
    "{{- '</tool_call>' }}"
    "{%- endfor %}"
)

GEMMA = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{{- '<start_of_turn>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><end_of_turn>\\n' }}"
    "{%- else %}"
    "{{- '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\\n' }}"
    "{{- message.content or '' }}" + _CALLS + "{{- '<end_of_turn>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + (message.content or '') }}"
    + _CALLS
    + "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}" + _CALLS + "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3's assistant branch (huggingface/trl#6124): the LAST assistant message always gets a think
# block (empty when it has no reasoning); an earlier one only when it has reasoning.
QWEN3 = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content or '' %}"
    "{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.last or reasoning %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{{- '\\n<tool_call>\\n' }}{{- {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}"
    "{{- '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Reasoning kept on the last assistant turn alone (earlier turns are shown without their <think>).
LAST_REASONING = QWEN3.replace("{%- if loop.last or reasoning %}", "{%- if loop.last %}")

# Not appendable: the tool results are written INSIDE the assistant turn that called the tools.
RESULTS_INSIDE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}" + _CALLS + ""
    "{%- for later in messages[loop.index0 + 1:] %}{%- if later.role == 'tool' %}"
    "{{- '\\n<result>' + later.content + '</result>' }}{%- endif %}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role != 'tool' %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PLAIN = (
    "{%- for message in messages %}{{- message.role + ': ' + (message.content or '') + '\\n\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
)

# (template, special tokens, eos, bos, the tokens the model's generation_config.json declares as EOS)
STYLES = {
    "gemma": (
        GEMMA,
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<eos>",
        "<bos>",
        ["<eos>", "<end_of_turn>"],
    ),
    "llama3": (
        LLAMA3,
        [
            "<|finetune_right_pad_id|>",
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
        ],
        "<|end_of_text|>",
        "<|begin_of_text|>",
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    ),
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", None, ["<|endoftext|>"]),
    "qwen3": (QWEN3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None, ["<|im_end|>"]),
    "last_reasoning": (LAST_REASONING, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None, []),
    "results_inside": (RESULTS_INSIDE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None, []),
    "plain": (PLAIN, ["<|endoftext|>"], "<|endoftext|>", None, []),
}


def chat_tokenizer(style: str, corpus: tuple[str, ...] = DEFAULT_CORPUS) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (one token per digit) with `style`'s special tokens and template."""
    template, specials, eos, bos, _ = STYLES[style]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=specials[0],
        eos_token=eos,
        bos_token=bos,
        additional_special_tokens=[s for s in specials if s not in (specials[0], eos, bos)],
    )
    fast.chat_template = template
    fast.padding_side = "left"
    return fast


def declared_eos(style: str, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The ids `style`'s generation_config.json lists as EOS."""
    return tokenizer.convert_tokens_to_ids(STYLES[style][4])


def tiny_chat_model(
    tokenizer: PreTrainedTokenizerFast, eos_token_id: int | list[int] | None = None
) -> Qwen2ForCausalLM:
    """A random 1-layer Qwen2 over `tokenizer`'s vocabulary whose generation_config declares
    `eos_token_id` (default: the tokenizer's EOS)."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    return model


class Forced:
    """Makes `model` write given ids through the real `generate`: on its i-th generate call, row b
    writes `calls[i][b]` (then repeats its last id); records the ids each call was given and counts
    the forwards (one per token `generate` draws). A real forward hook on the model, no mock."""

    def __init__(self, model: Qwen2ForCausalLM, calls: list[list[list[int]]]) -> None:
        self.calls, self.inputs, self.rows, self.step = [list(c) for c in calls], [], [], 0
        self.forwards = 0
        model.register_forward_hook(self._force, with_kwargs=True)

    def _force(self, module, args, kwargs, output):
        self.forwards += 1
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids.shape[1] > 1:  # the first forward of a generate call sees the whole prompt
            self.inputs.append(input_ids.tolist())
            self.rows, self.step = self.calls.pop(0), 0
        else:
            self.step += 1
        logits = torch.full_like(output.logits[:, -1], -1e9)
        for row, ids in enumerate(self.rows):
            logits[row, ids[min(self.step, len(ids) - 1)]] = 0.0
        output.logits = output.logits.clone()
        output.logits[:, -1] = logits
        return output
