"""The supervised warm-up's step, alone and shared by processes (trainer.warmup.sft_step)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.model import tiny_model_and_tokenizer
from trainer.rollout.warmup import sft_step

CORPUS = ["def f(x):\n    return x + 1\n", "Return x times 6.", "All tests passed."] * 4


def batch(rows: int = 5, length: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of random ids with ragged right padding and a labelled tail, from a fixed generator."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 200, (rows, length), generator=g)
    attention = torch.ones_like(ids)
    for row in range(rows):
        attention[row, length - 2 * row :] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, : length // 3] = -100  # the prompt: no loss
    return ids, attention, labels


def train(steps: int, group=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    model, _ = tiny_model_and_tokenizer(CORPUS, vocab_size=256, hidden_size=32, seed=3)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = [sft_step(model, optimizer, *batch(), group=group) for _ in range(steps)]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _shared(rank: int, world: int, store_path: str, out: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        losses, state = train(3, group=dist.group.WORLD)
        model, _ = tiny_model_and_tokenizer(CORPUS, vocab_size=256, hidden_size=32, seed=3)
        try:  # one row for two processes: refused on both, before either waits in the all_reduce
            sft_step(model, torch.optim.AdamW(model.parameters()), *batch(rows=1), group=dist.group.WORLD)
            refused = ""
        except ValueError as error:
            refused = str(error)
        torch.save((losses, state, refused), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_warm_up_step_shared_by_two_processes_equals_the_step_of_one_and_leaves_both_identical(tmp_path):
    out = str(tmp_path / "state")
    mp.start_processes(_shared, args=(2, str(tmp_path / "store"), out), nprocs=2, start_method="spawn")
    alone_losses, alone = train(3)
    (losses0, state0, refused0), (losses1, state1, refused1) = (torch.load(f"{out}.{r}") for r in (0, 1))
    assert refused0 == refused1 == "sft_step: a batch of 1 rows cannot be shared by 2 processes"
    assert losses0 == losses1
    assert torch.allclose(torch.tensor(losses0), torch.tensor(alone_losses), atol=1e-6)
    assert alone_losses[-1] < alone_losses[0]  # the steps train
    for key, value in alone.items():
        assert torch.equal(state0[key], state1[key]), key  # every process takes the same step
        assert torch.allclose(state0[key], value, atol=1e-5), key  # ... the one-process step


def test_a_step_with_no_labelled_token_is_refused():
    model, _ = tiny_model_and_tokenizer(CORPUS, vocab_size=256, hidden_size=32, seed=3)
    ids, attention, labels = batch()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="no labelled token"):
        sft_step(model, optimizer, ids, attention, torch.full_like(labels, -100))
