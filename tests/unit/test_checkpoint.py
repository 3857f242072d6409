"""Which folders are checkpoints, and what a resume does when the newest sealed one is damaged.

Checkpoints here are written by the project's own `TrainingState.save` + `mark_complete` (real
safetensors and torch.save files), then damaged the way disks and people damage them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.strict_json import loads_strict
from trainer import checkpoint
from trainer.checkpoint import TrainingState


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11))
    model[1].weight = model[0].weight  # tied, as the tiny Qwen2's lm_head is
    return model


def sealed_run(root: Path, steps=(4, 8), *, keep: int = 3) -> TrainingState:
    """Sealed checkpoints at `steps` of one replica: the model's weights differ per step (seed = step)
    and the inner optimizer has taken a step, so the .pt holds real tensors."""
    for step in steps:
        model = small_model(step)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.tensor([1, 2])).sum().backward()
        optimizer.step()
        TrainingState(model, inner_optimizer=optimizer).save(root, step, 0, round_index=step - 1)
        checkpoint.mark_complete(root, step, {"round": step - 1, "replicas": 1}, keep=keep)
    return state_for_loading()


def state_for_loading() -> TrainingState:
    model = small_model(99)
    return TrainingState(model, inner_optimizer=torch.optim.AdamW(model.parameters()))


def truncate(path: Path, keep_bytes: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep_bytes is None else keep_bytes])


def damage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trainer.checkpoint" and r.levelno == logging.WARNING]


# ---- which folders are checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, step",
    [
        ("step-000008", 8),
        ("step-1234567", 1234567),  # past 6 digits, as step_dir writes it
        ("step-000008.bak", None),
        ("step-000004-hf", None),
        ("step-8", None),
        ("step-0000008", None),  # not what step_dir writes for 8
        ("step-00000a", None),
        ("backup-step-000008", None),
    ],
)
def test_only_the_exact_name_step_dir_writes_is_a_checkpoint(name, step):
    assert checkpoint.step_of(Path("/ckpt") / name) == step


def test_a_step_folder_with_a_suffix_is_not_a_checkpoint(tmp_path):
    sealed_run(tmp_path)
    shutil.copytree(tmp_path / "step-000008", tmp_path / "step-000008.bak")  # sealed copy, COMPLETE included
    assert checkpoint.complete_steps(tmp_path) == [4, 8]
    assert checkpoint.latest_complete(tmp_path) == 8
    assert checkpoint.latest_loadable(tmp_path) == 8


def test_sealing_a_step_leaves_a_foreign_export_folder_untouched(tmp_path):
    sealed_run(tmp_path, keep=2)
    export = tmp_path / "step-000004-hf"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"exported")
    sealed_run(tmp_path, steps=(12,), keep=2)  # sweeps partials older than 12, keeps the newest 2
    assert checkpoint.complete_steps(tmp_path) == [8, 12]
    assert (export / "model.safetensors").read_bytes() == b"exported"


def test_the_seal_records_the_size_in_bytes_of_every_replica_file(tmp_path):
    sealed_run(tmp_path, steps=(4,))
    folder = tmp_path / "step-000004"
    info = checkpoint.step_info(tmp_path, 4)
    assert info["files"] == {
        "replica-0.pt": (folder / "replica-0.pt").stat().st_size,
        "replica-0.safetensors": (folder / "replica-0.safetensors").stat().st_size,
    }
    assert (info["round"], info["replicas"]) == (3, 1)
    assert info["files"]["replica-0.safetensors"] > 11 * 4 * 4  # the embedding alone is 176 bytes of float32


# ---- damaged checkpoints ----------------------------------------------------------------------------


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_sealed_one_with_one_warning(tmp_path, caplog):
    """Integration: a real safetensors file cut in half (a full disk, a copy cut short)."""
    state = sealed_run(tmp_path)
    weights = tmp_path / "step-000008" / "replica-0.safetensors"
    size = weights.stat().st_size
    truncate(weights)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        step = checkpoint.latest_loadable(tmp_path)
    assert step == 4
    (warning,) = damage_warnings(caplog)
    assert str(weights) in warning and f"truncated: {size // 2} bytes, sealed with {size}" in warning
    assert state.load(tmp_path, step, 0) == 3  # the round saved with step 4
    saved = load_file(tmp_path / "step-000004" / "replica-0.safetensors")
    assert torch.equal(state.model[0].weight, saved["0.weight"])
    assert state.members["inner_optimizer"].state_dict()["state"][0]["step"].item() == 1.0


@pytest.mark.parametrize(
    "damage, file, problem",
    [
        (lambda f: truncate(f / "replica-0.pt"), "replica-0.pt", "truncated"),
        (lambda f: (f / "replica-0.pt").write_bytes((f / "replica-0.pt").read_bytes() + b"x"), "replica-0.pt", "grown"),
        (lambda f: (f / "replica-0.pt").unlink(), "replica-0.pt", "missing or unreadable"),
        (lambda f: (f / "COMPLETE").write_text("{not json"), "COMPLETE", "unreadable seal"),
        (lambda f: (f / "COMPLETE").write_text("[1, 2]"), "COMPLETE", "not a JSON object"),
    ],
    ids=["truncated-pt", "grown-pt", "missing-pt", "garbage-seal", "list-seal"],
)
def test_a_damaged_file_of_a_sealed_step_is_named_before_anything_is_loaded(tmp_path, damage, file, problem):
    sealed_run(tmp_path)
    folder = tmp_path / "step-000008"
    assert checkpoint.verify_step(tmp_path, 8) is None
    damage(folder)
    found = checkpoint.verify_step(tmp_path, 8)
    assert found is not None and found.startswith(f"{folder / file}: ") and problem in found
    assert checkpoint.latest_loadable(tmp_path) == 4


def legacy_seal(folder: Path) -> None:
    """A seal as written before sizes were recorded: the info alone."""
    info = json.loads((folder / "COMPLETE").read_text())
    info.pop("files")
    (folder / "COMPLETE").write_text(json.dumps(info))


@pytest.mark.parametrize(
    "damage, file, problem",
    [
        (lambda f: truncate(f / "replica-0.safetensors"), "replica-0.safetensors", "unreadable safetensors"),
        (lambda f: truncate(f / "replica-0.pt"), "replica-0.pt", "unreadable torch.save archive"),
        (lambda f: (f / "replica-0.pt").unlink(), "replica-0.pt", "missing (its partner file is there)"),
        (  # same size, header overwritten: only the structural check sees it
            lambda f: (f / "replica-0.safetensors").write_bytes(
                b"\xff" * 16 + (f / "replica-0.safetensors").read_bytes()[16:]
            ),
            "replica-0.safetensors",
            "unreadable safetensors",
        ),
    ],
    ids=["truncated-weights", "truncated-pt", "missing-pt", "garbage-header"],
)
def test_a_seal_without_recorded_sizes_still_gets_its_files_checked(tmp_path, damage, file, problem):
    sealed_run(tmp_path)
    folder = tmp_path / "step-000008"
    legacy_seal(folder)
    assert checkpoint.verify_step(tmp_path, 8) is None
    damage(folder)
    found = checkpoint.verify_step(tmp_path, 8)
    assert found is not None and found.startswith(f"{folder / file}: ") and problem in found


def test_a_sealed_folder_emptied_of_its_files_is_damaged(tmp_path):
    sealed_run(tmp_path)
    folder = tmp_path / "step-000008"
    legacy_seal(folder)
    for path in folder.glob("replica-*"):
        path.unlink()
    assert checkpoint.verify_step(tmp_path, 8) == f"{folder}: sealed but holds no replica files"


def test_only_the_skipped_damaged_steps_are_warned_about(tmp_path, caplog):
    sealed_run(tmp_path, steps=(2, 4, 6, 8), keep=4)
    truncate(tmp_path / "step-000002" / "replica-0.pt")  # older than the step resumed from: not skipped
    truncate(tmp_path / "step-000006" / "replica-0.pt")
    truncate(tmp_path / "step-000008" / "replica-0.safetensors")
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert checkpoint.verify_sealed(tmp_path) == {2: False, 4: True, 6: False, 8: False}
    warnings = damage_warnings(caplog)
    assert len(warnings) == 2
    assert "step-000006/replica-0.pt" in warnings[0] and "step-000008/replica-0.safetensors" in warnings[1]


# ---- every rank resumes from the same step ----------------------------------------------------------


def test_a_step_damaged_on_any_disk_is_vetoed_for_every_rank(tmp_path):
    # ranks 0 and 1 share the lead's disk (only rank 0 looked), rank 2 keeps another disk
    views = [{4: True, 8: True}, None, {4: True, 8: False}]
    assert [checkpoint.resume_step(tmp_path, views, lead) for lead in (0, 2)] == [4, 4]


def test_a_step_not_yet_sealed_on_another_disk_is_still_resumed_from(tmp_path):
    """The lead's disk decides, as before: another disk whose keeper died before sealing step 8
    does not veto it (its replica files may be complete; if not, load_replica names the file)."""
    assert checkpoint.resume_step(tmp_path, [{4: True, 8: True}, {4: True}], 0) == 8


def test_no_sealed_checkpoint_is_a_fresh_run(tmp_path):
    assert checkpoint.latest_loadable(tmp_path) is None
    (tmp_path / "step-000008.bak").mkdir()
    (tmp_path / "step-000008.bak" / "COMPLETE").write_text("{}")
    assert checkpoint.latest_loadable(tmp_path) is None


def test_when_every_sealed_checkpoint_is_damaged_the_run_stops_instead_of_starting_over(tmp_path, caplog):
    sealed_run(tmp_path)
    for step in (4, 8):
        truncate(tmp_path / f"step-{step:06d}" / "replica-0.pt")
    with (
        caplog.at_level(logging.WARNING, logger="trainer.checkpoint"),
        pytest.raises(checkpoint.CheckpointError) as error,
    ):
        checkpoint.latest_loadable(tmp_path)
    assert str(error.value).startswith(f"{tmp_path}: every sealed checkpoint is damaged (steps 4, 8;")
    assert len(damage_warnings(caplog)) == 2


# ---- no restart loop ----------------------------------------------------------------------------------


def test_after_falling_back_the_abandoned_newer_checkpoint_never_comes_back(tmp_path):
    """Resume from 4 past a damaged 8, then seal 5: the damaged 8 is dropped with the timeline it
    belonged to; re-reaching step 8 unseals the old folder before its files are replaced."""
    sealed_run(tmp_path)
    truncate(tmp_path / "step-000008" / "replica-0.pt")
    assert checkpoint.latest_loadable(tmp_path) == 4
    sealed_run(tmp_path, steps=(5,))
    assert checkpoint.complete_steps(tmp_path) == [4, 5]
    assert not (tmp_path / "step-000008").exists()


def test_rewriting_a_sealed_step_unseals_it_until_it_is_sealed_again(tmp_path):
    sealed_run(tmp_path)
    truncate(tmp_path / "step-000008" / "replica-0.pt")
    model = small_model(8)
    checkpoint.save_replica(tmp_path, 8, 1, model, {"round": 7})  # another replica's share, before the seal
    assert checkpoint.complete_steps(tmp_path) == [4]
    assert checkpoint.latest_loadable(tmp_path) == 4


def test_round_trip_and_completion(tmp_path):
    model, restored = small_model(0), small_model(1)
    state = {"round": 3, "inner_optimizer": {"lr": 0.1}}
    checkpoint.save_replica(tmp_path, 4, replica_id=1, model=model, state=state)
    assert checkpoint.latest_complete(tmp_path) is None  # not sealed yet
    checkpoint.mark_complete(tmp_path, 4, {"round": 3}, keep=2)
    assert checkpoint.latest_complete(tmp_path) == 4
    assert checkpoint.load_replica(tmp_path, 4, 1, restored) == state
    for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert restored[1].weight is restored[0].weight
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left behind


def test_missing_replica_names_the_file(tmp_path):
    checkpoint.save_replica(tmp_path, 1, replica_id=0, model=small_model(0), state={})
    checkpoint.mark_complete(tmp_path, 1, {}, keep=2)
    try:
        checkpoint.load_replica(tmp_path, 1, 5, small_model(0))
    except FileNotFoundError as error:
        assert "replica-5.safetensors" in str(error) and "replica-0" in str(error)
    else:
        raise AssertionError("loading a replica that was never saved must fail")


def test_keeps_newest_and_drops_stale_partials(tmp_path):
    model = small_model(0)
    for step in (1, 2, 3):
        checkpoint.save_replica(tmp_path, step, 0, model, {"round": step})
    checkpoint.mark_complete(tmp_path, 1, {}, keep=2)
    checkpoint.mark_complete(tmp_path, 3, {}, keep=2)  # 2 stays partial: older than 3, so dropped
    assert checkpoint.complete_steps(tmp_path) == [1, 3]
    assert not (tmp_path / "step-000002").exists()
    checkpoint.save_replica(tmp_path, 4, 0, model, {"round": 4})
    checkpoint.mark_complete(tmp_path, 4, {}, keep=2)
    assert checkpoint.complete_steps(tmp_path) == [3, 4]


def test_reference_round_trip(tmp_path):
    target = small_model(1)
    assert not checkpoint.load_reference(tmp_path, target)
    checkpoint.save_reference(tmp_path, small_model(0))
    assert checkpoint.load_reference(tmp_path, target)
    assert torch.equal(target[0].weight, small_model(0)[0].weight)


def test_strict_json_writes_null_for_non_finite_floats_with_the_reason_beside_a_known_one_wins():
    data = {
        "a": float("nan"),
        "b": {"c": float("-inf"), "d": (1.5, float("inf"))},
        "sigmas": float("nan"),
        "sigmas_reason": "no variation",
        "n": 3,
        "flag": True,
    }
    text = checkpoint.strict_json(data, indent=1)
    assert loads_strict(text) == {
        "a": None,
        "a_reason": "nan",
        "b": {"c": None, "c_reason": "-inf", "d": [1.5, None]},
        "sigmas": None,
        "sigmas_reason": "no variation",  # the writer's reason, not "nan"
        "n": 3,
        "flag": True,
    }
    assert math.isnan(data["a"]) and data["b"]["d"][1] == float("inf")  # the input is untouched
    with pytest.raises(TypeError):
        checkpoint.strict_json({"x": object()})


# ---- sharded checkpoints (torch.distributed.checkpoint folders) ----------------------------------


@pytest.fixture
def world_of_one():
    """A process group of this one process (in memory): what a sharded save and load run over."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class Counter:
    """A per-process member: state that is no tensor and differs between the ranks of a replica."""

    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value, "history": list(range(self.value))}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def sharded_state(seed: int, group, counter: int = 0) -> tuple[TrainingState, torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(small_model(seed), mesh=DeviceMesh.from_group(group, "cpu"))
    optimizer = torch.optim.AdamW(model.parameters())
    per_process = checkpoint.PerProcessState(Counter(counter), group, 0, 1)
    return TrainingState(model, process_group=group, inner_optimizer=optimizer, counter=per_process), model, optimizer


def sealed_sharded_run(root: Path, group, steps=(4, 8)) -> None:
    for step in steps:
        state, model, optimizer = sharded_state(step, group, counter=step)
        model(torch.tensor([1, 2])).sum().backward()
        optimizer.step()
        state.save(root, step, 0, round_index=step - 1)
        checkpoint.mark_complete(root, step, {"round": step - 1, "replicas": 1}, keep=3)


def full(tensors) -> list[torch.Tensor]:
    return [t.full_tensor() for t in tensors]


def test_a_sharded_checkpoint_is_a_sealed_dcp_folder_that_loads_back_every_member(tmp_path, world_of_one):
    sealed_sharded_run(tmp_path, world_of_one)
    folder = tmp_path / "step-000008"
    assert sorted(p.name for p in folder.iterdir()) == ["COMPLETE", "replica-0"]  # no temporary folder left
    sizes = json.loads((folder / "COMPLETE").read_text())["files"]
    assert set(sizes) == {"replica-0/.metadata", "replica-0/__0_0.distcp"} and all(sizes.values())
    assert checkpoint.verify_step(tmp_path, 8) is None

    saved, saved_model, saved_optimizer = sharded_state(8, world_of_one)  # the weights step 8 was saved from...
    saved_model(torch.tensor([1, 2])).sum().backward()
    saved_optimizer.step()  # ... after its step
    state, model, optimizer = sharded_state(99, world_of_one)
    assert state.load(tmp_path, 8, 0) == 7
    for a, b in zip(full(model.parameters()), full(saved_model.parameters()), strict=True):
        assert torch.equal(a, b)
    assert model[1].weight is model[0].weight  # stored once, still tied
    moments = [optimizer.state[p]["exp_avg"].full_tensor() for p in model.parameters()]
    expected = [saved_optimizer.state[p]["exp_avg"].full_tensor() for p in saved_model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(moments, expected, strict=True)) and moments[0].abs().sum() > 0
    assert state.members["counter"].member.value == 8


def test_a_sharded_checkpoint_exports_without_a_process_group(tmp_path, world_of_one):
    sealed_sharded_run(tmp_path, world_of_one, steps=(8,))
    saved, saved_model, saved_optimizer = sharded_state(8, world_of_one)
    saved_model(torch.tensor([1, 2])).sum().backward()
    saved_optimizer.step()
    plain = small_model(0)
    checkpoint.load_sharded_model(tmp_path / "step-000008" / "replica-0", plain)  # no collective
    for a, b in zip(plain.parameters(), full(saved_model.parameters()), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match="replica-0: does not fit the model"):
        checkpoint.load_sharded_model(tmp_path / "step-000008" / "replica-0", torch.nn.Linear(4, 11))


@pytest.mark.parametrize(
    "damage, file, problem",
    [
        (lambda f: truncate(f / "replica-0" / "__0_0.distcp"), "replica-0/__0_0.distcp", "truncated"),
        (lambda f: (f / "replica-0" / "__0_0.distcp").unlink(), "replica-0/__0_0.distcp", "missing or unreadable"),
        (lambda f: truncate(f / "replica-0" / ".metadata"), "replica-0/.metadata", "truncated"),
    ],
    ids=["truncated-shards", "missing-shards", "truncated-metadata"],
)
def test_a_damaged_sharded_step_is_named_and_the_resume_falls_back(tmp_path, world_of_one, damage, file, problem):
    sealed_sharded_run(tmp_path, world_of_one)
    folder = tmp_path / "step-000008"
    damage(folder)
    found = checkpoint.verify_step(tmp_path, 8)
    assert found is not None and found.startswith(f"{folder / file}: ") and problem in found
    assert checkpoint.latest_loadable(tmp_path) == 4


@pytest.mark.parametrize(
    "damage, file, problem",
    [
        (lambda f: truncate(f / "replica-0" / "__0_0.distcp"), "replica-0/__0_0.distcp", "the metadata needs"),
        (lambda f: (f / "replica-0" / "__0_0.distcp").unlink(), "replica-0/__0_0.distcp", "missing or unreadable"),
        (lambda f: truncate(f / "replica-0" / ".metadata"), "replica-0/.metadata", "unreadable checkpoint metadata"),
    ],
    ids=["truncated-shards", "missing-shards", "truncated-metadata"],
)
def test_a_sharded_step_without_recorded_sizes_is_checked_against_its_metadata(
    tmp_path, world_of_one, damage, file, problem
):
    sealed_sharded_run(tmp_path, world_of_one, steps=(8,))
    folder = tmp_path / "step-000008"
    legacy_seal(folder)
    assert checkpoint.verify_step(tmp_path, 8) is None
    damage(folder)
    found = checkpoint.verify_step(tmp_path, 8)
    assert found is not None and found.startswith(f"{folder / file}: ") and problem in found


def test_a_sharded_checkpoint_and_an_unsharded_one_refuse_each_other_by_name(tmp_path, world_of_one):
    sealed_sharded_run(tmp_path / "sharded", world_of_one, steps=(8,))
    with pytest.raises(FileNotFoundError, match="a sharded checkpoint .saved with parallel.sharding fsdp"):
        state_for_loading().load(tmp_path / "sharded", 8, 0)
    sealed_run(tmp_path / "plain", steps=(8,))
    state, _, _ = sharded_state(99, world_of_one)
    with pytest.raises(FileNotFoundError, match="an unsharded checkpoint .saved with parallel.sharding none"):
        state.load(tmp_path / "plain", 8, 0)


def test_a_sharded_checkpoint_saved_without_a_member_names_it(tmp_path, world_of_one):
    sealed_sharded_run(tmp_path, world_of_one, steps=(8,))
    state, model, optimizer = sharded_state(99, world_of_one)
    state.members["teacher"] = Counter(0)
    with pytest.raises(KeyError, match=r"holds \['counter', 'inner_optimizer'\], not \['teacher'\]"):
        state.load(tmp_path, 8, 0)
