"""A replica's model sharded over its ranks (FSDP2), and what sharding asks of the rest of the run.

Why: with `parallel.sharding: none` every rank of a replica holds the whole model, its gradients
and its AdamW state (16 bytes a parameter) plus DiLoCo's global copy and momentum (8 more), so a
model larger than one device cannot start however many ranks a replica has. Under `fsdp` each
decoder layer and the root are `fully_shard`ed over the replica's ranks
(`torch.distributed.fsdp.fully_shard`, FSDP2): rank k keeps rows k/S of every parameter, and its
gradients, AdamW state, DiLoCo global copy and outer momentum follow those rows, so a rank holds
1/S of all of it. DiLoCo runs unchanged on the local shards (`local_shards`): rank k's shard covers
the same rows in every replica (FSDP2 cuts dim 0 like `torch.chunk`, a function of the shape, S
and k alone), so the exchange of shard k with rank k of the other replicas is elementwise the
exchange the whole model would make (HSDP: shard inside a replica, replicate across; torchtitan
and torchft run DiLoCo over FSDP2 replicas the same way).

What sharding asks of everyone else, and where it is answered:

- Every forward of a sharded module is a collective over the replica (it all-gathers each layer),
  so the ranks of a replica must run the same forwards in the same order. Sampling, evaluation,
  probes and the DPO reference's scoring differ per rank (prompts, stop times, pair counts): they
  run inside `unsharded`, which gathers each module once and then needs no collective at all.
  The loss's forwards are made equal by the step (`trainer.run.step`).
- The root is given `reshard_after_forward=True` (FSDP2's default keeps the root gathered after
  a forward): after a forward without backward the root's parameters would otherwise stay plain
  tensors, and writes to the shards (AdamW, a DiLoCo sync, a checkpoint load) would be invisible
  to the next forward. The price is one more gather of the root in the backward.
- `copy.deepcopy` refuses an FSDP module: the EMA teacher and the DPO reference are copied before
  sharding and sharded the same way (`shard`).
- Hashes of a sharded model are of the full parameters (`full_parameters_hash`), so replicas are
  compared as wholes; weights for an inference engine are gathered one FSDP group (one decoder
  layer) at a time (`full_weights`, `push_weights`).
- Checkpoints are torch.distributed.checkpoint folders, each rank writing its own shards
  (`trainer.checkpoint.TrainingState` with a process group); `ShardedDiLoCoState` lays DiLoCo's
  per-rank state out like the parameters it mirrors.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from trainer.checkpoint import pack, unpack
from trainer.diloco import DiLoCo, parameters_hash
from trainer.run.topology import Topology

__all__ = [
    "ShardedDiLoCoState",
    "WeightPushTimeout",
    "checkpoint_activations",
    "decoder_layers",
    "full_parameters_hash",
    "full_weights",
    "is_sharded",
    "local_shards",
    "mixed_precision",
    "push_weights",
    "replica_mesh",
    "shard",
    "unsharded",
]


class WeightPushTimeout(TimeoutError):
    """A push of the full weights to an inference engine did not finish within its deadline."""


def replica_mesh(topo: Topology) -> DeviceMesh:
    """The 1-D device mesh of this replica's ranks (what `shard` shards over).

    Reuses the replica's process group (`trainer.run.topology.init_distributed`); a replica of one
    process gets a group of one, so `replica_size: 1` runs the same code path with no collectives.
    Raises RuntimeError when torch.distributed is not initialised.
    """
    if not dist.is_initialized():
        raise RuntimeError("parallel.sharding fsdp needs torch.distributed (init_distributed initialises it)")
    group = topo.inner_group
    if group is None:  # only this rank: no other rank needs to take part in creating it
        group = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return DeviceMesh.from_group(group, device)


def mixed_precision(dtype: torch.dtype | None) -> MixedPrecisionPolicy | None:
    """FSDP's policy for `model.dtype`: None for fp32; for bf16, bf16 parameters for compute and
    fp32 gradient reduction, over fp32 master shards.

    Why not autocast (`trainer.precision`), as unsharded runs do: the policy all-gathers bf16 (half
    the bytes of fp32), and the gathered parameters that forward, backward and generation hold are
    bf16 (half the memory), while the shards, the reduced gradients and AdamW's state stay fp32, so
    precision.py's argument for fp32 master weights holds unchanged. Autocast over fp32 shards
    would gather and hold fp32 parameters and cast them again at every matmul.
    """
    if dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM (`model.model.layers`), the unit of sharding
    and of activation checkpointing. Raises ValueError for a model without them."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__}: no decoder layers at .model.layers to shard")
    return list(layers)


def checkpoint_activations(model: nn.Module) -> None:
    """Switch on activation checkpointing of every decoder layer (`parallel.activation_checkpointing`):
    each layer keeps only its input for the backward and recomputes the rest, non-reentrant
    (`torch.utils.checkpoint`), the same losses. Before `shard`, as FSDP2 wants it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (the old name warns there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def shard(model: nn.Module, mesh: DeviceMesh, *, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm and lm_head), in place.

    Tied embeddings stay tied: neither `embed_tokens` nor `lm_head` is wrapped alone, so both land
    in the root's group (wrapping one alone breaks the tie). The root reshards after its forward
    (see the module docstring). Activation checkpointing, when wanted, must be switched on before
    (`checkpoint_activations`). Returns `model`, now an `FSDPModule` whose parameters are
    DTensors sharded on dim 0 over `mesh`.
    """
    options: dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True, **options)
    fully_shard(model, reshard_after_forward=True, **options)
    return model


def is_sharded(model: nn.Module | None) -> bool:
    return isinstance(model, FSDPModule)


def local_shards(model: nn.Module) -> list[Tensor]:
    """This rank's shards of the trainable parameters (module order), as plain tensors that alias
    the FSDP shards: AdamW and a DiLoCo sync writing them write the model. For an unsharded model,
    the parameters themselves.

    Taken under no_grad: a `to_local()` taken with grad on is an autograd view, which the first
    in-place write after AdamW's refuses."""
    with torch.no_grad():
        return [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters() if p.requires_grad]


def _fsdp_modules(modules: tuple[nn.Module | None, ...]) -> list[FSDPModule]:
    found: list[FSDPModule] = []
    for module in modules:
        if is_sharded(module):
            found += [m for m in module.modules() if isinstance(m, FSDPModule)]
    return found


@contextlib.contextmanager
def unsharded(*modules: nn.Module | None) -> Iterator[None]:
    """Gather every FSDP group of `modules` once, then run any number of forwards, different on
    every rank, with no collective; reshard on the way out. A no-op for unsharded modules (and None).

    Why: sampling lets each rank stop when its own sequences end, and each rank scores its own
    pairs; FSDP's per-layer all-gather inside each forward would then pair different forwards of
    different ranks (a hang, or a Gloo size mismatch). transformers' `synced_gpus` instead keeps
    finished ranks forwarding, with an all-reduce over the default (world) group per token, which
    couples the replicas. Memory meanwhile is the full parameters (in the policy's compute dtype)
    while gradients and optimizer state stay sharded. The gathers are collectives: every rank of
    the replica enters and leaves together, in module order.
    """
    groups = _fsdp_modules(modules)
    for group in groups:
        group.unshard()
    for module in modules:
        if is_sharded(module):
            module.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for group in groups:
            group.reshard()
        for module in modules:
            if is_sharded(module):
                module.set_reshard_after_forward(True)  # every group, the root included (see `shard`)


def _own_parameters(module: nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
    """`module`'s parameters that no nested FSDP group owns (tied ones once), with full names."""
    nested = [name for name, m in module.named_modules() if name and isinstance(m, FSDPModule)]
    for name, parameter in module.named_parameters():
        if not any(name.startswith(f"{n}.") for n in nested):
            yield f"{prefix}{name}", parameter


@torch.no_grad()
def full_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor) for every parameter of `model` (tied ones once), gathered one FSDP group
    (the root, then one decoder layer at a time) so that memory stays bounded by the largest
    group, never a full copy of the model per rank.

    Every rank of the replica must iterate to the end, in step: each group's gather is a
    collective, and the order is the same everywhere: the root's own parameters (embeddings,
    final norm, an untied lm_head), then each decoder layer's, in module order. The tensors are copies the
    caller owns, in the gathered dtype (the compute dtype under a mixed-precision policy: what
    an inference engine runs); they stay valid after the group reshards. An unsharded model
    yields copies of its parameters, with no collective.
    """
    if not is_sharded(model):
        for name, parameter in model.named_parameters():
            yield name, parameter.detach().clone()
        return
    for prefix, group in [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]:
        group.unshard()
        try:
            for name, parameter in _own_parameters(group, f"{prefix}." if prefix else ""):
                yield name, parameter.detach().clone()
        finally:
            group.reshard()


def push_weights(
    model: nn.Module, push: Callable[[str, Tensor], object], *, timeout_s: float, receiver: bool = True
) -> int:
    """Hand an inference engine the full weights, layer by layer (`full_weights`), within `timeout_s`.

    Every rank of the replica calls it (each takes part in every gather, in the same order); the
    ranks with `receiver` call `push(name, tensor)` for each tensor, the others only gather. Each
    push runs on a helper thread and the whole push has a deadline: an engine that stops reading
    raises here, on the pushing rank, instead of hanging it forever (TRL #7103: rank 0's send to
    the engine blocked while the other ranks waited in the next gather). The other ranks then fail
    in their gather after the process group's timeout (`dist_timeout_s`), so keep `timeout_s`
    below it. Returns the number of tensors pushed (0 on non-receivers).

    Raises:
        WeightPushTimeout: naming the tensor whose push was still running at the deadline.
        Whatever `push` raised.
    """
    deadline = time.perf_counter() + timeout_s
    pushed = 0
    for name, tensor in full_weights(model):
        if not receiver:
            continue
        outcome: list[BaseException] = []

        def run(name: str = name, tensor: Tensor = tensor, outcome: list[BaseException] = outcome) -> None:
            try:
                push(name, tensor)
            except BaseException as error:  # handed to the caller's thread below
                outcome.append(error)

        thread = threading.Thread(target=run, name=f"push-{name}", daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.perf_counter()))
        if thread.is_alive():
            raise WeightPushTimeout(f"pushing {name} to the inference engine did not finish within {timeout_s:g} s")
        if outcome:
            raise outcome[0]
        pushed += 1
    return pushed


@torch.no_grad()
def full_parameters_hash(model: nn.Module) -> str:
    """`trainer.diloco.parameters_hash` of the full fp32 parameters, equal to the unsharded model's
    hash for the same weights. Under fsdp a collective over the replica (one gather per parameter,
    so memory stays one tensor): every rank of the replica must call it."""
    if not is_sharded(model):
        return parameters_hash(model)
    return parameters_hash(p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters())


class ShardedDiLoCoState:
    """DiLoCo's state for a sharded checkpoint (`trainer.checkpoint.TrainingState` with a process
    group): the global copy and the outer momentum as DTensors laid out like the parameters they
    mirror (stored sharded, by parameter name), the rest (counters, settings, error-feedback
    residuals, the outer optimizer's hyper-parameters) under a key of this rank's own.

    The momentum is always there, zeros before the first outer step: a checkpoint load fills only
    the keys its template has, and a fresh outer SGD has no momentum yet (SGD treats a zero buffer
    as it treats a missing one, with dampening 0). Outer optimizers other than SGD are refused.
    """

    def __init__(self, diloco: DiLoCo, model: nn.Module, local_rank: int) -> None:
        if not isinstance(diloco.outer_optimizer, torch.optim.SGD):
            raise NotImplementedError(
                f"sharded checkpoints save an SGD outer optimizer, not {type(diloco.outer_optimizer).__name__}"
            )
        self.diloco, self.local_rank = diloco, local_rank
        self.parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.momentum = diloco.outer_optimizer.param_groups[0]["momentum"] > 0

    def _as_parameter(self, local: Tensor, parameter: Tensor) -> Tensor:
        if not isinstance(parameter, DTensor):
            return local
        return DTensor.from_local(
            local,
            parameter.device_mesh,
            parameter.placements,
            shape=parameter.shape,
            stride=parameter.stride(),
            run_check=False,
        )

    def state_dict(self) -> dict[str, Any]:
        state = self.diloco.state_dict()
        globals_ = state.pop("global_parameters")
        outer = state.pop("outer_optimizer")
        state["outer_param_groups"] = outer["param_groups"]
        out: dict[str, Any] = {
            "global": {name: self._as_parameter(g, p) for (name, p), g in zip(self.parameters, globals_, strict=True)},
            f"rank{self.local_rank}": pack(state),
        }
        if self.momentum:
            buffers = [outer["state"].get(i, {}).get("momentum_buffer") for i in range(len(globals_))]
            out["momentum"] = {
                name: self._as_parameter(b if b is not None else torch.zeros_like(g), p)
                for (name, p), g, b in zip(self.parameters, globals_, buffers, strict=True)
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rest = unpack(state[f"rank{self.local_rank}"])
        local = [_local(state["global"][name]) for name, _ in self.parameters]
        outer_state = {}
        if self.momentum:
            outer_state = {
                i: {"momentum_buffer": _local(state["momentum"][name]).clone()}
                for i, (name, _) in enumerate(self.parameters)
            }
        rest["global_parameters"] = local
        rest["outer_optimizer"] = {"state": outer_state, "param_groups": rest.pop("outer_param_groups")}
        self.diloco.load_state_dict(rest)


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
