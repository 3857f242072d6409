"""Chat templates as token ids: what the model reads, rendered once and never re-tokenized.

Single-turn prompts are the template's rendering of one user message up to the generation prompt
(`chat_prompt_ids`; the teacher's hinted variant, `hinted_prompt_ids`). Episodes grow by appending:
the most-reported correctness bug of public agent-RL frameworks is multi-turn tokenization
(rendering the conversation again and tokenizing it does not give back the ids the model sampled:
templates rewrite earlier turns, BPE merges differ at boundaries, tool-call JSON is re-serialised).
So what an episode appends after a turn is only the text the template adds (`appended_text`, the
difference between two renderings); after a sampled assistant turn, it is what the template writes
after that turn's end-of-turn token, as TRL's `_get_tool_suffix_ids` takes it, because templates
render the last assistant turn differently from earlier ones (Qwen3's empty `<think></think>` on
the last turn only, templates that keep reasoning on the last turn alone) and the episode never
re-tokenizes that turn. A template that rewrites earlier turns, or rewrites the sampled turn beyond
leaving text out of it, raises `TemplateError`.

A turn ends on any of `stop_token_ids`: the tokenizer's EOS, the ids the model's
generation_config.json declares, and the template's own end-of-turn token (`end_of_turn`: Gemma's
`<end_of_turn>`, Llama-3's `<|eot_id|>`, ChatML's `<|im_end|>`), which is often not the
tokenizer's EOS (huggingface/lighteval#1278, vllm-project/vllm#1136). The list is computed once per
run and handed to whatever samples. Conversations render with the workspace tools' schemas
(`trainer.envs.workspace.TOOL_SPECS`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jinja2
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from trainer.envs import Task
from trainer.envs.workspace import TOOL_SPECS


class TemplateError(ValueError):
    """The chat template rewrites earlier turns: observations cannot be appended as ids."""


_PROBE = "PROBE"  # the assistant's content when asking a template where its turn ends


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token the chat template writes right after an assistant message's content.

    Found by rendering a probe conversation (a user message, then an assistant message): the first
    token after the assistant's content when it is one of the tokenizer's added tokens (ChatML's
    `<|im_end|>`, Llama-3's `<|eot_id|>`, Gemma's `<end_of_turn>`, Phi-3's `<|end|>`, Mistral's
    `</s>`); the tokenizer's EOS token when the template writes none there or cannot render the probe.

    Raises:
        ValueError: the template ends no turn with a token and the tokenizer has no EOS token.
    """
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    except (ValueError, TypeError, LookupError, jinja2.TemplateError):  # no template, or one wanting another shape
        rendered = ""
    if _PROBE in rendered:
        tail = rendered[rendered.rindex(_PROBE) + len(_PROBE) :].lstrip()
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        if ids and ids[0] in tokenizer.added_tokens_decoder:
            return tokenizer.convert_ids_to_tokens(ids[0])
    if tokenizer.eos_token is None:
        raise ValueError("the chat template ends assistant turns with no token and the tokenizer has no EOS token")
    return tokenizer.eos_token


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of `end_of_turn(tokenizer)`: what a demonstration ends with, as a sampled turn does."""
    return tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))


def stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, model_or_generation_config: PreTrainedModel | GenerationConfig | None = None
) -> list[int]:
    """Every id that ends an assistant turn: sampling stops on any of them, and the completion mask
    ends at the first (inclusive).

    The union, in this order, duplicates dropped: the tokenizer's EOS, the model's declared
    `generation_config.eos_token_id` (an int or a list: Gemma declares `[1, 106]`, Llama-3-Instruct
    `[128001, 128008, 128009]`), and the chat template's end-of-turn token (`end_of_turn`).
    `model_or_generation_config`: a model (its `generation_config` is read), a GenerationConfig,
    or None (the tokenizer and its template alone). Computed once per run (`trainer.run.build`)
    and passed to every sampler (`sample(..., stop_token_ids=...)`, episodes, evaluation).

    Raises:
        ValueError: no id at all (no EOS, no declared id, no end-of-turn token).
    """
    config = getattr(model_or_generation_config, "generation_config", model_or_generation_config)
    declared = getattr(config, "eos_token_id", None) if config is not None else None
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    ids = [tokenizer.eos_token_id, *declared]
    try:
        ids.append(end_of_turn_id(tokenizer))
    except ValueError:
        pass  # no template token and no EOS: the declared ids alone
    stops = list(dict.fromkeys(int(i) for i in ids if i is not None))
    if not stops:
        raise ValueError("no id ends a turn: the tokenizer has no EOS, the model declares none, the template ends none")
    return stops


def resolve_stop_ids(tokenizer: PreTrainedTokenizerBase, model: Any, stop_ids: Sequence[int] | None) -> list[int]:
    """`stop_ids` as given, or (None) `stop_token_ids(tokenizer, model)`: a library caller that
    passes none still stops where the model's turn ends."""
    return list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, user_messages: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each message as a one-turn chat that ends where the assistant starts."""
    rendered = []
    for text in user_messages:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
        if len(ids) > max_length:
            raise ValueError(
                f"prompt of {len(ids)} tokens exceeds rollout.max_prompt_length={max_length}: {text[:80]!r}"
            )
        rendered.append(list(ids))
    return rendered


def hinted_prompt_ids(tokenizer: PreTrainedTokenizerBase, task: Task, hint: str | None, max_length: int) -> list[int]:
    """The teacher's prompt (the task with `hint`; None: the plain prompt), the hint shortened from
    the front until it fits.

    Environment feedback (a traceback, a long failing assertion) can outgrow
    `rollout.max_prompt_length`; its end says the most (the exception comes last), so the start goes.

    Raises:
        ValueError: the task's prompt does not fit even with an empty hint.
    """
    if hint is None:
        return chat_prompt_ids(tokenizer, [task.prompt()], max_length)[0]
    keep = len(hint)
    while True:
        text = hint if keep >= len(hint) else "..." + hint[len(hint) - keep :]
        ids = chat_prompt_ids(tokenizer, [task.prompt(text)], max_length=10**9)[0]
        if len(ids) <= max_length:
            return ids
        if keep == 0:
            chat_prompt_ids(tokenizer, [task.prompt()], max_length)  # raises, naming the limit
            return ids
        keep //= 2


def render_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of template text (special tokens as written in it; no BOS/EOS added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, generation: bool) -> str:
    return tokenizer.apply_chat_template(
        [_template_message(m) for m in messages],
        tools=TOOL_SPECS,
        add_generation_prompt=generation,
        tokenize=False,
    )


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """Templates want tool-call arguments as a dict (OpenAI messages carry a JSON string)."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call["function"])
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            arguments = {"raw": function["arguments"]}
        function["arguments"] = arguments if isinstance(arguments, dict) else {"raw": arguments}
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


def appended_text(
    tokenizer: PreTrainedTokenizerBase,
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    *,
    generation: bool,
) -> str:
    """The text fed after `before`'s ids when the conversation becomes `after` (`generation`: the
    next generation prompt included).

    When `before` ends with an assistant message (a sampled turn, whose ids end at its end-of-turn
    token), it is what the rendering of `after` writes after that turn's end-of-turn token
    (`end_of_turn`), the closing newline included: the turn itself may render differently once
    it is no longer the last (Qwen3's `loop.last` empty `<think></think>`, reasoning kept on the
    last turn only), since its sampled ids are never re-tokenized. Otherwise the rendering of
    `before` must be a prefix of that of `after`, and the rest is returned.

    Raises:
        TemplateError: the template renders the turns before `before`'s last message differently
            once messages follow; or it rewrites the sampled assistant turn beyond leaving text out
            of it (e.g. writes the tool results inside it); or it closes no assistant turn with
            its end-of-turn token.
    """
    old = render(tokenizer, before, generation=False)
    new = render(tokenizer, after, generation=generation)
    if not before or before[-1].get("role") != "assistant":
        if not new.startswith(old):
            raise TemplateError(
                "the chat template renders earlier turns differently once a message is appended; "
                "episodes need a template that only appends"
            )
        return new[len(old) :]
    earlier = render(tokenizer, before[:-1], generation=False)
    if not (old.startswith(earlier) and new.startswith(earlier)):
        raise TemplateError(
            "the chat template renders earlier turns differently once a message is appended; "
            "episodes need a template that only appends"
        )
    eot = end_of_turn(tokenizer)
    old_turn = old[len(earlier) :]
    if eot not in old_turn:
        raise TemplateError(f"the chat template closes no assistant turn with its end-of-turn token {eot!r}")
    old_turn = old_turn[: old_turn.rindex(eot)]
    close = len(earlier)
    for _ in range(old_turn.count(eot) + 1):  # the turn's own text may spell the token out
        close = new.find(eot, close) + len(eot)
        if close < len(eot):
            raise TemplateError(f"the chat template closes no assistant turn with its end-of-turn token {eot!r}")
    new_turn = new[len(earlier) : close - len(eot)]
    if not _leaves_text_out(old_turn, new_turn):
        raise TemplateError(
            "the chat template rewrites the sampled assistant turn once messages follow it (beyond leaving "
            "text out of it, as templates do with reasoning); its ids cannot be kept"
        )
    return new[close:]


def _leaves_text_out(full: str, shown: str) -> bool:
    """Whether `shown` is `full` with one contiguous span (possibly empty) taken out."""
    head = 0
    while head < len(shown) and head < len(full) and shown[head] == full[head]:
        head += 1
    return len(shown) <= len(full) and full.endswith(shown[head:])


def demonstration_ids(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[dict[str, Any]], steps: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a scripted episode laid out as `run_episode` lays out a sampled one: the
    prompt and each generation prompt, then each assistant message's body and end-of-turn token
    (mask 1), then what the template writes after that token with the messages that follow
    (consecutive non-assistant messages together, as an episode appends a turn's tool results)
    (mask 0).

    Raises:
        TemplateError: as `appended_text`, or an assistant turn that does not start with the
            generation prompt or has no end-of-turn token.
    """
    messages = list(prompt_messages)
    ids = render_ids(tokenizer, render(tokenizer, messages, generation=False))
    mask = [0] * len(ids)
    eot = end_of_turn(tokenizer)
    at = 0
    while at < len(steps):
        if steps[at]["role"] == "assistant":
            message, at = steps[at], at + 1
            header = appended_text(tokenizer, messages, messages, generation=True)
            turn = appended_text(tokenizer, messages, [*messages, message], generation=False)
            if not turn.startswith(header) or eot not in turn[len(header) :]:
                raise TemplateError("the chat template's assistant turn does not start with its generation prompt")
            pieces = [(header, 0), (turn[len(header) : turn.rindex(eot) + len(eot)], 1)]
            following = [message]
        else:
            end = next((i for i in range(at, len(steps)) if steps[i]["role"] == "assistant"), len(steps))
            following, at = steps[at:end], end
            pieces = [(appended_text(tokenizer, messages, [*messages, *following], generation=False), 0)]
        for text, learn in pieces:
            piece = render_ids(tokenizer, text)
            ids += piece
            mask += [learn] * len(piece)
        messages += following
    return ids, mask
