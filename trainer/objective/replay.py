"""The DPO channel's data: a store of preference pairs and the one place that decides what fills it.

Pairs are scored once by the frozen *reference* policy (DPO's pi_ref, Rafailov et al. 2023,
arXiv 2305.18290) and the two summed log-probs cached with them, so a pair drawn a hundred times
costs one reference forward. The reference is not the SDPO teacher: that one (the policy with a hint
in its context, or `trainer.objective.teacher.EMATeacher`) re-scores each step's fresh samples and is never
cached.

Where pairs come from is decided here, in `PreferenceFeed`: from agent traces when the run names
them (`task.traces`), else from what each step's rollout offers (sibling disagreement inside a
rollout group, `trainer.rollout.single_turn.sibling_pairs`; passed vs failed episodes,
`trainer.rollout.episode_batch.episode_pairs`). Rollout only samples; the run only asks the feed for
this step's pairs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from trainer.objective.batching import pad_sequences
from trainer.objective.losses import PreferenceBatch, sequence_logps

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PreferenceReplay", "PreferenceFeed", "CapacityError"]


class CapacityError(ValueError):
    """Mined trace pairs that do not fit the store; the message names `loss.dpo_capacity`."""


@dataclass
class _StoredPair:
    chosen_ids: Tensor
    chosen_loss_mask: Tensor
    rejected_ids: Tensor
    rejected_loss_mask: Tensor
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None

    def same_tokens(self, other: _StoredPair) -> bool:
        return all(
            torch.equal(a, b)
            for a, b in (
                (self.chosen_ids, other.chosen_ids),
                (self.chosen_loss_mask, other.chosen_loss_mask),
                (self.rejected_ids, other.rejected_ids),
                (self.rejected_loss_mask, other.rejected_loss_mask),
            )
        )


def _as_sequence(name: str, pair_id: str, values: Any) -> Tensor:
    tensor = torch.as_tensor(values, dtype=torch.long).detach().cpu()
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(f"pair {pair_id!r}: {name} must be a non-empty 1-D sequence, got shape {tuple(tensor.shape)}")
    return tensor


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval (no dropout) for the duration, then the caller's mode back: the reference may be shared."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class PreferenceReplay:
    """DPO pairs keyed by a stable id, with reference log-probs scored once by a frozen model.

    Args:
        reference_model: the frozen DPO reference (pi_ref), a causal LM called as
            `model(input_ids=, attention_mask=, use_cache=False).logits`.
        pad_token_id: pad id for the padded batches.
        device: where `sample` puts its tensors (the policy's device).
        batch_size: pairs per reference forward (each forward scores chosen and rejected together).

    Raises:
        ValueError: `batch_size` < 1.

    With `capacity`, the store keeps the newest `capacity` pairs: adding one more drops the oldest
    (counted in `evicted`), so a long run's rollout pairs stay a sliding window of recent policies
    and memory and checkpoints stay bounded.

    Scoring is batched and lazy: pending pairs are scored when `batch_size` of them wait or when
    `sample` needs them. Re-adding an id with the same tokens is a no-op (never rescored); with other
    tokens it is an error. `reference_forward_passes` counts reference forwards, so callers can check
    the cost. `state_dict` holds the cached log-probs: a resumed run never rescores.
    """

    def __init__(
        self,
        reference_model: nn.Module,
        *,
        pad_token_id: int,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        capacity: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"PreferenceReplay batch_size={batch_size} must be >= 1")
        if capacity is not None and capacity < 1:
            raise ValueError(f"PreferenceReplay capacity={capacity} must be >= 1 (None: unbounded)")
        self.capacity = capacity
        self.evicted = 0  # pairs dropped, oldest first, to stay within `capacity`
        self.reference_model = reference_model
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.reference_forward_passes = 0
        self._pairs: dict[str, _StoredPair] = {}
        self._pending: list[str] = []

    def __len__(self) -> int:
        return len(self._pairs)

    def add(
        self, pair_id: str, chosen_ids: Any, chosen_loss_mask: Any, rejected_ids: Any, rejected_loss_mask: Any
    ) -> None:
        """Store one pair of full sequences (prompt + response).

        Args:
            pair_id: a stable id; the same id must always carry the same tokens.
            chosen_ids, rejected_ids: 1-D token ids (lists or long tensors), length Tc / Tr.
            chosen_loss_mask, rejected_loss_mask: 0/1 of the same length, 1 on the response tokens
                the model wrote (never on the first token: a causal LM cannot score it).

        Raises:
            ValueError: empty or non-1-D sequences, a mask of another length or not 0/1, a mask
                marking nothing or the first token, or a known id with different tokens.
        """
        pair = _StoredPair(
            _as_sequence("chosen_ids", pair_id, chosen_ids),
            _as_sequence("chosen_loss_mask", pair_id, chosen_loss_mask),
            _as_sequence("rejected_ids", pair_id, rejected_ids),
            _as_sequence("rejected_loss_mask", pair_id, rejected_loss_mask),
        )
        for side, ids, loss_mask in (
            ("chosen", pair.chosen_ids, pair.chosen_loss_mask),
            ("rejected", pair.rejected_ids, pair.rejected_loss_mask),
        ):
            if ids.shape != loss_mask.shape:
                raise ValueError(
                    f"pair {pair_id!r}: {side}_ids has {len(ids)} tokens but {side}_loss_mask {len(loss_mask)}"
                )
            if not ((loss_mask == 0) | (loss_mask == 1)).all():
                raise ValueError(f"pair {pair_id!r}: {side}_loss_mask must be 0/1")
            if loss_mask[0] or not loss_mask.any():
                raise ValueError(
                    f"pair {pair_id!r}: {side}_loss_mask must mark at least one response token and not the "
                    "first token (a causal LM cannot score it)"
                )
        known = self._pairs.get(pair_id)
        if known is not None:
            if not known.same_tokens(pair):
                raise ValueError(f"pair {pair_id!r} was already added with different tokens; pair ids must be stable")
            return
        self._pairs[pair_id] = pair
        self._pending.append(pair_id)
        while self.capacity is not None and len(self._pairs) > self.capacity:
            oldest = next(iter(self._pairs))  # dicts keep insertion order
            del self._pairs[oldest]
            if oldest in self._pending:
                self._pending.remove(oldest)
            self.evicted += 1
        if len(self._pending) >= self.batch_size:
            self._score_pending()

    def sample(self, n: int, generator: torch.Generator | None = None) -> PreferenceBatch:
        """`n` distinct pairs drawn uniformly (`torch.randperm` on `generator`), as a `PreferenceBatch`.

        Sequences are RIGHT-padded to the longest of each side, (n, Tc) and (n, Tr) int64; the
        cached reference log-probs are (n,) float32; everything on `device`.

        Raises:
            ValueError: `n` < 1 or more than the store holds.
        """
        if not 1 <= n <= len(self):
            raise ValueError(f"cannot sample {n} pairs from a PreferenceReplay holding {len(self)}")
        self._score_pending()
        ids = list(self._pairs)
        pairs = [self._pairs[ids[i]] for i in torch.randperm(len(ids), generator=generator)[:n].tolist()]
        chosen_ids, chosen_attention = pad_sequences([p.chosen_ids for p in pairs], self.pad_token_id)
        rejected_ids, rejected_attention = pad_sequences([p.rejected_ids for p in pairs], self.pad_token_id)
        chosen_loss, _ = pad_sequences([p.chosen_loss_mask for p in pairs], 0)
        rejected_loss, _ = pad_sequences([p.rejected_loss_mask for p in pairs], 0)
        tensors = dict(
            chosen_ids=chosen_ids,
            chosen_attention_mask=chosen_attention,
            chosen_loss_mask=chosen_loss,
            rejected_ids=rejected_ids,
            rejected_attention_mask=rejected_attention,
            rejected_loss_mask=rejected_loss,
            ref_chosen_logps=torch.tensor([p.ref_chosen_logp for p in pairs]),
            ref_rejected_logps=torch.tensor([p.ref_rejected_logp for p in pairs]),
        )
        return PreferenceBatch(**{name: tensor.to(self.device) for name, tensor in tensors.items()})

    def state_dict(self) -> dict[str, Any]:
        """The pairs with their cached reference log-probs: a resumed run never re-scores them."""
        return {
            "pairs": {pair_id: dict(vars(pair)) for pair_id, pair in self._pairs.items()},
            "pending": list(self._pending),
            "reference_forward_passes": self.reference_forward_passes,
            "evicted": self.evicted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pairs = {pair_id: _StoredPair(**fields) for pair_id, fields in state["pairs"].items()}
        self._pending = list(state["pending"])
        self.reference_forward_passes = state["reference_forward_passes"]
        self.evicted = state.get("evicted", 0)  # checkpoints from before the capacity have none

    @torch.no_grad()
    def _score_pending(self) -> None:
        model_device = next(self.reference_model.parameters()).device
        with _eval_mode(self.reference_model):
            while self._pending:
                chunk = [self._pairs[pair_id] for pair_id in self._pending[: self.batch_size]]
                ids, attention = pad_sequences(
                    [p.chosen_ids for p in chunk] + [p.rejected_ids for p in chunk], self.pad_token_id
                )
                loss_mask, _ = pad_sequences(
                    [p.chosen_loss_mask for p in chunk] + [p.rejected_loss_mask for p in chunk], 0
                )
                ids, attention = ids.to(model_device), attention.to(model_device)
                logits = self.reference_model(input_ids=ids, attention_mask=attention, use_cache=False).logits
                self.reference_forward_passes += 1
                logps = sequence_logps(logits, ids, loss_mask.to(model_device)).float().cpu().tolist()
                for pair, chosen, rejected in zip(chunk, logps[: len(chunk)], logps[len(chunk) :], strict=True):
                    pair.ref_chosen_logp, pair.ref_rejected_logp = chosen, rejected
                del self._pending[: len(chunk)]


class PreferenceFeed:
    """Where the DPO channel's pairs come from and how a step draws them, in one place.

    Args:
        replay: the store (holds the reference model and the cached log-probs).
        pairs_per_step: pairs drawn per inner step (fewer while the store holds fewer).
        traces: an agent-trace file or directory (see `trainer.traces`); when given, pairs come
            from it once, before training, and rollouts add none; when None, every step adds the
            pairs its rollout offers (`step_pairs`).
    """

    def __init__(self, replay: PreferenceReplay, *, pairs_per_step: int, traces: str | None = None) -> None:
        self.replay = replay
        self.pairs_per_step = pairs_per_step
        self.traces = traces

    def fill_from_traces(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
        """Mine the run's agent traces (never executed, only read) into the store; returns the count.

        Raises CapacityError (naming `loss.dpo_capacity`) when they do not fit: trace pairs are
        never dropped unsaid."""
        if self.traces is None:
            return 0
        from trainer.traces import TraceIngester, mine_pairs, render_pair

        pairs = list(mine_pairs(TraceIngester().ingest(self.traces)))
        capacity = self.replay.capacity
        if capacity is not None and len(pairs) > capacity:  # trace pairs are never dropped unsaid
            raise CapacityError(
                f"loss.dpo_capacity: {capacity} pairs, but task.traces {self.traces} gives {len(pairs)}; raise it"
            )
        added = 0
        for pair in pairs:
            tokens = render_pair(pair, tokenizer, max_length=max_length)
            self.replay.add(
                pair.id, tokens.chosen_ids, tokens.chosen_loss_mask, tokens.rejected_ids, tokens.rejected_loss_mask
            )
            added += 1
        return added

    def step(self, pairs: Iterable[tuple[str, Any, Any, Any, Any]], *, rng: random.Random) -> PreferenceBatch | None:
        """The step for any source of rollout pairs (sibling completions, agent episodes): `pairs`
        (pair_id, chosen ids, chosen mask, rejected ids, rejected mask) enter the store unless traces
        feed it (then they are not even produced), then this step's batch is drawn; None while empty."""
        if self.traces is None:
            for pair_id, *tokens in pairs:
                self.replay.add(pair_id, *tokens)
        if len(self.replay) == 0:
            return None
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        return self.replay.sample(min(self.pairs_per_step, len(self.replay)), generator=generator)

    def state_dict(self) -> dict[str, Any]:
        return self.replay.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replay.load_state_dict(state)
