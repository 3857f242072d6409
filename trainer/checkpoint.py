"""Atomic checkpoints of everything a resumed run needs, one folder per outer step.

Layout under `<run_dir>/checkpoints/`:

    reference.safetensors        frozen reference policy (after the warm-up); written once
    step-000012/
        replica-<id>.safetensors this replica's parameters
        replica-<id>.pt          inner optimizer, DiLoCo state, replay buffer, position
        COMPLETE                 written last, by outer rank 0, once every replica has saved

What a replica's state *is* lives in one place, `TrainingState`: a mapping of named stateful
members that `save` and `load` both walk, so a member that is saved is always loaded; adding one
is one line where the state is built, and a member that is off (no EMA teacher, no DPO) is absent.

Every file is written to a temporary name, fsynced and renamed into place (then the folder is
fsynced), so a crash or power loss never leaves a half-written file under a real name; a folder
without COMPLETE is ignored on resume. Replicas keep their own files because inner AdamW state
differs between them; they are keyed by the stable replica id, not the torch rank, which changes
after an elastic restart.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_model, save_model

COMPLETE = "COMPLETE"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write `path` so that a crash or power loss never leaves it half-written under its name: the
    content goes to a temporary name beside it, is fsynced, renamed into place, and the folder is
    fsynced (the rename). The one atomic file write of the project (checkpoints, summary.json,
    cluster.json, the trace command's outputs).

    content: text (UTF-8), bytes, or a function that writes the temporary path it is given (for
    library writers such as `safetensors.torch.save_model`, or streaming a large file). Returns
    `path`. Raises what the write raises (OSError); the temporary file is then removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)
    return path


def step_dir(root: Path, outer_step: int) -> Path:
    return root / f"step-{outer_step:06d}"


def save_replica(root: Path, outer_step: int, replica_id: int, model: torch.nn.Module, state: dict[str, Any]) -> None:
    """This replica's share of the checkpoint for `outer_step`."""
    folder = step_dir(root, outer_step)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"replica-{replica_id}.safetensors", lambda p: save_model(model, str(p)))
    atomic_write(folder / f"replica-{replica_id}.pt", lambda p: torch.save(state, p))


def mark_complete(root: Path, outer_step: int, info: dict[str, Any], keep: int) -> None:
    """Seal a step once every replica has saved it, then drop all but the newest `keep`."""
    atomic_write(step_dir(root, outer_step) / COMPLETE, json.dumps(info))
    complete = complete_steps(root)
    for old in complete[:-keep]:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)
    for partial in root.glob("step-*"):
        if not (partial / COMPLETE).exists() and int(partial.name[5:]) < outer_step:
            shutil.rmtree(partial, ignore_errors=True)


def step_info(root: Path, outer_step: int) -> dict[str, Any]:
    """What `mark_complete` recorded for a sealed step (round, replicas, world size)."""
    return json.loads((step_dir(root, outer_step) / COMPLETE).read_text() or "{}")


def complete_steps(root: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in root.glob(f"step-*/{COMPLETE}"))


def latest_complete(root: Path) -> int | None:
    steps = complete_steps(root)
    return steps[-1] if steps else None


def load_replica(root: Path, outer_step: int, replica_id: int, model: torch.nn.Module) -> dict[str, Any]:
    """Load parameters into `model` and return the state saved beside them."""
    folder = step_dir(root, outer_step)
    weights = folder / f"replica-{replica_id}.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"{weights}: checkpoint has no files for replica {replica_id} "
            f"(saved replicas: {sorted(p.stem for p in folder.glob('replica-*.safetensors'))})"
        )
    load_model(model, str(weights))
    return torch.load(folder / f"replica-{replica_id}.pt", weights_only=False)


def save_reference(root: Path, model: torch.nn.Module) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / "reference.safetensors", lambda p: save_model(model, str(p)))


def load_reference(root: Path, model: torch.nn.Module) -> bool:
    """Fill `model` with the saved reference; False when there is none yet."""
    path = root / "reference.safetensors"
    if not path.exists():
        return False
    load_model(model, str(path))
    return True


class Stateful(Protocol):
    """What a registry member offers: torch's `state_dict` / `load_state_dict` pair."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


class PerProcessState:
    """A member whose state differs between the processes of one replica (each one's share of the
    DiLoCo exchange): saved as the list of every process's state, each loading its own."""

    def __init__(self, member: Stateful, group: Any, local_rank: int, size: int) -> None:
        self.member, self.group, self.local_rank, self.size = member, group, local_rank, size

    def state_dict(self) -> list[Any]:
        states: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(states, self.member.state_dict(), group=self.group)
        return states

    def load_state_dict(self, states: list[Any]) -> None:
        if len(states) != self.size:
            raise ValueError(
                f"checkpoint holds {len(states)} per-process states, this replica has {self.size} processes"
            )
        self.member.load_state_dict(states[self.local_rank])


class TrainingState:
    """One registry of a replica's training state; `save` and `load` walk the same mapping.

    Args:
        model: the policy; its parameters go to `replica-<id>.safetensors` (tied weights kept).
        members: every other stateful part by name (inner optimizer, DiLoCo, EMA teacher, DPO
            replay, ...); a member passed as None is off and simply absent from the registry.

    The position in the run (`round`) is saved beside the members; `load` returns it.
    """

    def __init__(self, model: torch.nn.Module, **members: Stateful | None) -> None:
        self.model = model
        self.members: dict[str, Stateful] = {name: m for name, m in members.items() if m is not None}

    def save(self, root: Path, outer_step: int, replica_id: int, *, round_index: int, write: bool = True) -> None:
        """This replica's share of the checkpoint for `outer_step` (atomic, fsynced files).

        Every process of the replica calls it (a member's `state_dict` may gather from all of
        them); the one with `write` writes the files.
        """
        state = {"round": round_index, **{name: member.state_dict() for name, member in self.members.items()}}
        if write:
            save_replica(root, outer_step, replica_id, self.model, state)

    def load(self, root: Path, outer_step: int, replica_id: int) -> int:
        """Fill the model and every member from the checkpoint; returns the saved round.

        Raises:
            FileNotFoundError: the checkpoint has no files for this replica.
            KeyError: a registered member is missing from the checkpoint (the run was saved with
                that part off); the message names the members saved and the ones asked for.
        """
        state = load_replica(root, outer_step, replica_id, self.model)
        missing = sorted(set(self.members) - set(state))
        if missing:
            saved = sorted(k for k in state if k != "round")
            raise KeyError(
                f"{step_dir(root, outer_step)}/replica-{replica_id}.pt holds {saved}, not {missing}: the run was "
                "saved with other parts switched on; resume with the same config or start a fresh run"
            )
        for name, member in self.members.items():
            member.load_state_dict(state[name])
        return int(state["round"])
