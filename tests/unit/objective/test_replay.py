"""`trainer.objective.replay`: the DPO pair store (reference log-probs scored once) and the feed that fills it."""

import copy
import random

import pytest
import torch

from tests.support.models import (
    ANSWERS,
    QUESTIONS,
    WRONG,
    answer,
    chat,
    replay_buffer,
    run,
)
from trainer.envs import Score
from trainer.envs.addition import AdditionTask as Task
from trainer.objective.losses import ComposerBatch, composer_total_loss, sequence_logps
from trainer.objective.replay import PreferenceFeed, PreferenceReplay
from trainer.rollout.single_turn import sibling_pairs


def test_replay_buffer_scores_each_pair_once_in_batches(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    buffer = replay_buffer(model, tokenizer, batch_size=3)  # 4 pairs: one full batch scored on add
    assert len(buffer) == 4 and buffer.reference_forward_passes == 1
    first = buffer.sample(4, generator=torch.Generator().manual_seed(1))
    assert buffer.reference_forward_passes == 2  # the leftover pair, scored when needed
    for _ in range(3):
        buffer.sample(2)
    prompt = chat(tokenizer, QUESTIONS[0])
    chosen, rejected = answer(tokenizer, ANSWERS[0]), answer(tokenizer, WRONG[0])
    buffer.add(
        "pair-0",
        prompt + chosen,
        [0] * len(prompt) + [1] * len(chosen),
        prompt + rejected,
        [0] * len(prompt) + [1] * len(rejected),
    )
    assert len(buffer) == 4 and buffer.reference_forward_passes == 2  # never per step, never per re-add
    again = buffer.sample(4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.ref_chosen_logps, first.ref_chosen_logps)


def test_replay_buffer_reference_logps_match_an_unpadded_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    buffer = replay_buffer(model, tokenizer)
    pairs = buffer.sample(4, generator=torch.Generator().manual_seed(0))
    for row in range(4):
        for ids, attention, loss_mask, ref in (
            (pairs.chosen_ids, pairs.chosen_attention_mask, pairs.chosen_loss_mask, pairs.ref_chosen_logps),
            (pairs.rejected_ids, pairs.rejected_attention_mask, pairs.rejected_loss_mask, pairs.ref_rejected_logps),
        ):
            length = int(attention[row].sum())
            seq = ids[row : row + 1, :length]
            with torch.no_grad():
                expected = sequence_logps(model(input_ids=seq).logits, seq, loss_mask[row : row + 1, :length])
            assert ref[row].item() == pytest.approx(expected.item(), abs=1e-4)
            assert ref[row].item() < 0


@pytest.mark.parametrize(
    "chosen_mask, message",
    [
        ([1, 1, 1], "not the first token"),
        ([0, 0, 0], "at least one response token"),
        ([0, 2, 1], "must be 0/1"),
        ([0, 1], "has 3 tokens but chosen_loss_mask 2"),
    ],
)
def test_replay_buffer_rejects_bad_pairs(model_and_tokenizer, chosen_mask, message):
    model, tokenizer = model_and_tokenizer
    buffer = PreferenceReplay(model, pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=f"pair 'p1'.*{message}"):
        buffer.add("p1", [5, 6, 7], chosen_mask, [5, 6, 8], [0, 1, 1])


def test_replay_buffer_rejects_a_reused_id_and_oversampling(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    buffer = PreferenceReplay(model, pad_token_id=tokenizer.pad_token_id)
    buffer.add("p1", [5, 6, 7], [0, 1, 1], [5, 6, 8], [0, 1, 1])
    with pytest.raises(ValueError, match="'p1' was already added with different tokens"):
        buffer.add("p1", [5, 6, 9], [0, 1, 1], [5, 6, 8], [0, 1, 1])
    with pytest.raises(ValueError, match="cannot sample 2 pairs .* holding 1"):
        buffer.sample(2)


def test_replay_buffer_state_dict_resumes_without_rescoring(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    buffer = replay_buffer(model, tokenizer, batch_size=3)  # 3 pairs scored, 1 pending
    torch.save(buffer.state_dict(), tmp_path / "replay.pt")
    restored = PreferenceReplay(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id, batch_size=3)
    restored.load_state_dict(torch.load(tmp_path / "replay.pt"))
    assert len(restored) == 4 and restored.reference_forward_passes == 1
    original = buffer.sample(4, generator=torch.Generator().manual_seed(3))
    resumed = restored.sample(4, generator=torch.Generator().manual_seed(3))
    assert restored.reference_forward_passes == buffer.reference_forward_passes == 2  # only the pending pair
    for name in vars(original):
        torch.testing.assert_close(getattr(resumed, name), getattr(original, name), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- PreferenceFeed


class EvenLengthTask(Task):
    """A checker a random model passes about half the time, so groups disagree."""

    def score(self, completion: str) -> Score:
        even = len(completion) % 2 == 0
        return Score(float(even), even, "even length" if even else "odd length")


def test_sibling_pairs_fill_the_replay_buffer(policy):
    """Without traces, the feed adds one (correct, incorrect) pair per disagreeing group of a rollout."""
    model, tokenizer, tasks = policy
    replay = PreferenceReplay(model, pad_token_id=tokenizer.pad_token_id)
    feed = PreferenceFeed(replay, pairs_per_step=4)
    prompts = [
        EvenLengthTask(t.question, t.answer, t.hints) for t in (tasks.sample(random.Random(i)) for i in range(16))
    ]
    samples = run(policy, prompts, group_size=8)
    pref = feed.step(sibling_pairs(samples, id_prefix="t"), rng=random.Random(0))
    batch = ComposerBatch(policy=samples.policy, preference=pref)
    completions = tokenizer.batch_decode(batch.policy.completion_ids, skip_special_tokens=True)
    rewards = torch.tensor([prompts[i // 8].reward(c) for i, c in enumerate(completions)]).view(16, 8)
    mixed_groups = int(((rewards.sum(1) > 0) & (rewards.sum(1) < 8)).sum())
    assert len(replay) == mixed_groups >= 4
    assert pref.chosen_ids.shape[0] == 4  # pairs_per_step
    for chosen, rejected, c_mask, r_mask in zip(
        pref.chosen_ids, pref.rejected_ids, pref.chosen_loss_mask, pref.rejected_loss_mask, strict=True
    ):
        chosen_text = tokenizer.decode(chosen[c_mask.bool()], skip_special_tokens=True)
        rejected_text = tokenizer.decode(rejected[r_mask.bool()], skip_special_tokens=True)
        assert len(chosen_text) % 2 == 0 and len(rejected_text) % 2 == 1
    out = composer_total_loss(model, batch, alpha=0.5, beta=0.1)
    assert torch.isfinite(out.total) and out.dpo.item() > 0


def test_a_full_replay_drops_its_oldest_pairs_unscored_and_counts_them(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    everything = replay_buffer(model, tokenizer, batch_size=3)
    window = replay_buffer(model, tokenizer, batch_size=3, capacity=2)  # pair-0..3 added in order
    assert (len(window), window.evicted, window.reference_forward_passes) == (2, 2, 0)  # never scored
    kept = window.sample(2, generator=torch.Generator().manual_seed(0))
    assert window.reference_forward_passes == 1
    newest = {tuple(everything._pairs[f"pair-{i}"].chosen_ids.tolist()) for i in (2, 3)}
    rows = zip(kept.chosen_ids, kept.chosen_attention_mask, strict=True)
    assert {tuple(row[mask.bool()].tolist()) for row, mask in rows} == newest  # the newest two are kept
    torch.save(window.state_dict(), tmp_path / "replay.pt")
    restored = PreferenceReplay(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id, capacity=2)
    restored.load_state_dict(torch.load(tmp_path / "replay.pt"))
    assert (len(restored), restored.evicted) == (2, 2)
    with pytest.raises(ValueError, match="capacity=0 must be >= 1"):
        PreferenceReplay(model, pad_token_id=tokenizer.pad_token_id, capacity=0)


def test_trace_pairs_that_do_not_fit_the_capacity_are_refused_by_its_key(model_and_tokenizer, tmp_path):
    from tests.support.traces_fixtures import openai_attempt, write_jsonl
    from trainer.objective.replay import CapacityError

    model, tokenizer = model_and_tokenizer
    attempts = [openai_attempt("A", "good patch", True), openai_attempt("A", "bad patch", False)]
    attempts += [openai_attempt("A", "other good patch", True)]  # two (resolved, unresolved) pairs
    write_jsonl(tmp_path / "attempts.jsonl", attempts)
    fits = PreferenceFeed(
        PreferenceReplay(model, pad_token_id=tokenizer.pad_token_id, capacity=2), pairs_per_step=2, traces=tmp_path
    )
    assert fits.fill_from_traces(tokenizer, 512) == 2
    tight = PreferenceFeed(
        PreferenceReplay(model, pad_token_id=tokenizer.pad_token_id, capacity=1), pairs_per_step=2, traces=tmp_path
    )
    with pytest.raises(CapacityError, match=r"loss.dpo_capacity: 1 pairs, but task.traces .* gives 2; raise it"):
        tight.fill_from_traces(tokenizer, 512)
    assert len(tight.replay) == 0
