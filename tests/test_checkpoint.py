"""Checkpoints are atomic and a folder counts only once it is sealed."""

import torch

from trainer import checkpoint


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11))
    model[1].weight = model[0].weight  # tied, as the tiny Qwen2's lm_head is
    return model


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
