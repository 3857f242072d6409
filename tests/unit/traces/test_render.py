"""Rendering through a real chat template, and the DPO channel filled from ingested traces end to end."""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.traces_fixtures import forked_session, openai_attempt, write_jsonl
from trainer.model import tiny_model_and_tokenizer
from trainer.objective.losses import dpo_loss, sequence_logps
from trainer.objective.replay import PreferenceReplay
from trainer.traces import (
    Message,
    PreferencePair,
    ToolCall,
    TraceExample,
    TraceIngester,
    mine_pairs,
    render,
    render_pair,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_and_tokenizer(cache_dir=tmp_path_factory.mktemp("tokenizer"))


def conversation():
    return [
        Message("system", "You fix bugs."),
        Message("user", "List the files"),
        Message("assistant", "Looking.", tool_calls=[ToolCall("c1", "bash", {"command": "ls -la"})]),
        Message("tool", "a.py\nb.py", tool_call_id="c1"),
        Message("assistant", "Two files."),
    ]


def test_render_uses_the_chat_template_with_hf_tool_calls(tiny):
    _, tokenizer = tiny
    ids = render(TraceExample("x", "openai", "s", conversation()), tokenizer)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nYou fix bugs.<|im_end|>\n"
        "<|im_start|>user\nList the files<|im_end|>\n"
        "<|im_start|>assistant\nLooking.\n"
        '<tool_call>{"name": "bash", "arguments": {"command": "ls -la"}}</tool_call><|im_end|>\n'
        "<|im_start|>tool\na.py\nb.py<|im_end|>\n"
        "<|im_start|>assistant\nTwo files.<|im_end|>\n"
    )
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5  # specials are single tokens


def make_pair(chosen_text="Two files.", rejected_text="I refuse to look."):
    messages = conversation()
    return PreferencePair(
        id="pair-test",
        prompt=messages[:2],
        chosen=[messages[2], messages[3], Message("assistant", chosen_text)],
        rejected=[Message("assistant", rejected_text)],
        source="fork",
        reason="test",
        chosen_example_id="a",
        rejected_example_id="b",
    )


def trained_text(tokenizer, ids, mask):
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_render_pair_masks_only_what_the_assistant_wrote(tiny):
    _, tokenizer = tiny
    pair = make_pair()
    tokens = render_pair(pair, tokenizer)
    prompt_text = (
        "<|im_start|>system\nYou fix bugs.<|im_end|>\n<|im_start|>user\nList the files<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert tokens.pair_id == "pair-test"
    assert tokens.chosen_ids[:n] == tokens.rejected_ids[:n] == prompt_ids
    assert tokens.chosen_loss_mask[:n] == tokens.rejected_loss_mask[:n] == [0] * n
    # Rejected: the reply through its end-of-turn token; the template's newline after it is not trained.
    assert tokenizer.decode(tokens.rejected_ids[n:]) == "I refuse to look.<|im_end|>\n"
    assert tokens.rejected_loss_mask[n:] == [1] * (len(tokens.rejected_ids) - n - 1) + [0]
    # Chosen: the tool turn, its header and the next assistant header are out of the loss.
    assert tokenizer.decode(tokens.chosen_ids[n:]) == (
        'Looking.\n<tool_call>{"name": "bash", "arguments": {"command": "ls -la"}}</tool_call><|im_end|>\n'
        "<|im_start|>tool\na.py\nb.py<|im_end|>\n<|im_start|>assistant\nTwo files.<|im_end|>\n"
    )
    spans = [
        'Looking.\n<tool_call>{"name": "bash", "arguments": {"command": "ls -la"}}</tool_call><|im_end|>',
        "Two files.<|im_end|>",
    ]
    assert trained_text(tokenizer, tokens.chosen_ids, tokens.chosen_loss_mask) == "".join(spans)
    span_tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in spans)
    assert sum(tokens.chosen_loss_mask) == span_tokens


def test_render_pair_truncates_the_prompt_first(tiny):
    _, tokenizer = tiny
    full = render_pair(make_pair(), tokenizer)
    n = full.chosen_loss_mask.index(1)
    chosen_len, rejected_len = len(full.chosen_ids) - n, len(full.rejected_ids) - n
    # Long responses: the prompt keeps its last half of the budget, the responses get the rest.
    budget = 40
    assert n > budget // 2 and chosen_len > budget and rejected_len < budget // 2
    cut = render_pair(make_pair(), tokenizer, max_length=budget)
    keep = budget // 2
    assert cut.chosen_ids == full.chosen_ids[n - keep : n] + full.chosen_ids[n : n + keep]
    assert cut.rejected_ids == full.rejected_ids[n - keep :]
    assert cut.chosen_loss_mask == [0] * keep + full.chosen_loss_mask[n : n + keep]
    # Room for the whole prompt: only the chosen response is cut.
    budget = n + chosen_len - 4
    cut = render_pair(make_pair(), tokenizer, max_length=budget)
    assert cut.chosen_ids == full.chosen_ids[:-4] and cut.rejected_ids == full.rejected_ids
    with pytest.raises(ValueError, match="max_length=1"):
        render_pair(make_pair(), tokenizer, max_length=1)


def test_replay_buffer_filled_from_ingested_traces(tiny, tmp_path):
    """Acceptance 5: ingest -> mine -> render -> reference log-probs cached once -> finite DPO loss."""
    reference, tokenizer = tiny
    forked_session(tmp_path / "claude", interrupt=True)
    write_jsonl(
        tmp_path / "attempts" / "runs.jsonl",
        [
            openai_attempt("A", "good patch", True),
            openai_attempt("A", "bad patch", False),
            openai_attempt("A", "another good patch", True),
        ],
    )
    pairs = list(mine_pairs(TraceIngester(strict=True).ingest(tmp_path)))
    assert [p.source for p in pairs] == ["outcome", "outcome", "fork"]  # attempts/ is read before claude/

    buffer = PreferenceReplay(reference, pad_token_id=tokenizer.pad_token_id, batch_size=2)
    tokenized = [render_pair(p, tokenizer, max_length=256) for p in pairs]
    for t in tokenized:
        buffer.add(t.pair_id, t.chosen_ids, t.chosen_loss_mask, t.rejected_ids, t.rejected_loss_mask)
    for t in tokenized:  # the same traces mined again: same ids, nothing rescored
        buffer.add(t.pair_id, t.chosen_ids, t.chosen_loss_mask, t.rejected_ids, t.rejected_loss_mask)
    batch = buffer.sample(3, generator=torch.Generator().manual_seed(0))
    assert len(buffer) == 3 and buffer.reference_forward_passes == 2  # ceil(3 pairs / batch of 2)
    buffer.sample(3)
    assert buffer.reference_forward_passes == 2  # cached: sampling again costs no reference forward

    def policy_logps(model):
        with torch.no_grad():
            chosen = model(input_ids=batch.chosen_ids, attention_mask=batch.chosen_attention_mask).logits
            rejected = model(input_ids=batch.rejected_ids, attention_mask=batch.rejected_attention_mask).logits
        return (
            sequence_logps(chosen, batch.chosen_ids, batch.chosen_loss_mask),
            sequence_logps(rejected, batch.rejected_ids, batch.rejected_loss_mask),
        )

    # Policy == reference: every log-ratio is 0, so each loss is exactly -log sigmoid(0) = log 2.
    losses, _, _ = dpo_loss(*policy_logps(reference), batch.ref_chosen_logps, batch.ref_rejected_logps)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)), atol=1e-5)
    policy, _ = tiny_model_and_tokenizer(seed=1, cache_dir=tmp_path / "tokenizer")
    losses, _, _ = dpo_loss(*policy_logps(policy), batch.ref_chosen_logps, batch.ref_rejected_logps)
    assert torch.isfinite(losses).all() and not torch.allclose(losses, torch.full((3,), math.log(2.0)), atol=1e-3)


def test_every_pair_kind_trains_only_assistant_written_text(tiny, tmp_path):
    """Acceptance 4: fork, outcome and self-correction pairs; masked tokens never hold a header or a tool result."""
    _, tokenizer = tiny
    forked_session(tmp_path / "claude", refuse=True, interrupt=True)
    write_jsonl(
        tmp_path / "attempts" / "runs.jsonl",
        [openai_attempt("A", "good patch", True), openai_attempt("A", "bad", False)],
    )
    corrected = {
        "messages": [
            {"role": "user", "content": "Fix the test"},
            {"role": "assistant", "content": "Editing.", "tool_calls": [_call("c1", '{"line": 3}')]},
            {"role": "tool", "tool_call_id": "c1", "content": "SYNTAX ERROR at line 3", "is_error": True},
            {"role": "assistant", "content": "Fixed the indent.", "tool_calls": [_call("c2", '{"line": 4}')]},
            {"role": "tool", "tool_call_id": "c2", "content": "EDIT APPLIED"},
        ]
    }
    write_jsonl(tmp_path / "fix" / "run.jsonl", [corrected])
    pairs = list(mine_pairs(TraceIngester(strict=True).ingest(tmp_path)))
    assert sorted(p.source for p in pairs) == ["fork", "outcome", "self_correction"]
    for pair in pairs:
        tokens = render_pair(pair, tokenizer)
        for side, ids, mask in (
            (pair.chosen, tokens.chosen_ids, tokens.chosen_loss_mask),
            (pair.rejected, tokens.rejected_ids, tokens.rejected_loss_mask),
        ):
            trained = trained_text(tokenizer, ids, mask)
            assert "<|im_start|>" not in trained and "<tool_response>" not in trained
            for message in side:
                if message.role == "assistant":
                    assert message.content in trained
                elif message.content:
                    assert message.content not in trained, (pair.source, message.content)


def _call(call_id, arguments):
    return {"id": call_id, "type": "function", "function": {"name": "edit", "arguments": arguments}}
