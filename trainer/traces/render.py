"""Examples and pairs -> token ids through the tokenizer's own chat template.

Messages are handed over in Hugging Face's tool-call convention (assistant `tool_calls` of
`{"type": "function", "function": {"name", "arguments": dict}}`, results as role "tool"), so
any model's template renders them the way that model was trained to read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .mining import PreferencePair
from .schema import Message, TraceExample


@dataclass
class TokenizedPair:
    """Full sequences (prompt + response) as token ids; loss masks (0/1, same length) are 1 only on
    assistant-written tokens of the response, 0 on the prompt, tool results and template tokens."""

    pair_id: str
    chosen_ids: list[int]
    chosen_loss_mask: list[int]
    rejected_ids: list[int]
    rejected_loss_mask: list[int]


def hf_messages(messages: list[Message]) -> list[dict[str, Any]]:
    converted = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [
                {"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                for c in message.tool_calls
            ]
        if message.role == "tool":
            item["tool_call_id"] = message.tool_call_id
        if message.reasoning:
            item["reasoning_content"] = message.reasoning
        converted.append(item)
    return converted


def _template(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        hf_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The template already placed every special token it wants; adding more would double BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(example: TraceExample, tokenizer: Any) -> list[int]:
    """The whole conversation as the model's input ids."""
    return _encode(tokenizer, _template(tokenizer, example.messages))


def render_pair(pair: PreferencePair, tokenizer: Any, *, max_length: int | None = None) -> TokenizedPair:
    """Both sides of a pair over the same prompt ids, ready for `PreferenceReplay.add` (trainer.objective.replay).

    Loss masks are 1 only on what the model wrote: each assistant message's tokens after its
    generation header, through its end-of-turn token (what a sampler would have produced); the
    prompt, tool results, environment notices and the template's own tokens (role headers, the
    newline after an end-of-turn token) are 0 — the rule rollouts follow for agent episodes.
    Each side is rendered message by message through the chat template; a template that does
    not render a conversation as a prefix of its continuation raises ValueError naming the pair.

    Over `max_length`, the prompt gives way first (its oldest tokens go, but it keeps at least
    half the budget), then the responses are cut at the end.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length={max_length} must leave room for a prompt token and a response token")
    prompt_text = _template(tokenizer, pair.prompt, add_generation_prompt=True)
    prompt_ids = _encode(tokenizer, prompt_text)
    responses = []
    for side, messages in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids, mask = _response(tokenizer, pair, side, prompt_text, messages)
        if not prompt_ids or not any(mask):
            raise ValueError(f"pair {pair.id}: the {side} side renders to an empty prompt or no assistant tokens")
        responses.append((ids, mask))
    if max_length is not None:
        longest = max(len(ids) for ids, _ in responses)
        keep = min(len(prompt_ids), max(max_length // 2, max_length - longest))
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
        responses = [(ids[: max_length - keep], mask[: max_length - keep]) for ids, mask in responses]
    (chosen, chosen_mask), (rejected, rejected_mask) = responses
    prompt_mask = [0] * len(prompt_ids)
    return TokenizedPair(
        pair_id=pair.id,
        chosen_ids=prompt_ids + chosen,
        chosen_loss_mask=prompt_mask + chosen_mask,
        rejected_ids=prompt_ids + rejected,
        rejected_loss_mask=prompt_mask + rejected_mask,
    )


def _response(
    tokenizer: Any, pair: PreferencePair, side: str, prompt_text: str, messages: list[Message]
) -> tuple[list[int], list[int]]:
    """One side's response ids after the prompt, and its mask: 1 on assistant-written spans only."""
    segments: list[tuple[str, int]] = []  # (text, 1 if the model wrote it)
    done = prompt_text
    for k, message in enumerate(messages):
        context = pair.prompt + messages[:k]
        if message.role == "assistant":
            header = _template(tokenizer, context, add_generation_prompt=True) if k else prompt_text
            segments.append((_continuation(pair, side, done, header), 0))
            done = header
        full = _template(tokenizer, context + [message])
        text = _continuation(pair, side, done, full)
        if message.role == "assistant":
            written = text.rstrip()  # the model stops at its end-of-turn token; what follows is template
            segments += [(written, 1), (text[len(written) :], 0)]
        else:
            segments.append((text, 0))
        done = full
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in segments:
        if text:
            encoded = _encode(tokenizer, text)
            ids += encoded
            mask += [trained] * len(encoded)
    return ids, mask


def _continuation(pair: PreferencePair, side: str, done: str, text: str) -> str:
    if not text.startswith(done):
        raise ValueError(
            f"pair {pair.id}: the chat template does not render the {side} side's conversation as a prefix "
            "of its continuation; the assistant's tokens cannot be told apart"
        )
    return text[len(done) :]
