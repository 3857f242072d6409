"""DiLoCo over torch.distributed: replicas train alone for H inner steps, then exchange one
pseudo-gradient and take an outer (Nesterov) step on a shared global copy.

Why this shape: replicas on loosely connected machines can afford one exchange every H steps,
not one per step (DiLoCo, arXiv 2311.08105). Streaming fragments spread that exchange over the H
steps and overlap it with compute (Streaming DiLoCo, arXiv 2501.18512); blockwise int8/int4
payloads cut it further (INTELLECT-1, arXiv 2412.01152).

The exchange is a reduce-scatter followed by an all-gather, written as point-to-point messages
of raw bytes so that it runs on Gloo and NCCL alike and can never silently become fp32:

1. each replica splits its (encoded) pseudo-gradient into M block-aligned shards and sends shard
   j to replica j (the owner of shard j);
2. the owner decodes the M copies of its shard and sums them in fp32, in rank order, over the
   replicas whose pseudo-gradient was finite, and divides by their number;
3. the owner re-encodes its mean shard and sends it to every other replica; every replica
   (the owner included) decodes the same bytes, so all hold a bit-identical mean.

Each replica sends and receives about 2 (M - 1) / M payloads per exchange, the figure of a ring
all-reduce, instead of the M - 1 payloads an all-gather of whole payloads receives. Lossy
compression quantizes twice (the replica's shards, then the owner's mean shard); error feedback
keeps each quantization's residual where it happens (every replica for its pseudo-gradient,
every owner for its mean shard) and adds it back the next time that fragment is exchanged.

Two more additions of ours: a replica whose pseudo-gradient is non-finite is left out of the
average instead of poisoning every replica; and every message is awaited with a deadline
(``timeout_s``): a dead or stalled replica raises :class:`DiLoCoCommunicationError` naming the
outer step, the fragment and the replicas that did not answer, instead of hanging forever.

Usage (the caller owns the inner loop)::

    diloco = DiLoCo(model, adamw, sync_every=100, group=outer_group, compression="int8")
    for batch in data:
        loss(model, batch).backward(); adamw.step(); adamw.zero_grad()
        if diloco.step():            # True when a (fragment) sync ran at this step
            log(diloco.outer_step, diloco.last_pseudo_grad_norm, diloco.last_participants)

This module is a library: no config objects, no file I/O, no logging set-up (it only emits
warnings through ``logging.getLogger(__name__)``).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_TIMEOUT_S",
    "QUANT_BLOCK",
    "DiLoCo",
    "DiLoCoCommunicationError",
    "decode",
    "encode",
    "payload_bytes",
    "parameters_hash",
    "shard_bounds",
    "split_parameters",
]

logger = logging.getLogger(__name__)

COMPRESSIONS = ("none", "bf16", "int8", "int4")
# Elements sharing one fp32 absmax scale: 4 scale bytes per 128 values (3 % overhead at int8).
QUANT_BLOCK = 128
_LEVELS = {"int8": 127, "int4": 7}  # symmetric code range [-levels, levels]
_INT4_OFFSET = 8  # int4 codes are stored as unsigned nibbles q + 8 in [1, 15]
# Which tensor device each collective backend can run on; anything else is refused up front.
_BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}
# Long enough for a 0.5B-parameter fp32 exchange (2 GB each way) over a 20 Mbit/s link (~15 min).
DEFAULT_TIMEOUT_S = 1800.0
# Trailer bytes of each message: phase 1 carries the sender's "finite" flag (uint8), phase 2 the
# owner's participant count (int32), so a NaN replica is left out consistently everywhere.
_FLAG_BYTES, _COUNT_BYTES = 1, 4
# Messages travel in chunks: one 4 MB message per direction ran at half the link rate over a
# shaped link (Gloo's two directions of a pair took turns), 256 KiB chunks at ~0.9 of it
# (bench/bench_wan.py). Posting a chunk costs ~0.5 ms of CPU, so a large message is cut into at
# most _CHUNKS_PER_MESSAGE larger chunks instead. Tags: (phase slot) * _MAX_CHUNKS + chunk < 2**31.
_CHUNK_BYTES = 256 * 1024
_CHUNKS_PER_MESSAGE = 16
_MAX_CHUNKS = 1 << 16
_TAG_PERIOD = 1 << 12  # exchanges before phase slots repeat (only one exchange is in flight)
_BROADCAST_SLOT = 2 * _TAG_PERIOD

OuterOptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


class DiLoCoCommunicationError(RuntimeError):
    """An exchange could not finish: a replica died, or did not answer within ``timeout_s``.

    The process group cannot be trusted afterwards (messages may be half sent); the caller should
    exit so that its launcher restarts every replica from the last checkpoint.

    Attributes: ``outer_step`` (1-based outer step the exchange was for; 0 for the initial
    broadcast), ``fragment`` (-1 for the initial broadcast), ``missing`` (ranks in the DiLoCo
    group that did not answer, sorted), ``reasons`` (rank -> what the transport said).
    """

    def __init__(self, outer_step: int, fragment: int, missing: list[int], reasons: dict[int, str], timeout_s: float):
        self.outer_step, self.fragment, self.missing, self.reasons = outer_step, fragment, missing, reasons
        what = "initial broadcast" if fragment < 0 else f"outer step {outer_step}, fragment {fragment}"
        details = "; ".join(f"replica {rank}: {reason}" for rank, reason in sorted(reasons.items()))
        super().__init__(
            f"DiLoCo {what}: replicas {missing} did not answer ({details}; timeout {timeout_s:g} s). "
            f"The exchange is incomplete and the process group unusable: exit so the launcher "
            f"restarts the replicas and resumes from the last checkpoint"
        )


def encode(values: torch.Tensor, compression: str) -> torch.Tensor:
    """Encode a flat fp32 tensor as the uint8 payload that goes on the wire.

    Layouts: ``none`` raw fp32 bytes; ``bf16`` raw bf16 bytes; ``int8``/``int4`` one fp32 absmax
    scale per ``QUANT_BLOCK`` values followed by the codes (int8: one byte each; int4: two per byte,
    low nibble first). Codes round to nearest, so each value is off by at most half a step
    (``absmax / (2 * levels)`` of its block).
    """
    _check_compression(compression)
    flat = values.detach().reshape(-1).to(torch.float32).contiguous()
    if compression == "none":
        return flat.view(torch.uint8)
    if compression == "bf16":
        return flat.to(torch.bfloat16).view(torch.uint8)
    levels = _LEVELS[compression]
    numel = flat.numel()
    blocks = _pad(flat, _num_blocks(numel) * QUANT_BLOCK).view(-1, QUANT_BLOCK)
    scales = blocks.abs().amax(dim=1) / levels
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero block -> codes 0
    codes = torch.round(blocks / divisor[:, None]).clamp_(-levels, levels).to(torch.int8).reshape(-1)
    if compression == "int8":
        packed = codes[:numel].view(torch.uint8)
    else:
        nibbles = (codes[: numel + numel % 2] + _INT4_OFFSET).to(torch.uint8).view(-1, 2)
        packed = nibbles[:, 0] | (nibbles[:, 1] << 4)
    return torch.cat([scales.view(torch.uint8), packed])


def decode(payload: torch.Tensor, compression: str, numel: int) -> torch.Tensor:
    """Inverse of :func:`encode`: the fp32 values (length ``numel``) a payload stands for."""
    _check_compression(compression)
    expected = payload_bytes(numel, compression)
    if payload.dtype != torch.uint8 or payload.numel() != expected:
        raise ValueError(
            f"decode({compression!r}, numel={numel}): expected {expected} uint8 bytes, "
            f"got {payload.numel()} of {payload.dtype}"
        )
    if compression == "none":
        return payload.view(torch.float32).clone()
    if compression == "bf16":
        return payload.view(torch.bfloat16).to(torch.float32)
    num_blocks = _num_blocks(numel)
    scales = payload[: 4 * num_blocks].view(torch.float32)
    packed = payload[4 * num_blocks :]
    if compression == "int8":
        codes = packed.view(torch.int8).to(torch.float32)
    else:
        low = (packed & 0x0F).to(torch.int16) - _INT4_OFFSET
        high = (packed >> 4).to(torch.int16) - _INT4_OFFSET
        codes = torch.stack([low, high], dim=1).reshape(-1)[:numel].to(torch.float32)
    blocks = _pad(codes, num_blocks * QUANT_BLOCK).view(-1, QUANT_BLOCK)
    return (blocks * scales[:, None]).reshape(-1)[:numel]


def payload_bytes(numel: int, compression: str) -> int:
    """Bytes :func:`encode` produces for ``numel`` values (what one replica puts on the wire)."""
    _check_compression(compression)
    if compression == "none":
        return 4 * numel
    if compression == "bf16":
        return 2 * numel
    codes = numel if compression == "int8" else (numel + 1) // 2
    return 4 * _num_blocks(numel) + codes


def parameters_hash(module: nn.Module | Iterable[torch.Tensor]) -> str:
    """SHA-256 hex digest of every parameter's bytes in module order.

    Why: equal digests prove replicas hold bit-identical weights without shipping the weights.
    Accepts a module (its ``parameters()``) or any iterable of tensors, e.g.
    ``DiLoCo.global_parameters()``.
    """
    tensors = module.parameters() if isinstance(module, nn.Module) else module
    digest = hashlib.sha256()
    for tensor in tensors:
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def shard_bounds(numel: int, world: int) -> list[range]:
    """Element ranges of the ``world`` shards of a flat vector of ``numel`` values.

    Shards are contiguous, cover the vector in order, start on a ``QUANT_BLOCK`` boundary (so a
    shard's quantization blocks are the whole vector's blocks) and hold a near-equal number of
    blocks; a vector with fewer blocks than replicas leaves some shards empty.
    """
    blocks = _num_blocks(numel)
    edges = [min(numel, (k * blocks // world) * QUANT_BLOCK) for k in range(world + 1)]
    return [range(edges[k], edges[k + 1]) for k in range(world)]


@dataclass
class _Exchange:
    """One fragment's pseudo-gradient exchange, possibly still running on a background thread."""

    fragment: int
    outer_step: int  # the outer step this exchange feeds (1-based, for error messages)
    finite: bool  # this replica's own pseudo-gradient was finite (and so was sent)
    started: float  # perf_counter() when the exchange was started
    thread: threading.Thread | None = None  # None: it ran inline in step()
    mean: torch.Tensor | None = None  # averaged pseudo-gradient (None: no replica was finite)
    participants: int = 0
    sent: int = 0  # payload bytes this replica's sends put on the wire
    received: int = 0  # payload bytes this replica's receives took off the wire
    finished: float = 0.0  # perf_counter() when the mean was complete
    error: BaseException | None = None


class DiLoCo:
    """DiLoCo outer loop over a torch.distributed process group; call :meth:`step` after every
    inner ``optimizer.step()``.

    Args:
        model: the replica's module; its trainable parameters (module order) are synced.
        parameters: the part of `model`'s trainable parameters this process exchanges (tensors
            or views into them, module order); None: all of them. A replica of S processes splits its parameters with
            :func:`split_parameters` so that each process ships 1/S of the model across replicas
            (`group` is then "this process's counterparts in the other replicas"); the caller
            shares each process's synced part with the rest of its replica after a sync. A
            replica sharded with FSDP passes each rank's local shards (`DTensor.to_local()`, taken
            under no_grad): the global copy, momentum and residuals are then 1/S per rank and no
            sharing is needed, since shard k covers the same elements in every replica.
        inner_optimizer: the caller's inner optimizer. DiLoCo only touches it to drop the state of
            parameters a non-finite replica had to reset (stale NaN moments would re-poison them);
            for a view it drops the state of the parameter the view shares storage with.
        sync_every: H, inner steps between two syncs of the same parameters.
        outer_optimizer: ``None`` for ``SGD(lr=0.7, momentum=0.9, nesterov=True)``, or a factory
            ``f(params: list[Tensor]) -> torch.optim.Optimizer`` that builds any torch optimizer
            over the global copy it is given, e.g. ``functools.partial(torch.optim.SGD, lr=1.0)``.
            An optimizer *instance* is refused: it cannot exist before the global copy does.
        group: process group of the replicas (rank k of every replica); ``None`` = the default
            group, or a group of one when torch.distributed is not initialised.
        fragments: split the parameters into this many contiguous, size-balanced groups in module
            order; one fragment syncs every ``sync_every // fragments`` steps, round-robin.
        fragment_delay: tau, start a fragment's exchange tau inner steps before it is applied; the
            exchange then runs on a background thread while the caller computes. With tau = 0 it
            runs inside :meth:`step`. Do not issue other collectives on ``group`` from another
            thread while an exchange is in flight (between the start and the apply).
        fragment_alpha: after a sync the replica takes ``(1 - alpha) * global + alpha * local``.
        compression: payload encoding, ``"none"`` (fp32), ``"bf16"``, ``"int8"``, ``"int4"``
            (see :func:`encode`); the reduction is always fp32.
        error_feedback: keep each quantization's residual and add it to the next exchange of the
            same fragment (lossy compressions only).
        backup_device: where the fp32 global copy and outer optimizer state live (and the
            exchanged buffers, if the backend can use it: with NCCL and a CPU backup they are
            staged on the model's CUDA device).
        timeout_s: seconds each exchange (and the initial broadcast) may take before
            :class:`DiLoCoCommunicationError` is raised. Size it for the slowest link: one
            exchange moves about ``2 * payload_bytes(numel, compression)`` per replica.

    Attributes read by the worker: ``outer_step`` (syncs so far, one per fragment sync, including
    a round skipped because every replica was non-finite), ``last_pseudo_grad_norm`` (L2 norm of
    the averaged pseudo-gradient of the last sync; 0.0 if skipped), ``last_participants``
    (replicas whose pseudo-gradient entered that average), ``last_fragment`` (index of the last
    synced fragment), and:

    - ``bytes_sent`` / ``bytes_received``: payload bytes of every message this replica sent to /
      received from another replica, summed over all exchanges (the initial broadcast excluded):
      per exchange, phase 1 sends shard j (+1 flag byte) to each owner j != self and receives its
      own shard from the M - 1 others; phase 2 sends its mean shard (+4 count bytes) to the M - 1
      others and receives theirs. Nothing sent to itself is counted. The transport adds its
      framing (TCP/IP headers, Gloo's message headers: a few %), which is not counted.
    - ``compute_seconds`` / ``communication_seconds``: wall seconds since construction (or
      :meth:`load_state_dict`) the caller's thread spent outside waiting for an exchange (its own
      inner steps and DiLoCo's local math) and blocked on one (an inline exchange entirely: its
      transfers and the owner's reduction between them; an in-flight one, only the wait at the
      apply). ``compute / (compute + communication)`` is the measured compute utilisation.
    - ``last_exchange_seconds``: wall seconds from the start of the last applied exchange to its
      mean being complete, whether or not the caller waited for it.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        *,
        sync_every: int,
        outer_optimizer: OuterOptimizerFactory | None = None,
        group: dist.ProcessGroup | None = None,
        fragments: int = 1,
        fragment_delay: int = 0,
        fragment_alpha: float = 0.0,
        compression: str = "none",
        error_feedback: bool = False,
        backup_device: str | torch.device = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        parameters: Sequence[torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"DiLoCo(inner_optimizer=...): expected a torch.optim.Optimizer, got {type(inner_optimizer).__name__}"
            )
        _check_schedule(sync_every, fragments, fragment_delay, fragment_alpha)
        _check_compression(compression)
        if error_feedback and compression == "none":
            raise ValueError(
                "DiLoCo(error_feedback=True): fp32 (compression='none') has no quantization "
                "residual to feed back; choose compression 'bf16', 'int8' or 'int4'"
            )
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"DiLoCo(timeout_s={timeout_s!r}): must be a number of seconds > 0")
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.sync_every = sync_every
        self.fragments = fragments
        self.fragment_delay = fragment_delay
        self.fragment_alpha = float(fragment_alpha)
        self.compression = compression
        self.error_feedback = error_feedback
        self.backup_device = torch.device(backup_device)
        self.timeout_s = float(timeout_s)
        self.group = _resolve_group(group)

        self._local = [p for p in model.parameters() if p.requires_grad] if parameters is None else list(parameters)
        if not self._local:
            raise ValueError("DiLoCo(model=...): the model has no trainable parameters to sync")
        if fragments > len(self._local):
            raise ValueError(
                f"DiLoCo(fragments={fragments}): the model has only {len(self._local)} trainable "
                f"parameter tensors; a fragment needs at least one"
            )
        # The inner optimizer's key for each synced tensor: the tensor itself, or the parameter a
        # view (a `split_parameters` share, an FSDP shard's `to_local()`) shares its storage with.
        self._optimizer_keys = [_optimizer_key(inner_optimizer, local) for local in self._local]
        self._wire_device = _wire_device(self.group, self.backup_device, self._local[0].device)
        self._fragment_ranges = _split_contiguous([p.numel() for p in self._local], fragments)
        self._broadcast_initial_parameters()
        self._global = [nn.Parameter(p.detach().to(self.backup_device, torch.float32, copy=True)) for p in self._local]
        self.outer_optimizer = _build_outer_optimizer(outer_optimizer, self._global)
        # Error feedback: each replica's residual of its pseudo-gradient, and (only this
        # replica's shard is ever non-zero) the owner's residual of its mean shard.
        self._residuals: list[torch.Tensor] = []
        self._mean_residuals: list[torch.Tensor] = []
        if error_feedback:
            for f in range(fragments):
                self._residuals.append(torch.zeros(self._fragment_numel(f), device=self.backup_device))
                self._mean_residuals.append(torch.zeros(self._fragment_numel(f), device=self.backup_device))

        self._inner_step = 0
        self._in_flight: _Exchange | None = None
        self.outer_step = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_pseudo_grad_norm = 0.0
        self.last_participants = 0
        self.last_fragment = -1
        self.compute_seconds = 0.0
        self.communication_seconds = 0.0
        self.last_exchange_seconds = 0.0
        self._clock = time.perf_counter()

    # ----------------------------------------------------------------------------- public API

    def global_parameters(self) -> list[torch.Tensor]:
        """The fp32 global copy (module order, on ``backup_device``) the outer optimizer steps."""
        return list(self._global)

    def fragment_parameters(self, fragment: int) -> list[torch.Tensor]:
        """The model's own parameters that fragment ``fragment`` covers, in module order."""
        return [self._local[i] for i in self._fragment_ranges[fragment]]

    def step(self) -> bool:
        """Advance one inner step; start and/or apply a fragment sync when one is due.

        Returns True when a sync was applied at this step (after it, the synced fragment of
        every replica holds the new global values, mixed with its own by ``fragment_alpha``).

        Raises:
            DiLoCoCommunicationError: an exchange did not complete (a replica died or stalled
                past ``timeout_s``).
        """
        entered = time.perf_counter()
        self.compute_seconds += entered - self._clock
        blocked = 0.0
        self._inner_step += 1
        interval = self.sync_every // self.fragments
        applied = False
        try:
            if (self._inner_step + self.fragment_delay) % interval == 0:
                blocked += self._start_exchange(self._fragment_due(self._inner_step + self.fragment_delay))
            if self._inner_step % interval == 0:
                blocked += self._apply(self._fragment_due(self._inner_step))
                applied = True
        finally:
            self._clock = time.perf_counter()
            self.communication_seconds += blocked
            self.compute_seconds += self._clock - entered - blocked
        return applied

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (plain tensors and Python values, ``torch.save``-able) of everything DiLoCo
        needs to resume bit-exactly: settings, counters, global copy, outer optimizer state and
        error-feedback residuals. The model and inner optimizer are the caller's to save.
        """
        if self._in_flight is not None:
            raise RuntimeError(
                f"DiLoCo.state_dict(): fragment {self._in_flight.fragment} is still being "
                f"exchanged (fragment_delay={self.fragment_delay}); save right after step() "
                f"returns True, when nothing is in flight"
            )
        return {
            "settings": self._settings(),
            "inner_step": self._inner_step,
            "outer_step": self.outer_step,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "global_parameters": [g.detach().clone() for g in self._global],
            "outer_optimizer": copy.deepcopy(self.outer_optimizer.state_dict()),
            "residuals": [r.clone() for r in self._residuals],
            "mean_residuals": [r.clone() for r in self._mean_residuals],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; settings and parameter shapes must match.

        The owner residuals are this replica's own shard of each fragment; if the number of
        replicas changed since the save, the shards moved and part of them is dropped (a warning
        says so): at most one quantization step of one exchange is lost.
        """
        for key, value in self._settings().items():
            saved = state["settings"].get(key)
            if saved != value:
                raise ValueError(
                    f"DiLoCo.load_state_dict: settings[{key!r}] is {saved!r} in the checkpoint "
                    f"but {value!r} here; build DiLoCo with the checkpoint's settings"
                )
        saved_globals = state["global_parameters"]
        shapes = [tuple(g.shape) for g in self._global]
        saved_shapes = [tuple(t.shape) for t in saved_globals]
        if saved_shapes != shapes:
            raise ValueError(
                f"DiLoCo.load_state_dict: global_parameters shapes {saved_shapes} do not match "
                f"the model's trainable parameters {shapes}"
            )
        if self._in_flight is not None:
            raise RuntimeError("DiLoCo.load_state_dict(): an exchange is in flight; load first")
        with torch.no_grad():
            for target, saved in zip(self._global, saved_globals, strict=True):
                target.copy_(saved)
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        for target, saved in zip(self._residuals, state["residuals"], strict=True):
            target.copy_(saved)
        for fragment, (target, saved) in enumerate(zip(self._mean_residuals, state["mean_residuals"], strict=True)):
            own = self._own_shard(target.numel())
            target.zero_()
            target[own.start : own.stop] = saved[own.start : own.stop]
            if torch.count_nonzero(saved).item() > torch.count_nonzero(target).item():
                logger.warning(
                    "DiLoCo.load_state_dict: fragment %d's owner residual lies partly outside this "
                    "replica's shard (the number of replicas changed); that part is dropped",
                    fragment,
                )
        self._inner_step = int(state["inner_step"])
        self.outer_step = int(state["outer_step"])
        self.bytes_sent = int(state["bytes_sent"])
        self.bytes_received = int(state["bytes_received"])
        self._clock = time.perf_counter()

    # ---------------------------------------------------------------------------- internals

    def _settings(self) -> dict[str, Any]:
        return {
            "sync_every": self.sync_every,
            "fragments": self.fragments,
            "fragment_delay": self.fragment_delay,
            "fragment_alpha": self.fragment_alpha,
            "compression": self.compression,
            "error_feedback": self.error_feedback,
        }

    def _fragment_due(self, inner_step: int) -> int:
        """Fragment synced at ``inner_step``: 0, 1, ..., F-1, 0, ... every H/F steps."""
        return (inner_step // (self.sync_every // self.fragments) - 1) % self.fragments

    def _fragment_numel(self, fragment: int) -> int:
        return sum(self._local[i].numel() for i in self._fragment_ranges[fragment])

    def _world(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    def _rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    def _own_shard(self, numel: int) -> range:
        return shard_bounds(numel, self._world())[self._rank()]

    def _broadcast_initial_parameters(self) -> None:
        """Start every replica from the group's first rank, whatever seed each one used."""
        if self.group is None or self._world() == 1:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().to(self._wire_device, torch.float32).reshape(-1) for p in self._local])
            raw = flat.view(torch.uint8)
            if self._rank() == 0:
                sends = {peer: raw for peer in range(1, self._world())}
                _transfer(
                    self.group,
                    sends,
                    {},
                    tag=_BROADCAST_SLOT,
                    deadline=self._deadline(),
                    timeout_s=self.timeout_s,
                    what=(0, -1),
                )
            else:
                _transfer(
                    self.group,
                    {},
                    {0: raw},
                    tag=_BROADCAST_SLOT,
                    deadline=self._deadline(),
                    timeout_s=self.timeout_s,
                    what=(0, -1),
                )
            offset = 0
            for p in self._local:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def _deadline(self) -> float:
        return time.perf_counter() + self.timeout_s

    def _start_exchange(self, fragment: int) -> float:
        """Compute and encode this replica's pseudo-gradient shards and start the exchange:
        inline when fragment_delay is 0, else on a background thread. Returns the seconds the
        caller was blocked on communication."""
        indices = self._fragment_ranges[fragment]
        with torch.no_grad():
            # Sign: global-before minus local-after, so the outer step moves towards the replicas.
            pseudo = torch.cat(
                [(self._global[i] - self._local[i].to(self.backup_device, torch.float32)).reshape(-1) for i in indices]
            )
        finite = bool(torch.isfinite(pseudo).all())
        if not finite:
            logger.warning(
                "DiLoCo sync %d, fragment %d: this replica's pseudo-gradient is non-finite; it is "
                "left out of the average and will reset to the global values",
                self.outer_step + 1,
                fragment,
            )
            pseudo.zero_()
        elif self.error_feedback:
            pseudo += self._residuals[fragment]
        # One payload per shard (block-aligned, so its blocks are the whole vector's), + flag.
        bounds = shard_bounds(pseudo.numel(), self._world())
        payloads = [encode(pseudo[b.start : b.stop], self.compression) for b in bounds]
        if finite and self.error_feedback:
            decoded = [decode(payload, self.compression, len(b)) for payload, b in zip(payloads, bounds, strict=True)]
            self._residuals[fragment] = pseudo - torch.cat(decoded)
        shards = [torch.cat([payload, payload.new_tensor([int(finite)])]) for payload in payloads]
        exchange = _Exchange(fragment, self.outer_step + 1, finite, started=time.perf_counter())
        self._in_flight = exchange
        if self.fragment_delay == 0:
            self._run_exchange(exchange, shards)
            return time.perf_counter() - exchange.started
        exchange.thread = threading.Thread(
            target=self._run_exchange, args=(exchange, shards), name=f"diloco-exchange-{fragment}", daemon=True
        )
        exchange.thread.start()
        return 0.0

    def _run_exchange(self, exchange: _Exchange, shards: list[torch.Tensor]) -> None:
        """Reduce-scatter, owner reduction, all-gather (module docstring); fills ``exchange``."""
        try:
            with torch.no_grad():
                self._reduce_scatter_all_gather(exchange, shards)
        except BaseException as error:  # handed to the caller's thread at the apply
            exchange.error = error
        exchange.finished = time.perf_counter()

    def _reduce_scatter_all_gather(self, exchange: _Exchange, shards: list[torch.Tensor]) -> None:
        world, rank = self._world(), self._rank()
        numel = self._fragment_numel(exchange.fragment)
        bounds = shard_bounds(numel, world)
        own = bounds[rank]
        deadline = exchange.started + self.timeout_s
        tag = 2 * (exchange.outer_step % _TAG_PERIOD)
        what = (exchange.outer_step, exchange.fragment)

        # Phase 1: shard j goes to its owner j; this replica receives the M - 1 copies of its own.
        own_bytes = payload_bytes(len(own), self.compression) + _FLAG_BYTES
        sends = {peer: shards[peer].to(self._wire_device) for peer in range(world) if peer != rank}
        received = {peer: torch.empty(own_bytes, dtype=torch.uint8, device=self._wire_device) for peer in sends}
        if sends:
            _transfer(self.group, sends, received, tag=tag, deadline=deadline, timeout_s=self.timeout_s, what=what)
        received[rank] = shards[rank]
        exchange.sent += sum(t.numel() for t in sends.values())
        exchange.received += sum(t.numel() for t in received.values()) - shards[rank].numel()

        # The owner's reduction: fp32, rank order, finite replicas only.
        total = torch.zeros(len(own), device=self.backup_device)
        participants = 0
        for peer in range(world):
            message = received[peer].to(self.backup_device)
            if int(message[-1].item()) == 1:
                total += decode(message[:-_FLAG_BYTES], self.compression, len(own))
                participants += 1
        mean_shard = total / max(participants, 1)
        if self.error_feedback and participants:
            mean_shard += self._mean_residuals[exchange.fragment][own.start : own.stop]
        payload = encode(mean_shard, self.compression)
        if self.error_feedback and participants:
            residual = mean_shard - decode(payload, self.compression, len(own))
            self._mean_residuals[exchange.fragment][own.start : own.stop] = residual
        count = torch.tensor([participants], dtype=torch.int32).view(torch.uint8)
        mine = torch.cat([payload, count.to(payload.device)])

        # Phase 2: every owner's mean shard to everyone; all decode the same bytes.
        sends = {peer: mine.to(self._wire_device) for peer in range(world) if peer != rank}
        gathered = {
            peer: torch.empty(
                payload_bytes(len(bounds[peer]), self.compression) + _COUNT_BYTES,
                dtype=torch.uint8,
                device=self._wire_device,
            )
            for peer in sends
        }
        if sends:
            _transfer(self.group, sends, gathered, tag=tag + 1, deadline=deadline, timeout_s=self.timeout_s, what=what)
        gathered[rank] = mine
        exchange.sent += sum(t.numel() for t in sends.values())
        exchange.received += sum(t.numel() for peer, t in gathered.items() if peer != rank)

        parts = []
        for peer in range(world):
            message = gathered[peer].to(self.backup_device)
            parts.append(decode(message[:-_COUNT_BYTES], self.compression, len(bounds[peer])))
            exchange.participants = int(message[-_COUNT_BYTES:].clone().view(torch.int32).item())
        exchange.mean = torch.cat(parts) if exchange.participants else None

    def _apply(self, fragment: int) -> float:
        """Wait for the fragment's exchange, take the outer step, adopt the global values.
        Returns the seconds the caller was blocked waiting."""
        exchange = self._in_flight
        assert exchange is not None and exchange.fragment == fragment, "exchange schedule broken"
        blocked = 0.0
        if exchange.thread is not None:
            waited = time.perf_counter()
            # The thread's own waits end at the deadline; the margin only covers a transport
            # that ignores its timeout.
            exchange.thread.join(max(0.0, exchange.started + self.timeout_s - waited) + 60.0)
            blocked = time.perf_counter() - waited
            if exchange.thread.is_alive():
                peers = [peer for peer in range(self._world()) if peer != self._rank()]
                reasons = dict.fromkeys(peers, "the exchange thread never returned")
                exchange.error = DiLoCoCommunicationError(exchange.outer_step, fragment, peers, reasons, self.timeout_s)
        self._in_flight = None
        self.bytes_sent += exchange.sent
        self.bytes_received += exchange.received
        if exchange.error is not None:
            raise exchange.error
        self.last_exchange_seconds = exchange.finished - exchange.started
        mean, participants = exchange.mean, exchange.participants
        indices = self._fragment_ranges[fragment]
        if mean is None:
            logger.warning(
                "DiLoCo sync %d, fragment %d: every replica's pseudo-gradient is non-finite; "
                "outer step skipped, global copy unchanged",
                self.outer_step + 1,
                fragment,
            )
            self.last_pseudo_grad_norm = 0.0
        else:
            if participants < self._world():
                logger.warning(
                    "DiLoCo sync %d, fragment %d: averaged %d of %d replicas (others non-finite)",
                    self.outer_step + 1,
                    fragment,
                    participants,
                    self._world(),
                )
            offset = 0
            for i in indices:
                target = self._global[i]
                target.grad = mean[offset : offset + target.numel()].view_as(target)
                offset += target.numel()
            self.outer_optimizer.step()
            for i in indices:  # parameters without .grad are skipped by the next fragment's step
                self._global[i].grad = None
            self.last_pseudo_grad_norm = float(mean.norm())
        self._adopt_global(indices, healthy=exchange.finite)
        self.last_participants = participants
        self.last_fragment = fragment
        self.outer_step += 1
        return blocked

    def _adopt_global(self, indices: range, healthy: bool) -> None:
        """Replace the fragment's local values with the global ones (mixed by alpha if healthy)."""
        healthy = healthy and all(bool(torch.isfinite(self._local[i]).all()) for i in indices)
        with torch.no_grad():
            for i in indices:
                local, target = self._local[i], self._global[i]
                if healthy and self.fragment_alpha > 0:
                    mixed = torch.lerp(target, local.to(self.backup_device, torch.float32), self.fragment_alpha)
                    local.copy_(mixed)
                else:
                    local.copy_(target)
                if not healthy:
                    self.inner_optimizer.state.pop(self._optimizer_keys[i], None)


def _optimizer_key(optimizer: torch.optim.Optimizer, tensor: torch.Tensor) -> torch.Tensor | None:
    """The parameter of `optimizer` that `tensor` is or views (same storage; a DTensor parameter
    through its local shard); None when it is none of them (nothing to drop for it)."""
    storage = tensor.untyped_storage().data_ptr()
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter is tensor:
                return parameter
            if not tensor.numel():  # an empty view shares no bytes with anything
                continue
            local = parameter._local_tensor if isinstance(parameter, DTensor) else parameter
            if local.untyped_storage().data_ptr() == storage:
                return parameter
    return None


def _transfer(
    group: dist.ProcessGroup,
    sends: dict[int, torch.Tensor],
    receives: dict[int, torch.Tensor],
    *,
    tag: int,
    deadline: float,
    timeout_s: float,
    what: tuple[int, int],
) -> None:
    """Send ``sends[peer]`` to and receive into ``receives[peer]`` from each peer (ranks in
    ``group``), all at once in chunks (module constants), and wait for every chunk until
    ``deadline`` (perf_counter). ``tag`` is the phase slot; chunk k travels as
    ``tag * _MAX_CHUNKS + k``.

    Raises DiLoCoCommunicationError naming the peers whose message failed or was still missing.
    Gloo posts and completes each message alone, so the peers are named exactly; NCCL coalesces
    the batch into one work, and then every peer of the batch is named.
    """
    ops = []
    # Receives first: a Gloo sender waits for the receiver's "ready" before it sends a chunk, and
    # posting every receive up front let both directions run at the link rate (sends first: the
    # two directions often took turns, half the rate).
    for kind, messages in ((dist.irecv, receives), (dist.isend, sends)):
        for peer, tensor in messages.items():
            size = max(_CHUNK_BYTES, -(-tensor.numel() // _CHUNKS_PER_MESSAGE))
            chunks = tensor.split(size) if tensor.numel() else (tensor,)
            for index, chunk in enumerate(chunks):
                ops.append(dist.P2POp(kind, chunk, group=group, group_peer=peer, tag=tag * _MAX_CHUNKS + index))
    reasons: dict[int, str] = {}
    pending: list[tuple[dist.Work, list[int]]] = []
    if group._get_backend(ops[0].tensor.device).supports_coalescing:
        everyone = sorted({op.group_peer for op in ops})
        try:
            pending += [(work, everyone) for work in dist.batch_isend_irecv(ops)]
        except RuntimeError as error:
            reasons.update(dict.fromkeys(everyone, _short_reason(error)))
    else:
        for op in ops:  # posting to a peer whose connection is already closed raises at once
            try:
                work = op.op(op.tensor, group=group, tag=op.tag, **{_PEER_KEY[op.op]: op.group_peer})
                pending.append((work, [op.group_peer]))
            except RuntimeError as error:
                reasons.setdefault(op.group_peer, _short_reason(error))
    for work, who in pending:
        if all(peer in reasons for peer in who):
            continue
        remaining = deadline - time.perf_counter()
        if reasons:  # already failing: give the others a moment, not the whole deadline
            remaining = min(remaining, 1.0)
        try:
            # A zero timeout means "wait forever" to torch: never pass less than a millisecond.
            work.wait(timedelta(seconds=max(remaining, 1e-3)))
        except RuntimeError as error:
            for peer in who:
                reasons.setdefault(peer, _short_reason(error))
    if reasons:
        raise DiLoCoCommunicationError(what[0], what[1], sorted(reasons), reasons, timeout_s)


_PEER_KEY = {dist.isend: "group_dst", dist.irecv: "group_src"}


def _short_reason(error: BaseException) -> str:
    """The transport's first line without its source location prefix ``[file.cc:123] ``."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return message.split("] ", 1)[1] if message.startswith("[") and "] " in message else message


# --------------------------------------------------------------------------------- helpers


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"DiLoCo(compression={compression!r}): choose one of {COMPRESSIONS}")


def _check_schedule(sync_every: int, fragments: int, fragment_delay: int, alpha: float) -> None:
    for name, value, low in (
        ("sync_every", sync_every, 1),
        ("fragments", fragments, 1),
        ("fragment_delay", fragment_delay, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"DiLoCo({name}={value!r}): must be an integer >= {low}")
    if sync_every % fragments:
        raise ValueError(
            f"DiLoCo(sync_every={sync_every}, fragments={fragments}): sync_every must be "
            f"divisible by fragments so each fragment syncs once per sync_every"
        )
    if fragment_delay >= sync_every // fragments:
        raise ValueError(
            f"DiLoCo(fragment_delay={fragment_delay}): must be < sync_every / fragments = "
            f"{sync_every // fragments}, or one fragment's exchange would overlap the next"
        )
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"DiLoCo(fragment_alpha={alpha!r}): must be a number in [0, 1]")


def _resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group to talk over; None means a group of one (torch.distributed not initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError(
                "DiLoCo(group=...): torch.distributed is not initialised; call "
                "init_process_group first, or pass group=None for a single replica"
            )
        return None
    group = dist.group.WORLD if group is None else group
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("DiLoCo(group=...): this rank is not a member of the given group")
    return group


def _wire_device(
    group: dist.ProcessGroup | None, backup_device: torch.device, model_device: torch.device
) -> torch.device:
    """Where exchanged tensors must live: the backup device if the group's backend can run
    collectives there (no copies), else the model's device (e.g. NCCL with a CPU backup), else
    a clear error instead of a silent fallback."""
    if group is None:
        return backup_device
    backend = str(dist.get_backend(group))
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl": one backend per device type
        usable = {pair.split(":")[0] for pair in backend.split(",")}
    else:
        usable = {_BACKEND_DEVICE.get(backend)}
    for device in (backup_device, model_device):
        if device.type in usable:
            return device
    raise ValueError(
        f"DiLoCo(backup_device={str(backup_device)!r}): the group's backend {backend!r} cannot "
        f"run collectives on {backup_device.type} tensors nor on the model's "
        f"{model_device.type} tensors; use gloo for CPU tensors or nccl for CUDA tensors"
    )


def _build_outer_optimizer(factory: OuterOptimizerFactory | None, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if factory is None:
        return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)
    if isinstance(factory, torch.optim.Optimizer) or not callable(factory):
        raise TypeError(
            "DiLoCo(outer_optimizer=...): pass a factory params -> Optimizer, e.g. "
            "functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True); an "
            "optimizer instance cannot be built over the global copy before DiLoCo creates it"
        )
    optimizer = factory(list(params))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"DiLoCo(outer_optimizer=...): the factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
        )
    built_over = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if built_over != {id(p) for p in params}:
        raise ValueError(
            "DiLoCo(outer_optimizer=...): the factory must build the optimizer over exactly "
            "the parameters it is given (the global copy)"
        )
    return optimizer


def split_parameters(parameters: Sequence[nn.Parameter], parts: int) -> list[list[torch.Tensor]]:
    """Cut the parameters' elements (module order, flattened) into `parts` equal contiguous shares.

    How a replica of `parts` processes shares out the cross-replica exchange: process k passes
    share k to its DiLoCo as `parameters`. A share is a list of 1-D views into the parameters (a
    tensor may be cut between two shares), so writing a share writes the model; element counts
    differ by at most one between shares. Raises ValueError for fewer elements than parts.
    """
    flat = [p.view(-1) for p in parameters]
    total = sum(f.numel() for f in flat)
    if total < parts:
        raise ValueError(f"split_parameters: {total} elements cannot fill {parts} non-empty shares")
    bounds = [total * k // parts for k in range(parts + 1)]
    shares: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    start = 0
    for tensor in flat:
        end = start + tensor.numel()
        for k in range(parts):
            lo, hi = max(start, bounds[k]), min(end, bounds[k + 1])
            if lo < hi:
                shares[k].append(tensor[lo - start : hi - start])
        start = end
    return shares


def _split_contiguous(numels: list[int], parts: int) -> list[range]:
    """Split indices 0..n-1 into ``parts`` contiguous non-empty ranges of balanced total size."""
    count, total = len(numels), sum(numels)
    cumulative = list(itertools.accumulate(numels))
    bounds = [0]
    for k in range(1, parts):
        cut = next(i + 1 for i, running in enumerate(cumulative) if running * parts >= k * total)
        # Each range keeps at least one tensor, and leaves one for every range after it.
        bounds.append(min(max(cut, bounds[-1] + 1), count - (parts - k)))
    bounds.append(count)
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def _num_blocks(numel: int) -> int:
    return math.ceil(numel / QUANT_BLOCK)


def _pad(flat: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(flat, (0, length - flat.numel()))
