"""Mixed precision the standard way: fp32 master weights, bf16 compute under `torch.autocast`.

Why autocast rather than bf16 parameters: an AdamW update at a real model's learning rate (1e-6 on
weights of magnitude ~0.02) is far below half a bf16 step (~6e-5 there), so updating bf16 weights in
place rounds most updates away (10 steps changed 1.8 % of Qwen-size weights). Keeping the
parameters, the optimizer state and the checkpoint in fp32 and running only the forwards' matrix
work in bf16 is PyTorch's own AMP recipe (torch.amp); it needs no loss scaling for bf16 (fp32's
exponent range). DiLoCo then measures each pseudo-gradient against fp32 values the replica really
started the round from, so a round that changed nothing ships exactly zero. A sharded replica
(`parallel.sharding: fsdp`) uses FSDP's MixedPrecisionPolicy instead, the sharded equivalent over
the same fp32 master shards (`trainer.run.sharding.mixed_precision` says why).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["compute_dtype", "autocast"]


def compute_dtype(name: str) -> torch.dtype | None:
    """`model.dtype` -> the autocast dtype; None for float32 (no autocast)."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    raise ValueError(f"model.dtype={name!r}: expected float32 or bfloat16")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Forwards inside run their matmuls in `dtype`; no-op for None. Which other ops autocast keeps
    in fp32 depends on the device (CUDA: softmax and reductions; CPU: fewer, e.g. not log_softmax),
    so the losses upcast logits themselves (`trainer.objective.losses`)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
