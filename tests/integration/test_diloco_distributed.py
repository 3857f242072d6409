"""DiLoCo across real processes: Gloo process groups on localhost (see _diloco_harness).

Process start-up dominates the cost, so the two-replica scenarios share one spawn (module
fixture), the four-replica ones another, and each test asserts on its part of the results.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from tests.integration._diloco_harness import (
    SYNC_EVERY,
    make_inner,
    make_model,
    run_ranks,
    train,
)
from tests.support.torchrun import TORCHRUN, failure
from trainer.diloco import QUANT_BLOCK, DiLoCo, parameters_hash, payload_bytes

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

    # Bytes at M = 2: each replica sends the other's shard (+ 1 flag byte) and its own mean shard
    # (+ 4 count bytes), receives the same sizes back: one compressed payload of the fragment
    # each way, never an fp32 fallback (the shards are block-aligned, so no scale is repeated).
    compression = config.get("compression", "none")
    fragment_numels = [sum(t.numel() for t in fragment) for fragment in ranks[0]["fragments"]]
    for rank_records in records:
        sent_before = received_before = 0
        for record in rank_records:
            expected = payload_bytes(fragment_numels[record["fragment"]], compression) + 1 + 4
            assert record["bytes_sent"] - sent_before == expected
            assert record["bytes_received"] - received_before == expected
            sent_before, received_before = record["bytes_sent"], record["bytes_received"]


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


TRAFFIC_WIDTH = 64  # 4160 parameters: 33 quantization blocks, so 4 shards are near-equal
TRAFFIC = {"width": TRAFFIC_WIDTH, "config": {"compression": "int8", "error_feedback": True}, "rounds": 2}


@pytest.fixture(scope="module")
def four_replicas(tmp_path_factory):
    """One spawn of four Gloo ranks: the worker's 2 x 2 layout, int8 traffic, agreement."""
    subgroups, traffic, agreement = run_ranks(
        4,
        tmp_path_factory.mktemp("diloco-four-replicas"),
        ("outer_subgroups", {}),
        ("traffic", TRAFFIC),
        ("agreement", {"configs": [AGREEMENT_CONFIGS["int8-streaming"]], "rounds": AGREEMENT_ROUNDS}),
    )
    return {"subgroups": subgroups, "traffic": traffic, "agreement": agreement}


def test_outer_groups_of_a_two_by_two_world_sync_independently(four_replicas):
    """The worker's layout: rank k of every replica forms outer group k."""
    ranks = four_replicas["subgroups"]
    assert [r["outer_step"] for r in ranks] == [2, 2, 2, 2]
    assert ranks[0]["model_hash"] == ranks[2]["model_hash"]
    assert ranks[1]["model_hash"] == ranks[3]["model_hash"]
    assert ranks[0]["model_hash"] != ranks[1]["model_hash"]


def test_four_replicas_hold_bit_identical_global_copies_after_every_sync(four_replicas):
    runs = [rank[0] for rank in four_replicas["agreement"]]
    syncs = list(zip(*(run["records"] for run in runs), strict=True))
    assert len(syncs) == AGREEMENT_ROUNDS * 2
    for sync in syncs:
        assert len({record["global_hash"] for record in sync}) == 1
        assert {record["participants"] for record in sync} == {4}
        assert len({record["norm"] for record in sync}) == 1


def test_int8_bytes_per_replica_grow_at_most_1_6x_from_two_to_four_replicas(tmp_path, four_replicas):
    """Acceptance 2: reduce-scatter + all-gather moves 2 (M - 1) / M payloads per replica,
    1.0 at M = 2 and 1.5 at M = 4, where an all-gather of whole payloads would move 1 and 3."""
    (two,) = run_ranks(2, tmp_path, ("traffic", TRAFFIC))
    four = four_replicas["traffic"]
    numel = TRAFFIC_WIDTH * TRAFFIC_WIDTH + TRAFFIC_WIDTH
    payload = payload_bytes(numel, "int8")
    assert all(r["numel"] == numel for r in two + four)
    for runs, world in ((two, 2), (four, 4)):
        assert len({r["global_hash"] for r in runs}) == 1  # bit-identical
        # Conservation: whatever one replica sent, another received.
        assert sum(r["sent_per_outer_step"] for r in runs) == sum(r["received_per_outer_step"] for r in runs)
        for r in runs:  # shards differ by at most one quantization block (+ header bytes)
            assert r["sent_per_outer_step"] == pytest.approx(2 * (world - 1) / world * payload, abs=2 * QUANT_BLOCK * 3)
    growth = max(r["sent_per_outer_step"] for r in four) / max(r["sent_per_outer_step"] for r in two)
    assert 1.4 < growth <= 1.6
    assert max(r["received_per_outer_step"] for r in four) / max(r["received_per_outer_step"] for r in two) <= 1.6


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("kill", "Connection closed by peer"), ("stall", "Timed out")],
    ids=["killed-in-flight", "stalled"],
)
def test_a_lost_replica_fails_the_survivors_with_one_error_naming_step_fragment_and_replica(tmp_path, fault, reason):
    """Three replicas, 2 fragments, tau = 1. A replica SIGKILLed while its exchange is in flight
    is detected from the closed connection (well inside the 120 s timeout); a stalled one
    (SIGSTOP) when the 3 s timeout expires. Either way the survivors' step() raises at the apply
    of the exchange that lost it (outer step 3 = fragment 0 of round 2), naming replica 2."""
    timeout_s = {"kill": 120.0, "stall": 3.0}[fault]
    (ranks,) = run_ranks(3, tmp_path, ("lose_a_replica", {"fault": fault, "timeout_s": timeout_s}), lost=frozenset({2}))
    for survivor in ranks[:2]:
        assert survivor["step"] == survivor["in_flight_since_step"] + 1  # the apply, tau later
        assert (survivor["outer_step"], survivor["fragment"], survivor["missing"]) == (3, 0, [2])
        message = survivor["message"]
        assert message.startswith(f"DiLoCo outer step 3, fragment 0: replicas [2] did not answer (replica 2: {reason}")
        assert f"timeout {timeout_s:g} s" in message and "resumes from the last checkpoint" in message


# ------------------------------------------------------------------ the training worker, killed

REPO = Path(__file__).resolve().parents[2]
KILLED_AT = 5  # outer step; 2 fragments per round, so round 3's first fragment


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _agent(node: int, port: int, run_dir: Path, marker: Path, log: Path) -> subprocess.Popen:
    """One torchrun agent per replica, as one container per replica runs it (static rendezvous,
    no restarts: an agent exits when its worker fails, so no agent kills a survivor before it
    has failed by itself; the test is the launcher that restarts them, as the coordinator is in
    a container run)."""
    command = [
        TORCHRUN,
        "--nnodes=2",
        "--nproc-per-node=1",
        f"--node-rank={node}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "--max-restarts=0",
        "-m",
        "tests.integration._diloco_harness",
        "--kill-replica=1",
        f"--at-outer-step={KILLED_AT}",
        f"--marker={marker}",
        "--",
        "--config",
        str(REPO / "configs" / "test.yaml"),
        *("--set", "rounds=4", "--set", "diloco.sync_every=4", "--set", "diloco.fragments=2"),
        *("--set", "diloco.fragment_delay=1", "--set", "diloco.timeout_s=600"),
    ]
    env = {
        **os.environ,
        "COMPOSER_RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    with log.open("w") as sink:  # a file, not a pipe: nobody blocks on a full pipe
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _launch(run_dir: Path, marker: Path) -> list[tuple[int, str]]:
    port = _free_port()
    logs = [run_dir.parent / f"agent{node}-{port}.log" for node in (0, 1)]
    agents = [_agent(node, port, run_dir, marker, log) for node, log in zip((0, 1), logs, strict=True)]
    return [(agent.wait(timeout=600), log.read_text()) for agent, log in zip(agents, logs, strict=True)]


def test_a_replica_killed_mid_exchange_fails_the_survivor_at_once_and_the_run_resumes(tmp_path):
    """Acceptance 3: replica 1 SIGKILLs itself while the exchange of outer step 5 (fragment 0,
    tau = 1) is in flight. The survivor stops by itself with the one DiLoCo error naming step,
    fragment and replica, from the closed connection, not the 600 s timeout. Relaunched, both
    replicas resume from the last sealed checkpoint (outer step 4) and finish the run."""
    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    (survivor_rc, survivor), (victim_rc, victim) = _launch(run_dir, marker)
    assert marker.exists(), victim[-3000:]
    assert victim_rc != 0 and survivor_rc != 0
    assert (
        f"DiLoCoCommunicationError: DiLoCo outer step {KILLED_AT}, fragment 0: replicas [1] did not answer "
        "(replica 1: Connection closed by peer" in survivor
    ), survivor[-4000:]
    assert "timeout 600 s" in survivor
    sealed = sorted(path.name for path in (run_dir / "checkpoints").glob("step-*") if (path / "COMPLETE").exists())
    assert sealed[-1] == f"step-{KILLED_AT - 1:06d}"

    for returncode, output in _launch(run_dir, marker):  # the restart
        assert returncode == 0, failure(output)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["outer_step"] for r in lines if r["event"] == "resume"] == [KILLED_AT - 1]
    outer = [r for r in lines if r["event"] == "outer"]
    assert [r["outer_step"] for r in outer] == [2, 4, 6, 8]  # one record per round, none lost
    for record in outer:
        assert record["bytes_received"] == record["bytes_sent"] > 0
        assert all(seconds > 0 for seconds in record["compute_s"])
        assert all(seconds >= 0 for seconds in record["communication_s"])
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["status"] == "ok" and done["outer_steps"] == 8
