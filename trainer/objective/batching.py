"""Ragged token lists -> padded tensors: the one padding rule every batch in the trainer uses.

Rollouts (prompts LEFT-padded for `generate`, completions RIGHT-padded), the supervised warm-up and
the DPO pair store all build their tensors here, so a layout change is made once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["pad_sequences"]


def pad_sequences(
    sequences: Sequence[Sequence[int] | Tensor], value: int, *, left: bool = False
) -> tuple[Tensor, Tensor]:
    """Stack ragged 1-D id sequences into padded ids and their mask.

    Args:
        sequences: B sequences of token ids (lists or 1-D long tensors), at least one.
        value: the pad id written where a sequence is shorter than the longest.
        left: pad on the left (the layout `generate` and `PolicyBatch`'s prompt fields want);
            right padding (default) is for completions and full DPO sequences.

    Returns:
        `(ids, mask)`, both `(B, max_len)` int64 on the CPU; `mask` is 1 on real tokens, 0 on padding.
    """
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
