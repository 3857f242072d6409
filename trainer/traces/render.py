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
    """Full sequences (prompt + response); loss masks are 1 on response tokens, 0 on the prompt."""

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
    """Both sides of a pair over the same prompt ids, ready for `trainer.replay.PreferenceReplay.add`.

    Over `max_length`, the prompt gives way first (its oldest tokens go, but it keeps at least
    half the budget), then the responses are cut at the end.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length={max_length} must leave room for a prompt token and a response token")
    prompt_text = _template(tokenizer, pair.prompt, add_generation_prompt=True)
    prompt_ids = _encode(tokenizer, prompt_text)
    responses = []
    for side, messages in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        full_text = _template(tokenizer, pair.prompt + messages)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                f"pair {pair.id}: the chat template does not render the prompt as a prefix of "
                f"prompt + {side}; the response tokens cannot be told apart"
            )
        response_ids = _encode(tokenizer, full_text[len(prompt_text) :])
        if not response_ids or not prompt_ids:
            raise ValueError(f"pair {pair.id}: the {side} side renders to an empty prompt or response")
        responses.append(response_ids)
    if max_length is not None:
        longest = max(len(r) for r in responses)
        keep = min(len(prompt_ids), max(max_length // 2, max_length - longest))
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
        responses = [r[: max_length - keep] for r in responses]
    chosen, rejected = responses
    prompt_mask = [0] * len(prompt_ids)
    return TokenizedPair(
        pair_id=pair.id,
        chosen_ids=prompt_ids + chosen,
        chosen_loss_mask=prompt_mask + [1] * len(chosen),
        rejected_ids=prompt_ids + rejected,
        rejected_loss_mask=prompt_mask + [1] * len(rejected),
    )
