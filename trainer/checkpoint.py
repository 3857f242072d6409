"""Atomic checkpoints of everything a resumed run needs, one folder per outer step.

Layout under `<run_dir>/checkpoints/`:

    reference.safetensors        frozen reference policy (after the warm-up); written once
    step-000012/
        replica-<id>.safetensors this replica's parameters
        replica-<id>.pt          inner optimizer, DiLoCo state, replay buffer, position
        COMPLETE                 written last, by outer rank 0, once every replica has saved

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file under a real name; a folder without COMPLETE is ignored on resume. Replicas
keep their own files because inner AdamW state differs between them; they are keyed by the
stable replica id, not the torch rank, which changes after an elastic restart.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

COMPLETE = "COMPLETE"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def step_dir(root: Path, outer_step: int) -> Path:
    return root / f"step-{outer_step:06d}"


def save_replica(root: Path, outer_step: int, replica_id: int, model: torch.nn.Module, state: dict[str, Any]) -> None:
    """This replica's share of the checkpoint for `outer_step`."""
    folder = step_dir(root, outer_step)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / f"replica-{replica_id}.safetensors", lambda p: save_model(model, str(p)))
    _atomic(folder / f"replica-{replica_id}.pt", lambda p: torch.save(state, p))


def mark_complete(root: Path, outer_step: int, info: dict[str, Any], keep: int) -> None:
    """Seal a step once every replica has saved it, then drop all but the newest `keep`."""
    _atomic(step_dir(root, outer_step) / COMPLETE, lambda p: p.write_text(json.dumps(info)))
    complete = complete_steps(root)
    for old in complete[:-keep]:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)
    for partial in root.glob("step-*"):
        if not (partial / COMPLETE).exists() and int(partial.name[5:]) < outer_step:
            shutil.rmtree(partial, ignore_errors=True)


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
    _atomic(root / "reference.safetensors", lambda p: save_model(model, str(p)))


def load_reference(root: Path, model: torch.nn.Module) -> bool:
    """Fill `model` with the saved reference; False when there is none yet."""
    path = root / "reference.safetensors"
    if not path.exists():
        return False
    load_model(model, str(path))
    return True
