"""Chat templates as token ids: what the model reads, rendered once and never re-tokenized.

Single-turn prompts are the template's rendering of one user message up to the generation prompt
(`chat_prompt_ids`; the teacher's hinted variant, `hinted_prompt_ids`). Episodes grow by appending:
the most-reported correctness bug of public agent-RL frameworks is multi-turn tokenization
(rendering the conversation again and tokenizing it does not give back the ids the model sampled:
templates rewrite earlier turns, BPE merges differ at boundaries, tool-call JSON is re-serialised).
So what an episode appends after a turn is only the text the template adds (`appended_text`, the
difference between two renderings); a template that rewrites earlier turns raises `TemplateError`.
Conversations render with the workspace tools' schemas (`trainer.envs.workspace.TOOL_SPECS`).
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from trainer.envs import Task
from trainer.envs.workspace import TOOL_SPECS


class TemplateError(ValueError):
    """The chat template rewrites earlier turns: observations cannot be appended as ids."""


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
    """What the template adds when `before` (already rendered) becomes `after`.

    Raises TemplateError when the rendering of `before` is not a prefix of the rendering of
    `after` (the template rewrites earlier turns, e.g. drops a past turn's reasoning).
    """
    old = render(tokenizer, before, generation=False)
    new = render(tokenizer, after, generation=generation)
    if not new.startswith(old):
        raise TemplateError(
            "the chat template renders earlier turns differently once a message is appended; "
            "episodes need a template that only appends"
        )
    return new[len(old) :]


def turn_closing(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> str:
    """Template text after the assistant's end-of-turn token (e.g. ChatML's newline after <|im_end|>)."""
    rendered = render(tokenizer, messages, generation=False)
    eos = tokenizer.eos_token
    return rendered[rendered.rindex(eos) + len(eos) :] if eos and eos in rendered else ""


def demonstration_ids(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[dict[str, Any]], steps: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a scripted episode laid out as `run_episode` lays out a sampled one: the
    prompt and each generation prompt, then each assistant message's body and end-of-turn token
    (mask 1), then the closing template text and the observations (mask 0)."""
    messages = list(prompt_messages)
    ids = render_ids(tokenizer, render(tokenizer, messages, generation=False))
    mask = [0] * len(ids)
    for message in steps:
        if message["role"] == "assistant":
            header = appended_text(tokenizer, messages, messages, generation=True)
            turn = appended_text(tokenizer, messages, [*messages, message], generation=False)
            if not turn.startswith(header) or tokenizer.eos_token not in turn:
                raise TemplateError("the chat template's assistant turn does not start with its generation prompt")
            body = turn[len(header) : turn.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]
            closing = turn[len(header) + len(body) :]
            pieces = [(header, 0), (body, 1), (closing, 0)]
        else:
            pieces = [(appended_text(tokenizer, messages, [*messages, message], generation=False), 0)]
        for text, learn in pieces:
            piece = render_ids(tokenizer, text)
            ids += piece
            mask += [learn] * len(piece)
        messages.append(message)
    return ids, mask
