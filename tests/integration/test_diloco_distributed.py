"""DiLoCo across real processes: Gloo process groups on localhost (see _diloco_harness).

Process start-up dominates the cost, so the two-replica scenarios share one spawn (module
fixture) and each test asserts on its part of the results.
"""

from __future__ import annotations

import pytest
import torch

from tests.integration._diloco_harness import (
    SYNC_EVERY,
    make_inner,
    make_model,
    run_ranks,
    train,
)
from trainer.diloco import DiLoCo, parameters_hash, payload_bytes

pytestmark = pytest.mark.integration

STREAMING = {"fragments": 2, "fragment_delay": 1}
IDENTICAL_DATA_CONFIGS = [
    {},
    {"compression": "int8", "error_feedback": True},
    {"compression": "bf16", **STREAMING, "fragment_alpha": 0.5},
]
AGREEMENT_CONFIGS = {
    "int4-ef": {"compression": "int4", "error_feedback": True},
    "int8-streaming": {"compression": "int8", **STREAMING},
    "fp32-4fragments-alpha": {"fragments": 4, "fragment_alpha": 0.5},
}
AGREEMENT_ROUNDS = 2
RESUME_CONFIG = {"compression": "int8", "error_feedback": True, "fragment_alpha": 0.5, **STREAMING}


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """One spawn of two Gloo ranks running every two-replica scenario."""
    tmp_path = tmp_path_factory.mktemp("diloco-two-replicas")
    identical, sign, agreement, straight = run_ranks(
        2,
        tmp_path,
        ("identical_data", {"configs": IDENTICAL_DATA_CONFIGS, "rounds": 2}),
        ("sign", {}),
        ("agreement", {"configs": list(AGREEMENT_CONFIGS.values()), "rounds": AGREEMENT_ROUNDS}),
        ("resume", {"phase": "straight", "config": RESUME_CONFIG, "checkpoint_dir": str(tmp_path)}),
    )
    return {
        "identical": identical,
        "sign": sign,
        "agreement": agreement,
        "straight": straight,
        "checkpoint_dir": str(tmp_path),
    }


def _assert_all_equal(tensors_a: list[torch.Tensor], tensors_b: list[torch.Tensor]) -> None:
    assert len(tensors_a) == len(tensors_b)
    for a, b in zip(tensors_a, tensors_b, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("index", range(len(IDENTICAL_DATA_CONFIGS)), ids=["fp32", "int8-ef", "bf16-streaming-alpha"])
def test_two_replicas_on_identical_data_end_identical_to_one_replica(two_replicas, index):
    """Acceptance 2: each rank started from its own seed; DiLoCo broadcast rank 0's weights."""
    model = make_model(seed=0)
    inner = make_inner(model)
    alone = DiLoCo(model, inner, sync_every=SYNC_EVERY, **IDENTICAL_DATA_CONFIGS[index])
    train(model, inner, alone, start=0, stop=2 * SYNC_EVERY, data_seed=0)  # no process group
    for rank in two_replicas["identical"]:
        _assert_all_equal(rank[index]["model"], list(model.parameters()))
        _assert_all_equal(rank[index]["global"], alone.global_parameters())


def test_outer_sgd_lr_one_makes_global_the_mean_of_replicas(two_replicas):
    """Acceptance 3: pseudo-gradient = global - local; lr 1, no momentum lands on the mean."""
    rank_0, rank_1 = two_replicas["sign"]
    assert not torch.equal(rank_0["locals"][0], rank_1["locals"][0]), "replicas must differ"
    for index, global_after in enumerate(rank_0["global_after"]):
        mean = (rank_0["locals"][index] + rank_1["locals"][index]) / 2
        torch.testing.assert_close(global_after, mean, rtol=0, atol=1e-6)
        assert not torch.allclose(global_after, rank_0["global_before"][index])
    _assert_all_equal(rank_0["global_after"], rank_1["global_after"])


@pytest.mark.parametrize("name", list(AGREEMENT_CONFIGS))
def test_replicas_agree_after_every_sync_and_each_fragment_syncs_once_per_round(two_replicas, name):
    """Acceptance 4 and 5 over two processes fed different data."""
    config = AGREEMENT_CONFIGS[name]
    ranks = [rank[list(AGREEMENT_CONFIGS).index(name)] for rank in two_replicas["agreement"]]
    records = [rank["records"] for rank in ranks]
    fragments = config.get("fragments", 1)
    alpha = config.get("fragment_alpha", 0.0)
    interval = SYNC_EVERY // fragments

    # Schedule: one sync every H/F steps, fragments round-robin, so each exactly once per H.
    last_step = AGREEMENT_ROUNDS * SYNC_EVERY
    assert [r["step"] for r in records[0]] == list(range(interval, last_step + 1, interval))
    assert [r["outer_step"] for r in records[0]] == list(range(1, len(records[0]) + 1))
    synced = [r["fragment"] for r in records[0]]
    for start in range(0, len(synced), fragments):
        assert sorted(synced[start : start + fragments]) == list(range(fragments))

    for sync_0, sync_1 in zip(*records, strict=True):
        assert sync_0["global_hash"] == sync_1["global_hash"]
        assert sync_0["participants"] == sync_1["participants"] == 2
        assert sync_0["norm"] == sync_1["norm"] > 0
        if alpha == 0:  # the synced fragment is now the shared global value on both replicas
            _assert_all_equal(sync_0["fragment_local"], sync_1["fragment_local"])
        else:  # each replica keeps alpha of its own training, so they differ
            assert not torch.equal(sync_0["fragment_local"][0], sync_1["fragment_local"][0])
        if fragments == 1:
            assert sync_0["model_hash"] == sync_1["model_hash"]

    # Between its syncs a fragment trains on each replica's own data, so replicas drift apart.
    if fragments > 1:
        assert synced[-1] == fragments - 1
        assert not torch.equal(ranks[0]["fragments"][0][0], ranks[1]["fragments"][0][0])

    # Bytes: exactly the compressed payload (+ the participation flag), never an fp32 fallback.
    compression = config.get("compression", "none")
    flag_bytes = 4 if compression == "none" else 1
    fragment_numels = [sum(t.numel() for t in fragment) for fragment in ranks[0]["fragments"]]
    sent_before = 0
    for record in records[0]:
        numel = fragment_numels[record["fragment"]]
        assert record["bytes_sent"] - sent_before == payload_bytes(numel, compression) + flag_bytes
        sent_before = record["bytes_sent"]


def test_resume_in_fresh_processes_is_bit_exact(two_replicas, tmp_path):
    """Acceptance 8: 4 rounds straight == 2 rounds, save, new processes, load, 2 rounds."""
    (resumed,) = run_ranks(
        2,
        tmp_path,
        (
            "resume",
            {
                "phase": "resumed",
                "config": RESUME_CONFIG,
                "checkpoint_dir": two_replicas["checkpoint_dir"],
            },
        ),
    )
    for before, after in zip(two_replicas["straight"], resumed, strict=True):
        _assert_all_equal(after["model"], before["model"])
        _assert_all_equal(after["global"], before["global"])
        assert after["bytes_sent"] == before["bytes_sent"] > 0
    assert parameters_hash(resumed[0]["global"]) == parameters_hash(resumed[1]["global"])


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory):
    compressions = ["none", "int8"]
    results = run_ranks(
        3,
        tmp_path_factory.mktemp("diloco-nan"),
        *(("nan_guard", {"compression": compression}) for compression in compressions),
    )
    return dict(zip(compressions, results, strict=True))


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_nan_replica_is_left_out_and_all_nan_round_is_skipped(nan_runs, compression):
    """Acceptance 7 with three replicas; the healthy two are re-run alone as a sub-group."""
    ranks = nan_runs[compression]
    round_1, round_2, round_3 = (list(s) for s in zip(*(rank["syncs"] for rank in ranks), strict=True))

    # Round 1: the NaN replica is left out; the global equals the healthy replicas' alone.
    assert [s["participants"] for s in round_1] == [2, 2, 2]
    for sync in round_1:
        assert all(torch.isfinite(t).all() for t in sync["global"] + sync["model"])
        _assert_all_equal(sync["global"], ranks[0]["healthy_global"])
        _assert_all_equal(sync["model"], sync["global"])
    assert ranks[2]["syncs"][0]["inner_state_sizes"][0] == 0, "NaN replica's moments dropped"
    assert ranks[0]["syncs"][0]["inner_state_sizes"][0] > 0

    # Round 2: the reset replica trains finite again and rejoins.
    assert [s["participants"] for s in round_2] == [3, 3, 3]

    # Round 3: every replica non-finite, so the outer step is skipped and nothing moves.
    for before, after in zip(round_2, round_3, strict=True):
        assert after["participants"] == 0 and after["norm"] == 0.0
        _assert_all_equal(after["global"], before["global"])
        _assert_all_equal(after["model"], after["global"])


def test_outer_groups_of_a_two_by_two_world_sync_independently(tmp_path):
    """The worker's layout: rank k of every replica forms outer group k."""
    (ranks,) = run_ranks(4, tmp_path, ("outer_subgroups", {}))
    assert [r["outer_step"] for r in ranks] == [2, 2, 2, 2]
    assert ranks[0]["model_hash"] == ranks[2]["model_hash"]
    assert ranks[1]["model_hash"] == ranks[3]["model_hash"]
    assert ranks[0]["model_hash"] != ranks[1]["model_hash"]
