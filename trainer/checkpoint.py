"""Atomic checkpoints of everything a resumed run needs, one folder per outer step.

Layout under `<run_dir>/checkpoints/`:

    reference.safetensors        frozen reference policy (after the warm-up); written once
    step-000012/
        replica-<id>.safetensors this replica's parameters
        replica-<id>.pt          inner optimizer, DiLoCo state, replay buffer, position
        replica-<id>/            instead of the two files when the model is sharded
                                 (`parallel.sharding: fsdp`): a torch.distributed.checkpoint
                                 folder, `.metadata` + one `__<rank>_0.distcp` per rank
        COMPLETE                 written last, by outer rank 0, once every replica has saved:
                                 JSON with the round, the replicas and the size of every file

Only folders named exactly `step-NNNNNN` (what `step_dir` writes) are checkpoints: a backup copy
(`step-000008.bak`), a converted export (`step-000004-hf`) or anything else beside them is
ignored, never parsed, never swept.

What a replica's state *is* lives in one place, `TrainingState`: a mapping of named stateful
members that `save` and `load` both walk, so a member that is saved is always loaded; adding one
is one line where the state is built, and a member that is off (no EMA teacher, no DPO) is absent.

Every file is written to a temporary name, fsynced and renamed into place (then the folder is
fsynced), so a crash or power loss never leaves a half-written file under a real name; a sharded
replica's folder is written under a temporary name by all its ranks and renamed as a whole; a
folder without COMPLETE is ignored on resume. Sharded checkpoints go through
torch.distributed.checkpoint (DCP): every rank writes and reads only its own shards, so no rank
ever holds the whole model to save or load it, and DCP reshards parameters and optimizer state
on load. A sealed folder whose files were damaged afterwards
(truncated by a full disk or an interrupted copy, unreadable, removed) is found before anything
is loaded and skipped with a warning naming the file: the run resumes from the newest sealed
step whose files verify (`verify_sealed`, `resume_step`), so a damaged checkpoint never puts a
restarting run into a crash loop. Replicas keep their own files because inner AdamW state
differs between them; they are keyed by the stable replica id, not the torch rank, which changes
after an elastic restart.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """Sealed checkpoints exist but none can be resumed; the message names the folder and what to do."""


_STEP_NAME = re.compile(r"step-(\d{6,})")
logger = logging.getLogger(__name__)


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's: its entries, e.g. a rename) content to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def strict_json(data: Any, **dumps: Any) -> str:
    """`data` as strict JSON text (RFC 8259): what every JSON file and line the project writes goes through.

    Python's `json.dumps` writes NaN and Infinity by default, which are not JSON: readers in other
    languages (JavaScript's JSON.parse, Go's encoding/json, jq) refuse the whole file. Here a
    non-finite float becomes `null`; inside an object, `<key>_reason` beside it says what it was
    ("nan", "inf", "-inf"), unless the object already gives a `<key>_reason` (a writer that knows
    why, e.g. `reward_rise_sigmas_reason: "no variation"`, wins). Nested objects and lists are
    walked; a non-finite float in a list becomes `null` alone. `dumps`: `json.dumps` keywords
    (indent, ensure_ascii, ...). Raises TypeError for what `json.dumps` cannot encode.
    """
    return json.dumps(finite(data), allow_nan=False, **dumps)


def finite(data: Any) -> Any:
    """`data` with every non-finite float replaced as `strict_json` describes (a new object; `data` is untouched)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out[key] = finite(value)
            if isinstance(value, float) and not math.isfinite(value):
                out.setdefault(f"{key}_reason", data.get(f"{key}_reason", str(value)))
        return out
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


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
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)
    return path


def step_dir(root: Path, outer_step: int) -> Path:
    return root / f"step-{outer_step:06d}"


def step_of(folder: Path) -> int | None:
    """The outer step a checkpoint folder holds; None for any other name (`step-000008.bak`,
    `step-000004-hf`, `step-8`): only the exact name `step_dir` writes is a checkpoint."""
    match = _STEP_NAME.fullmatch(folder.name)
    if match is None or folder.name != step_dir(folder.parent, int(match[1])).name:
        return None
    return int(match[1])


def _step_folders(root: Path) -> dict[int, Path]:
    return {step: p for p in root.glob("step-*") if p.is_dir() and (step := step_of(p)) is not None}


def save_replica(root: Path, outer_step: int, replica_id: int, model: torch.nn.Module, state: dict[str, Any]) -> None:
    """This replica's share of the checkpoint for `outer_step`.

    A folder already sealed under this step (left by a timeline the run fell back from, see
    `mark_complete`) is unsealed first, so that it never counts as complete while its files are
    being replaced.
    """
    folder = step_dir(root, outer_step)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMPLETE).unlink(missing_ok=True)
    atomic_write(folder / f"replica-{replica_id}.safetensors", lambda p: save_model(model, str(p)))
    atomic_write(folder / f"replica-{replica_id}.pt", lambda p: torch.save(state, p))


def mark_complete(root: Path, outer_step: int, info: dict[str, Any], keep: int) -> None:
    """Seal a step once every replica has saved it, then drop all but the newest `keep`.

    The seal records `info` plus `files`, the size in bytes of every replica file in the folder
    (a sharded replica's files by their path inside it, `replica-0/__1_0.distcp`), which
    `verify_step` checks before a resume. Also dropped: unsealed step folders older than
    `outer_step`, and sealed ones newer than it, which belong to a timeline the run left when it
    fell back past a damaged checkpoint (so they are never resumed from). Folders whose names
    are not checkpoints (`step_of` is None) are left alone.
    """
    folder = step_dir(root, outer_step)
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for top in sorted(folder.glob("replica-*"))
        for p in ([top] if top.is_file() else sorted(top.rglob("*")))
        if p.is_file()
    }
    atomic_write(folder / COMPLETE, strict_json({**info, "files": files}))
    for step, path in _step_folders(root).items():
        sealed = (path / COMPLETE).exists()
        if (sealed and step > outer_step) or (not sealed and step < outer_step):
            shutil.rmtree(path, ignore_errors=True)
    for old in complete_steps(root)[:-keep]:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)


def step_info(root: Path, outer_step: int) -> dict[str, Any]:
    """What `mark_complete` recorded for a sealed step (round, replicas, world size, file sizes)."""
    return json.loads((step_dir(root, outer_step) / COMPLETE).read_text() or "{}")


def complete_steps(root: Path) -> list[int]:
    """The sealed steps in `root`, oldest first (folders named as `step_dir` writes them only)."""
    return sorted(step for step, path in _step_folders(root).items() if (path / COMPLETE).is_file())


def latest_complete(root: Path) -> int | None:
    """The newest sealed step, its files unchecked (`latest_loadable` checks them)."""
    steps = complete_steps(root)
    return steps[-1] if steps else None


def verify_step(root: Path, outer_step: int) -> str | None:
    """What is wrong with a sealed step's files, naming the file; None when they verify.

    Checked without loading any tensor, so the cost does not grow with the model: the seal is a
    JSON object; every file it lists (`mark_complete` records sizes) exists with that size
    (catches truncation by a full disk, a cut copy, a removed file); every replica has both its
    files; each `.safetensors` header parses and covers the file exactly (`safetensors.safe_open`
    reads the header only); each `.pt` is a readable zip archive, the format `torch.save` writes,
    whose central directory sits at its very end (so any truncation is caught); each sharded
    replica folder's DCP `.metadata` reads, and every byte range it records lies inside a file
    that exists (so a lost or truncated rank file is caught even without sizes). Sizes were
    chosen over content hashes because hashing would read every checkpoint byte again when
    sealing and on every start, which grows with the model; the price is that same-size
    corruption inside a file (a flipped bit) is not caught here. Seals written before sizes were
    recorded get the structural checks only.
    """
    folder = step_dir(root, outer_step)
    seal = folder / COMPLETE
    try:
        info = json.loads(seal.read_text() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{seal}: unreadable seal ({error})"
    if not isinstance(info, dict):
        return f"{seal}: the seal is not a JSON object"
    sizes = info.get("files") if isinstance(info.get("files"), dict) else {}
    for name, size in sorted(sizes.items()):
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError as error:
            return f"{path}: missing or unreadable ({error.strerror or error})"
        if actual != size:
            what = "truncated" if actual < size else "grown"
            return f"{path}: {what}: {actual} bytes, sealed with {size}"
    weights = {p.name.removesuffix(".safetensors") for p in folder.glob("replica-*.safetensors")}
    states = {p.name.removesuffix(".pt") for p in folder.glob("replica-*.pt")}
    sharded = sorted(p for p in folder.glob("replica-*") if p.is_dir())
    if not weights and not states and not sharded:
        return f"{folder}: sealed but holds no replica files"
    for path in sharded:
        problem = _verify_sharded(path)
        if problem is not None:
            return problem
    unpaired = sorted(weights ^ states)
    if unpaired:
        name = unpaired[0]
        missing = f"{name}.pt" if name in weights else f"{name}.safetensors"
        return f"{folder / missing}: missing (its partner file is there)"
    for name in sorted(weights):
        path = folder / f"{name}.safetensors"
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (OSError, SafetensorError) as error:
            return f"{path}: unreadable safetensors ({error})"
        path = folder / f"{name}.pt"
        try:
            with zipfile.ZipFile(path):
                pass
        except (OSError, zipfile.BadZipFile) as error:
            return f"{path}: unreadable torch.save archive ({error})"
    return None


def _verify_sharded(folder: Path) -> str | None:
    """What is wrong with one DCP folder, from its `.metadata` alone; None when it verifies."""
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as error:  # noqa: BLE001 - a damaged pickle raises anything
        return f"{folder / '.metadata'}: unreadable checkpoint metadata ({type(error).__name__}: {error})"
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        path = folder / info.relative_path
        if info.relative_path not in sizes:
            try:
                sizes[info.relative_path] = path.stat().st_size
            except OSError as error:
                return f"{path}: missing or unreadable ({error.strerror or error})"
        if info.offset + info.length > sizes[info.relative_path]:
            return (
                f"{path}: truncated: {sizes[info.relative_path]} bytes, the metadata needs {info.offset + info.length}"
            )
    return None


def verify_sealed(root: Path) -> dict[int, bool]:
    """Every sealed step in `root` -> whether its files verify (`verify_step`).

    Logs one warning per damaged step newer than the newest one that verifies (the steps a
    resume from this disk skips), naming the damaged file; older damaged steps are not used
    and are dropped in time by `mark_complete`'s `keep`.
    """
    verdicts = {step: verify_step(root, step) for step in complete_steps(root)}
    good = [step for step, problem in verdicts.items() if problem is None]
    for step, problem in verdicts.items():
        if problem is not None and step > max(good, default=-1):
            logger.warning("checkpoint step-%06d is damaged, not resuming from it: %s", step, problem)
    return {step: problem is None for step, problem in verdicts.items()}


def resume_step(root: Path, views: Sequence[dict[int, bool] | None], lead: int) -> int | None:
    """The step every rank resumes from, given each rank's `verify_sealed` of its own disk.

    Args:
        root: the checkpoint directory (named in the error).
        views: one entry per rank (as `all_gather_object` returns them); None for a rank that did
            not look (one rank per disk is enough).
        lead: the index of the lead rank, whose disk decides, as it always has.

    Returns the newest step sealed and verified on the lead's disk that no disk reports damaged;
    None when no disk holds a sealed step (a fresh run). A step another disk has not sealed is
    not vetoed: its replicas' files may be complete there all the same, and if not,
    `load_replica` names the missing file. Every rank computes the same answer from the same
    gathered views.

    Raises:
        CheckpointError: sealed steps exist but every one is damaged somewhere: starting over would
            silently throw the run's progress away, so the run stops (one line, exit status 2)
            until they are repaired or moved away.
    """
    damaged = {step for view in views if view for step, ok in view.items() if not ok}
    good = [step for step, ok in (views[lead] or {}).items() if ok and step not in damaged]
    if good:
        return max(good)
    sealed = sorted(damaged | set(views[lead] or {}))
    if sealed:
        raise CheckpointError(
            f"{root}: every sealed checkpoint is damaged (steps {', '.join(map(str, sealed))}; the warnings above "
            "name the files): repair them, or move them away to start this run over"
        )
    return None


def latest_loadable(root: Path) -> int | None:
    """The newest sealed step in `root` whose files verify, for one process on one disk; warns as
    `verify_sealed` does for the newer damaged ones. None: nothing sealed, a fresh run.

    Raises:
        CheckpointError: sealed steps exist and none verifies (see `resume_step`).
    """
    return resume_step(root, [verify_sealed(root)], 0)


def load_replica(root: Path, outer_step: int, replica_id: int, model: torch.nn.Module) -> dict[str, Any]:
    """Load parameters into `model` and return the state saved beside them."""
    folder = step_dir(root, outer_step)
    weights = folder / f"replica-{replica_id}.safetensors"
    if not weights.exists() and (folder / f"replica-{replica_id}").is_dir():
        raise FileNotFoundError(
            f"{folder / f'replica-{replica_id}'}: a sharded checkpoint (saved with parallel.sharding fsdp); "
            "resume with the same parallel.sharding, or export it with python -m trainer.export"
        )
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


def pack(value: Any) -> bytes:
    """`value` as `torch.save` bytes: one opaque entry in a sharded checkpoint (a rank's own state)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def unpack(data: bytes) -> Any:
    """Inverse of `pack` (the project's own checkpoint: full unpickling, as `torch.load` of `.pt`)."""
    return torch.load(io.BytesIO(data), weights_only=False)


def model_state(model: torch.nn.Module, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's state dict (`state`, default `model.state_dict()`) without the second name of a
    tied parameter (`lm_head.weight` when it is `embed_tokens.weight`): stored once, loaded once."""
    state = model.state_dict() if state is None else state
    keep = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: value for name, value in state.items() if name in keep or name not in _all_parameter_names(model)}


def _all_parameter_names(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters(remove_duplicate=False)}


def load_sharded_model(folder: Path, model: torch.nn.Module) -> None:
    """Fill an ordinary (unsharded) `model` from a sharded replica folder, in one process with no
    process group (`trainer.export`); only the model's bytes are read.

    Raises FileNotFoundError (no such folder), KeyError (the checkpoint lacks a parameter the
    model has) naming the folder."""
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder}: not a sharded checkpoint folder (no .metadata)")
    target = {"model": model_state(model)}
    try:
        dcp.load(target, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    except CheckpointException as error:
        raise KeyError(f"{folder}: does not fit the model ({str(error).strip().splitlines()[-1]})") from None
    missing, unexpected = model.load_state_dict(target["model"], strict=False)
    tied = _all_parameter_names(model) - {name for name, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise KeyError(f"{folder}: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")


class Stateful(Protocol):
    """What a registry member offers: torch's `state_dict` / `load_state_dict` pair."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


class PerProcessState:
    """A member whose state differs between the processes of one replica (each one's share of the
    DiLoCo exchange, each one's DPO pairs): saved as the list of every process's state, each loading
    its own. In a sharded checkpoint each process writes its own state under a key of its own
    instead (no gather)."""

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
        process_group: the replica's ranks when `model` is sharded over them (FSDP2): the
            checkpoint is then a torch.distributed.checkpoint folder `replica-<id>/` that every rank
            writes its shards to. The model and a `torch.optim.Optimizer` member go through
            `get_state_dict` (DTensors keyed by parameter name, resharded on load); a
            `PerProcessState` member is stored per rank; any other member's `state_dict` must be
            DTensors or values equal on every rank of the replica.

    The position in the run (`round`) is saved beside the members; `load` returns it.
    """

    def __init__(self, model: torch.nn.Module, *, process_group: Any = None, **members: Stateful | None) -> None:
        self.model = model
        self.process_group = process_group
        self.members: dict[str, Stateful] = {name: m for name, m in members.items() if m is not None}

    def save(self, root: Path, outer_step: int, replica_id: int, *, round_index: int, write: bool = True) -> None:
        """This replica's share of the checkpoint for `outer_step` (atomic, fsynced files).

        Every process of the replica calls it (a member's `state_dict` may gather from all of
        them); the one with `write` writes the files (sharded: every process writes its shards,
        and the one with `write` renames the finished folder into place).
        """
        if self.process_group is not None:
            self._save_sharded(root, outer_step, replica_id, round_index=round_index, rename=write)
            return
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
        if self.process_group is not None:
            return self._load_sharded(root, outer_step, replica_id)
        state = load_replica(root, outer_step, replica_id, self.model)
        self._check_members(set(state) - {"round"}, f"{step_dir(root, outer_step)}/replica-{replica_id}.pt")
        for name, member in self.members.items():
            member.load_state_dict(state[name])
        return int(state["round"])

    def _check_members(self, saved: set[str], where: str) -> None:
        missing = sorted(set(self.members) - saved)
        if missing:
            raise KeyError(
                f"{where} holds {sorted(saved)}, not {missing}: the run was saved with other parts switched on; "
                "resume with the same config or start a fresh run"
            )

    # ------------------------------------------------------------------ sharded (DCP) checkpoints

    def _local_rank(self) -> int:
        return dist.get_rank(self.process_group)

    def _sharded_state(self, round_index: int) -> dict[str, Any]:
        """What DCP saves, and the template a load fills: shards, per-rank entries, plain values."""
        state: dict[str, Any] = {
            "round": round_index,
            "model": model_state(self.model, get_model_state_dict(self.model)),
        }
        for name, member in self.members.items():
            if isinstance(member, torch.optim.Optimizer):
                state[name] = get_optimizer_state_dict(self.model, member)
            elif isinstance(member, PerProcessState):
                state[name] = {f"rank{self._local_rank()}": pack(member.member.state_dict())}
            else:
                state[name] = member.state_dict()
        return state

    def _save_sharded(self, root: Path, outer_step: int, replica_id: int, *, round_index: int, rename: bool) -> None:
        folder = step_dir(root, outer_step)
        final, tmp = folder / f"replica-{replica_id}", folder / f".replica-{replica_id}.tmp"
        if rename:  # the first rank clears what an interrupted save left, before anyone writes
            folder.mkdir(parents=True, exist_ok=True)
            (folder / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier(group=self.process_group)
        state = self._sharded_state(round_index)
        # DCP writes `.metadata` last (on the group's first rank) and returns on every rank only
        # after it: the folder is whole once save returns, so renaming it commits it.
        dcp.save(state, storage_writer=FileSystemWriter(str(tmp), sync_files=True), process_group=self.process_group)
        if rename:
            if final.exists():  # a folder of a timeline the run fell back from (see mark_complete)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync(folder)
        dist.barrier(group=self.process_group)

    def _load_sharded(self, root: Path, outer_step: int, replica_id: int) -> int:
        folder = step_dir(root, outer_step) / f"replica-{replica_id}"
        if not (folder / ".metadata").is_file():
            plain = step_dir(root, outer_step) / f"replica-{replica_id}.safetensors"
            if plain.exists():
                raise FileNotFoundError(
                    f"{plain}: an unsharded checkpoint (saved with parallel.sharding none); "
                    "resume with the same parallel.sharding"
                )
            raise FileNotFoundError(
                f"{folder}: checkpoint has no files for replica {replica_id} "
                f"(saved replicas: {sorted(p.name for p in step_dir(root, outer_step).glob('replica-*'))})"
            )
        metadata = FileSystemReader(str(folder)).read_metadata()
        self._check_members(
            {key.split(".", 1)[0] for key in metadata.state_dict_metadata} - {"round", "model"}, str(folder)
        )
        state = self._sharded_state(0)
        rank_keys = [
            f"{name}.rank{self._local_rank()}" for name, m in self.members.items() if isinstance(m, PerProcessState)
        ]
        absent = [key for key in rank_keys if key not in metadata.state_dict_metadata]
        if absent:
            raise ValueError(
                f"{folder}: holds no state for rank {self._local_rank()} of the replica ({absent[0]}): it was saved by "
                "a replica of another size; resume with the same replica_size"
            )
        try:
            dcp.load(state, storage_reader=FileSystemReader(str(folder)), process_group=self.process_group)
        except CheckpointException as error:
            raise ValueError(
                f"{folder}: does not fit this replica ({str(error).strip().splitlines()[-1]}); "
                "resume with the config and replica_size it was saved with"
            ) from None
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=False))
        for name, member in self.members.items():
            if isinstance(member, torch.optim.Optimizer):
                set_optimizer_state_dict(self.model, member, optim_state_dict=state[name])
            elif isinstance(member, PerProcessState):
                member.member.load_state_dict(unpack(state[name][f"rank{self._local_rank()}"]))
            else:
                member.load_state_dict(state[name])
        return int(state["round"])
