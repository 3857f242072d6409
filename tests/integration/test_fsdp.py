"""`parallel.sharding: fsdp` end to end under torchrun (Gloo): the same run as an unsharded replica,
replicas that agree after every sync, a SIGKILL resumed bit-exactly from the sharded checkpoint,
bf16 through FSDP's mixed-precision policy, the export of sharded and unsharded checkpoints, and
what the ranks of a sharded replica must do in step (tests/integration/_fsdp_harness.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.integration.test_worker import records, summary
from tests.support.paths import REPO
from tests.support.torchrun import PYTHON, failure, finish, torchrun_command, torchrun_env
from tests.support.torchrun import launch as torchrun

pytestmark = pytest.mark.integration

# A replica of two processes, 8 inner steps and 2 outer steps; a 2-layer, 64-wide model warmed up
# until it earns rewards, the EMA teacher (a sharded copy) on, the held-out evaluation (each rank
# its own prompts) at the start and the end.
PARITY = (
    "replica_size=2",
    "rounds=2",
    "diloco.sync_every=4",
    "model.hidden_size=64",
    "model.num_layers=2",
    "optim.sft_steps=60",
    "loss.teacher=ema",
    "eval.every=2",
    "eval.size=8",
)
# Two replicas of two processes, with int8 pseudo-gradients and error feedback.
REPLICAS = ("replica_size=2", "rounds=4", "loss.teacher=ema", "diloco.compression=int8", "diloco.error_feedback=true")


def launch(run_dir: Path, nproc: int, *overrides: str, max_restarts: int = 0) -> subprocess.Popen:
    return torchrun(run_dir, *overrides, nproc=nproc, max_restarts=max_restarts, OMP_NUM_THREADS="1")


def run(run_dir: Path, nproc: int, *overrides: str) -> Path:
    finish(launch(run_dir, nproc, *overrides), timeout=900)
    return run_dir


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    return {mode: run(root / mode, 2, *PARITY, f"parallel.sharding={mode}") for mode in ("none", "fsdp")}


def test_a_sharded_replica_trains_as_the_unsharded_one_loss_by_loss(parity):
    """Must show 1: fsdp vs none, same seed, 8 inner + 2 outer steps: losses within 1e-5 relative at
    every step on every rank, equal pseudo-gradient norms, the same held-out figures."""
    inner = {mode: records(run_dir, "inner") for mode, run_dir in parity.items()}
    assert len(inner["fsdp"]) == len(inner["none"]) == 2 * 8  # 2 ranks x 8 steps
    for plain, sharded in zip(inner["none"], inner["fsdp"], strict=True):
        assert (plain["step"], plain["rank"]) == (sharded["step"], sharded["rank"])
        assert sharded["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-12), (plain["step"], plain["rank"])
        assert sharded["reward"] == plain["reward"]  # the same samples
    # every channel did work (pairs came from disagreeing siblings on both ranks)
    assert any(r["dpo"] != 0 for r in inner["fsdp"]) and all(r["sdpo"] > 0 for r in inner["fsdp"])
    assert any(r["grpo"] != 0 for r in inner["fsdp"])
    outer = {mode: records(run_dir, "outer") for mode, run_dir in parity.items()}
    assert [r["outer_step"] for r in outer["fsdp"]] == [1, 2]
    for plain, sharded in zip(outer["none"], outer["fsdp"], strict=True):
        assert plain["pseudo_grad_norm"] > 0
        assert sharded["pseudo_grad_norm"] == pytest.approx(plain["pseudo_grad_norm"], rel=1e-5)
    evals = {mode: records(run_dir, "eval") for mode, run_dir in parity.items()}
    assert [e["greedy_correct"] for e in evals["fsdp"]] == [e["greedy_correct"] for e in evals["none"]]
    assert len(evals["fsdp"]) == 2
    info = json.loads((parity["fsdp"] / "checkpoints" / "step-000002" / "COMPLETE").read_text())
    assert info["sharding"] == "fsdp" and {"replica-0/.metadata", "replica-0/__0_0.distcp"} <= set(info["files"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("replicas") / "run", 4, *REPLICAS, "parallel.sharding=fsdp")


def test_two_sharded_replicas_hold_identical_parameters_after_every_sync(uninterrupted):
    outer = records(uninterrupted, "outer")
    assert [r["outer_step"] for r in outer] == [1, 2, 3, 4]
    for record in outer:
        assert record["replicas"] == 2 and record["participants"] == 2
        assert len(record["replica_hashes"]) == 2 and len(set(record["replica_hashes"])) == 1
        assert len(record["bytes_sent_per_rank"]) == 4 and all(b > 0 for b in record["bytes_sent_per_rank"])
    done = summary(uninterrupted)
    assert done["status"] == "ok" and done["replicas_agree"] and done["world_size"] == 4
    assert done["final_param_hash"] == outer[-1]["param_hash"]
    # ... and the replicas trained on different data between syncs
    inner = records(uninterrupted, "inner")
    by_replica = {replica: [r["loss"] for r in inner if r["replica"] == replica] for replica in (0, 1)}
    assert by_replica[0] != by_replica[1]


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def test_sigkill_mid_round_resumes_bit_exact_from_the_sharded_checkpoint(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    process = launch(run_dir, 4, *REPLICAS, "parallel.sharding=fsdp", max_restarts=2)
    sealed = run_dir / "checkpoints" / "step-000002" / "COMPLETE"
    deadline = time.time() + 600
    while not sealed.exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.02)
    workers = _children(process.pid)
    assert len(workers) == 4
    os.kill(workers[3], signal.SIGKILL)  # the second rank of replica 1, in round 3
    output = finish(process, timeout=900)
    resumes = records(run_dir, "resume")
    assert resumes and resumes[0]["outer_step"] >= 2, output[-3000:]
    assert summary(run_dir)["final_param_hash"] == summary(uninterrupted)["final_param_hash"]
    straight = {(r["step"], r["rank"]): r["loss"] for r in records(uninterrupted, "inner")}
    resumed = {(r["step"], r["rank"]): r["loss"] for r in records(run_dir, "inner")}
    assert resumed == straight  # every step's loss, bit for bit (a repeated step logs the same value)


def test_bf16_under_fsdp_computes_in_bf16_over_fp32_master_shards(tmp_path):
    """FSDP's mixed-precision policy replaces autocast: with lr 0 nothing moves, so a round ships an
    exact zero (bf16 rounding never reaches the fp32 shards DiLoCo measures against)."""
    run_dir = run(
        tmp_path / "bf16", 2, "replica_size=2", "rounds=2", "model.dtype=bfloat16", "optim.lr=0",
        "parallel.sharding=fsdp", "eval.every=0",
    )  # fmt: skip
    assert [r["pseudo_grad_norm"] for r in records(run_dir, "outer")] == [0.0, 0.0]
    inner = records(run_dir, "inner")
    assert all(math.isfinite(r["loss"]) for r in inner) and any(r["loss"] != 0 for r in inner)
    assert inner[0]["sampler_logp_diff"] < 0.05  # sampler and trainer both compute in bf16


def test_activation_checkpointing_changes_no_loss(parity, tmp_path):
    run_dir = run(tmp_path / "ac", 2, *PARITY, "parallel.sharding=fsdp", "parallel.activation_checkpointing=true")
    with_ac = [r["loss"] for r in records(run_dir, "inner")]
    assert with_ac == [r["loss"] for r in records(parity["fsdp"], "inner")]


# ---------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """A short `make smoke` run (configs/smoke.yaml: two replicas of one process, unsharded)."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    sets = ("rounds=1", "optim.sft_steps=40", "rollout.prompts_per_step=4", "eval.every=0")
    finish(torchrun(run_dir, *sets, config="smoke.yaml"), timeout=900)
    return run_dir


def checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's replica-0 weights, read with the libraries' own readers (not the
    export's): safetensors for an unsharded checkpoint, torch's DCP-to-torch.save converter for a
    sharded one."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    newest = max((run_dir / "checkpoints").glob("step-*"))
    if (newest / "replica-0.safetensors").exists():
        return load_file(newest / "replica-0.safetensors")
    converted = run_dir / "converted.pt"
    dcp_to_torch_save(newest / "replica-0", converted)
    return torch.load(converted, weights_only=False)["model"]


@pytest.mark.parametrize("which", ["smoke", "sharded"])
def test_the_export_loads_with_from_pretrained_and_gives_the_checkpoints_logits(smoke, parity, tmp_path, which):
    """Must show 4: an unsharded smoke checkpoint and a sharded one, exported and loaded back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.diloco import parameters_hash

    run_dir = smoke if which == "smoke" else parity["fsdp"]
    out = tmp_path / "hf"
    result = subprocess.run(
        [PYTHON, "-m", "trainer.export", str(run_dir), "--out", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert parameters_hash(exported) == summary(run_dir)["final_param_hash"]  # the run's last weights

    reference = AutoModelForCausalLM.from_config(exported.config).eval()
    missing, unexpected = reference.load_state_dict(checkpoint_weights(run_dir), strict=False)
    assert not unexpected and set(missing) < {"lm_head.weight", "model.embed_tokens.weight"}  # tied: stored once
    batch = tokenizer(["What is 12 + 7?", "Add 10 and 25, then 3."], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = reference(**batch).logits
        got = exported(**batch).logits
    assert torch.equal(got, expected)
    assert exported.generation_config.do_sample and exported.generation_config.top_k == 0


def test_the_export_refuses_an_existing_directory_and_a_damaged_step_by_name(parity, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    result = subprocess.run(
        [PYTHON, "-m", "trainer.export", str(parity["fsdp"]), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr == f"error: --out {out}: already exists; choose a new directory\n"
    result = subprocess.run(
        [PYTHON, "-m", "trainer.export", str(parity["fsdp"]), "--step", "7", "--out", str(tmp_path / "x")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--step 7: not a sealed checkpoint" in result.stderr


# ---------------------------------------------------------------------------- two ranks in step


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("harness")
    command = torchrun_command(2, str(REPO / "tests/integration/_fsdp_harness.py"), str(out))
    env = torchrun_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )
    assert result.returncode == 0, failure(result.stdout)
    return [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]


def test_full_weights_arrive_group_by_group_in_the_same_order_on_every_rank(harness):
    assert harness[0]["weights_digest"] == harness[1]["weights_digest"] == harness[0]["plain_digest"]
    assert harness[0]["weights"] == 26  # the tiny 2-layer Qwen2's tensors, the tied lm_head once


def test_ranks_sample_different_prompts_lengths_and_calls_without_a_collective(harness):
    assert [r["sample_width"] for r in harness] == [3, 11] and all(r["samples_equal"] for r in harness)
    assert harness[0]["grad_norm"] == harness[1]["grad_norm"] > 0  # training afterwards still pairs


def test_an_engine_that_stops_reading_times_the_push_out_on_the_pushing_rank_only(harness):
    assert harness[0]["push_error"].endswith("to the inference engine did not finish within 2 s")
    assert harness[1]["pushed"] == 0  # the other rank took part in every gather and went on
