"""The policy: a Hugging Face causal LM and its tokenizer.

Real runs load any model by hub name (`Qwen/Qwen2.5-0.5B-Instruct`) or local directory. Tests, benchmarks and the
smoke run cannot download anything, so they build a tiny Qwen2 with random weights and a
byte-level BPE tokenizer trained on the spot; both carry a ChatML chat template with Hugging
Face's tool-call convention, so rendering code is the same for tiny and real models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"

# ChatML as Qwen uses it, with tool calls rendered as <tool_call>{json}</tool_call> lines.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message.get('tool_calls') %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call.get('function') else call %}"
    "{{- '\n<tool_call>' }}{{- {'name': fn['name'], 'arguments': fn['arguments']} | tojson }}"
    "{{- '</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Enough text that every character class the tasks and traces use gets merges of its own.
DEFAULT_CORPUS = (
    "What is 12 + 7? Answer: 19",
    "Hint: add the ones first, then the tens.",
    "The quick brown fox jumps over the lazy dog. def main(): return 0",
    '<tool_call>{"name": "bash", "arguments": {"command": "ls -la"}}</tool_call>',
    "system user assistant tool error fixed tests passed failed",
)


def train_tokenizer(corpus: Iterable[str], *, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) with one token per digit, so arithmetic stays learnable."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # prompts are left-padded for generation
    return fast


def _tokenizer_cache_key(corpus: list[str], vocab_size: int) -> str:
    digest = hashlib.sha256(json.dumps([vocab_size, CHAT_TEMPLATE, corpus]).encode()).hexdigest()
    return digest[:16]


def cached_tokenizer(
    corpus: Iterable[str], *, vocab_size: int, cache_dir: str | Path | None
) -> PreTrainedTokenizerFast:
    """Train once per (corpus, vocab size) and reuse the `save_pretrained` copy afterwards."""
    corpus = list(corpus)
    if cache_dir is None:
        return train_tokenizer(corpus, vocab_size=vocab_size)
    path = Path(cache_dir) / f"tokenizer-{_tokenizer_cache_key(corpus, vocab_size)}"
    if (path / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        return tokenizer
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)  # atomic: a concurrent rank either sees the whole folder or none
    except OSError:
        pass  # another process won the race; its copy is identical
    return tokenizer


def tiny_config(
    tokenizer: PreTrainedTokenizerFast | None, *, hidden_size: int, num_layers: int, num_heads: int, vocab_size: int = 0
) -> Qwen2Config:
    """The tiny model's shape: a Qwen2 with tied embeddings over `tokenizer`'s vocabulary (or
    `vocab_size` ids when no tokenizer is at hand, as for a memory plan)."""
    return Qwen2Config(
        vocab_size=len(tokenizer) if tokenizer is not None else vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else 2,
        bos_token_id=None,
    )


def tiny_model_and_tokenizer(
    corpus: Iterable[str] | None = None,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised Qwen2 and a tokenizer trained on `corpus`, built fully offline."""
    tokenizer = cached_tokenizer(
        corpus if corpus is not None else DEFAULT_CORPUS, vocab_size=vocab_size, cache_dir=cache_dir
    )
    config = tiny_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    _own_generation_config(model, tokenizer)
    return model, tokenizer


def pretrained_model_and_tokenizer(
    name: str, *, tokenizer_name: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Any hub model by name, or a local directory in Hugging Face format, with fp32 weights.

    The weights are loaded in float32 whatever the checkpoint's dtype: they are the master
    weights the optimizer updates (a bf16 run computes under autocast; see `trainer.precision`).
    The tokenizer is left-padded for generation. The model's own `generation_config.json` is set
    aside (`_own_generation_config`): the run's config says how to sample.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    _own_generation_config(model, tokenizer)
    return model, tokenizer


def _own_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> dict[str, object]:
    """Replace the model's generation defaults by token ids alone; returns the sampling settings dropped.

    A hub `generation_config.json` often sets a repetition penalty, top-k or top-p that `generate`
    would apply on top of the run's temperature, so the policy that samples would not be the one
    the loss trains. `trainer.rollout.sampling.generation_config` names every setting explicitly instead.
    The declared EOS ids are kept, as a list with the tokenizer's EOS first: chat models end their
    turn with an id that is often not the tokenizer's EOS (Gemma declares `[1, 106]`, 106 being
    `<end_of_turn>`; huggingface/lighteval#1278), and `trainer.rollout.templates.stop_token_ids`
    reads them from here.
    """
    kept = ("pad_token_id", "eos_token_id", "bos_token_id", "transformers_version", "_from_model_config")
    declared = model.generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    eos = list(dict.fromkeys(i for i in (tokenizer.eos_token_id, *declared) if i is not None))
    dropped = {key: value for key, value in model.generation_config.to_diff_dict().items() if key not in kept}
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos or None,
        bos_token_id=tokenizer.bos_token_id,
    )
    return dropped


def save_tiny_hub_model(directory: str | Path, *, seed: int = 0, **generation: object) -> Path:
    """A tiny random Qwen2 saved in Hugging Face format: weights, tokenizer, generation_config.json.

    The offline stand-in for a hub model (load it with `model.name: <directory>`); `generation`
    settings (e.g. `repetition_penalty=1.3, top_k=5`) are written to its generation_config.json, as
    real hub models ship them. Returns the directory.
    """
    directory = Path(directory)
    model, tokenizer = tiny_model_and_tokenizer(seed=seed)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=True, **generation
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.model save-tiny DIR`: write the offline stand-in for a hub model."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.model")
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save-tiny", help="save a tiny random Qwen2 in Hugging Face format")
    save.add_argument("directory", type=Path)
    save.add_argument("--seed", type=int, default=0)
    save.add_argument(
        "--leaky",
        action="store_true",
        help="ship a generation_config.json with repetition_penalty 1.3 and top_k 5, as some hub models do",
    )
    args = parser.parse_args(argv)
    generation = dict(repetition_penalty=1.3, top_k=5) if args.leaky else {}
    print(save_tiny_hub_model(args.directory, seed=args.seed, **generation))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
