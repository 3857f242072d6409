"""The training run end to end under torchrun: replicas agree, SIGKILL + resume is bit-exact,
channels can be switched off, and a broken config is one clear line."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.strict_json import read_strict, read_strict_lines
from tests.support.torchrun import PYTHON, finish, worker_command
from tests.support.torchrun import launch as torchrun
from trainer.metrics import read_metrics, unnamed_keys

pytestmark = pytest.mark.integration


def records(run_dir: Path, event: str) -> list[dict]:
    """metrics.jsonl's records of `event`, read as strict JSON (NaN or Infinity in it fails the test)."""
    return [r for r in read_strict_lines(run_dir / "metrics.jsonl") if r["event"] == event]


def summary(run_dir: Path) -> dict:
    return read_strict(run_dir / "summary.json")


# The EMA teacher and the DPO replay buffer are the state a resume is most likely to lose.
RESUMABLE = ("rounds=6", "loss.teacher=ema")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    finish(torchrun(run_dir, *RESUMABLE))
    return run_dir


def test_replicas_agree_after_every_outer_step(uninterrupted):
    outer = records(uninterrupted, "outer")
    assert [r["outer_step"] for r in outer] == [1, 2, 3, 4, 5, 6]
    for record in outer:
        assert record["replicas"] == 2 and record["participants"] == 2
        assert len(record["replica_hashes"]) == 2 and len(set(record["replica_hashes"])) == 1
        assert record["rank_hashes"] == record["replica_hashes"]  # one process a replica
        assert record["pseudo_grad_norm"] > 0 and record["bytes_sent"] > 0
    # ... and yet the replicas trained on different data between syncs
    inner = records(uninterrupted, "inner")
    assert {r["replica"] for r in inner} == {0, 1}
    assert len(inner) == 2 * 6 * 2  # replicas x rounds x H
    done = summary(uninterrupted)
    assert done["status"] == "ok" and done["replicas_agree"] and done["outer_steps"] == 6
    assert done["final_param_hash"] == outer[-1]["param_hash"]
    assert (uninterrupted / "curves.png").stat().st_size > 10_000
    # all three channels did work on this run (pairs come from disagreeing siblings)
    assert any(r["dpo"] != 0 for r in inner) and all(r["sdpo"] > 0 for r in inner)
    assert all(r["teacher_reward"] is not None for r in inner)


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def test_sigkill_mid_round_resumes_bit_exact(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    process = torchrun(run_dir, *RESUMABLE, max_restarts=2)
    sealed = run_dir / "checkpoints" / "step-000002" / "COMPLETE"
    deadline = time.time() + 300
    while not sealed.exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.02)
    workers = _children(process.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # round 3 is under way now
    output = finish(process)
    resumes = records(run_dir, "resume")
    assert resumes and resumes[0]["outer_step"] >= 2, output[-3000:]
    assert unnamed_keys(read_metrics(run_dir / "metrics.jsonl")) == []  # the resume record is described too
    outer_steps = {r["outer_step"] for r in records(run_dir, "outer")}
    assert outer_steps == {1, 2, 3, 4, 5, 6}  # none missing (a repeated one is allowed)
    assert summary(run_dir)["final_param_hash"] == summary(uninterrupted)["final_param_hash"]
    # the verdict covers every round, not only those after the resume: the same figures as without a kill
    for key in ("reward_first", "reward_last", "reward_rise", "eval_pass_at_1_first", "eval_pass_at_1_last"):
        assert summary(run_dir)[key] == summary(uninterrupted)[key], key


def test_a_worker_that_dies_after_the_summary_leaves_the_run_finished_not_restarted_beside_it(uninterrupted, tmp_path):
    """Seen in the 4-container compose test: a rank aborted in a library's teardown after the
    summary; torchrun restarted every worker, and each began a new run in <dir>-2 (which the
    container could not create). A restart after the end must find this run done."""
    run_dir = tmp_path / "aborted"
    output = finish(torchrun(run_dir, *RESUMABLE, "debug.abort_at_exit_rank=1", max_restarts=1))
    assert "exitcode: -6" in output  # the injected abort happened, and torchrun restarted the group
    assert f"{run_dir} already holds this run's summary (a worker failed after it): nothing to redo" in output
    assert not run_dir.with_name("aborted-2").exists() and not records(run_dir, "resume")
    assert summary(run_dir)["final_param_hash"] == summary(uninterrupted)["final_param_hash"]
    assert [r["outer_step"] for r in records(run_dir, "outer")] == [1, 2, 3, 4, 5, 6]  # nothing ran twice


@pytest.mark.parametrize("channel", ["loss.alpha=0", "loss.beta=0"])
def test_a_channel_switched_off_costs_no_forward(tmp_path, channel):
    run_dir = tmp_path / "run"
    env = {**os.environ, "COMPOSER_RUN_DIR": str(run_dir)}
    result = subprocess.run(
        [PYTHON, *worker_command(channel, "rounds=2")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    inner = records(run_dir, "inner")
    assert len(inner) == 4
    if channel == "loss.alpha=0":
        assert all(r["sdpo"] == 0 and r["teacher_reward"] is None for r in inner)
        # the student forward and the DPO forward (once pairs exist), never a teacher one
        assert all(r["loss_forwards"] == 1 + (r["pairs"] > 0) for r in inner)
    else:
        assert all(r["dpo"] == 0 and r["pairs"] == 0 and r["reference_forwards"] == 0 for r in inner)
        assert all(r["loss_forwards"] == 2 for r in inner)  # student + teacher
        assert not (run_dir / "checkpoints" / "reference.safetensors").exists()


def test_broken_config_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("name: broken\ndiloco:\n  sync_every: 0\n")
    for module in ("trainer.worker", "trainer.config"):
        args = ["--config", str(config)] if module == "trainer.worker" else [str(config)]
        result = subprocess.run([PYTHON, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stderr == f"error: {config}:3: diloco.sync_every: must be >= 1, got 0\n"
        assert "Traceback" not in result.stdout + result.stderr


# ---------------------------------------------------------------------------- the real-model path


def run_worker(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """One run under torchrun (2 processes = 2 replicas), to the end."""
    process = torchrun(run_dir, *overrides)
    output, _ = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 saved as a hub model would ship: weights, tokenizer, and a generation_config.json
    whose repetition penalty and top-k `generate` would apply unless the run sets sampling itself."""
    from trainer.model import save_tiny_hub_model

    return save_tiny_hub_model(tmp_path_factory.mktemp("hub") / "tiny-qwen2", repetition_penalty=1.3, top_k=5)


HUB = ("optim.sft_steps=0", "rounds=2")


def test_a_saved_hub_model_trains_in_bf16_autocast_on_fp32_master_weights_that_all_move(hub_dir, tmp_path):
    """At a real model's learning rate (1e-5, the hub stand-in's), an AdamW step is below half a
    bf16 step for most weights: bf16 parameters updated in place would keep most of them where they
    were (trainer.precision). fp32 master weights move every one; the forwards compute in bf16."""
    run_dir = tmp_path / "bf16"
    result = run_worker(
        run_dir, f"model.name={hub_dir}", "model.dtype=bfloat16", "optim.lr=1e-5", "loss.teacher=ema", *HUB
    )
    assert result.returncode == 0, result.stdout[-3000:]
    outer = records(run_dir, "outer")
    assert len(outer) == 2 and all(len(set(r["rank_hashes"])) == 1 for r in outer)
    assert all(r["pseudo_grad_norm"] > 0 for r in outer)
    inner = records(run_dir, "inner")
    assert all(math.isfinite(r["loss"]) for r in inner)
    assert {r["logits_dtype"] for r in inner} == {"bfloat16"}  # measured: the forwards ran under autocast
    from safetensors.torch import load_file

    start = load_file(hub_dir / "model.safetensors")
    final = load_file(max((run_dir / "checkpoints").glob("step-*")) / "replica-0.safetensors")
    assert {str(t.dtype) for t in final.values()} == {"torch.float32"}  # the master weights stay fp32
    shared = sorted(set(start) & set(final))
    assert len(shared) >= len(final) - 1  # every parameter (the tied lm_head may be saved once)
    moved = sum(int((final[k] != start[k]).sum()) for k in shared)
    total = sum(final[k].numel() for k in shared)
    assert moved / total > 0.99, f"{moved}/{total} weights moved"


def test_the_sampler_is_the_policy_being_trained_despite_a_leaky_generation_config(hub_dir, tmp_path):
    result = run_worker(tmp_path / "fp32", f"model.name={hub_dir}", "rollout.temperature=0.7", *HUB)
    assert result.returncode == 0, result.stdout[-3000:]
    diffs = [r["sampler_logp_diff"] for r in records(tmp_path / "fp32", "inner")]
    assert len(diffs) == 8 and max(diffs) <= 1e-4, diffs  # 2 replicas x 2 rounds x H=2


def test_a_nan_loss_mid_round_is_skipped_and_the_run_finishes_with_equal_finite_replicas(tmp_path):
    run_dir = tmp_path / "nan"
    result = run_worker(run_dir, "debug.inject_nan_loss_at=1", "loss.teacher=ema")  # step 1 of H=2: not the last
    assert result.returncode == 0, result.stdout[-3000:]
    done = summary(run_dir)
    assert (done["skipped_steps"], done["skipped_replica_steps"]) == (1, 2)
    assert [r["step"] for r in records(run_dir, "inner") if r["skipped"]] == [1, 1]
    assert done["replicas_agree"] and done["status"] == "ok"
    from safetensors.torch import load_file

    newest = max((run_dir / "checkpoints").glob("step-*"))
    for replica in (0, 1):
        weights = load_file(newest / f"replica-{replica}.safetensors")
        assert all(bool(t.isfinite().all()) for t in weights.values())


def test_reusing_a_run_name_with_a_changed_key_is_one_line_naming_the_key(tmp_path):
    run_dir = tmp_path / "reuse"
    env = {**os.environ, "COMPOSER_RUN_DIR": str(run_dir)}
    first = subprocess.Popen([PYTHON, *worker_command("rounds=6")], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    sealed = run_dir / "checkpoints" / "step-000001" / "COMPLETE"
    deadline = time.time() + 300
    while not sealed.exists():
        assert first.poll() is None and time.time() < deadline, "the run ended before it was stopped"
        time.sleep(0.05)
    first.kill()  # an unfinished run with a checkpoint, as a crash leaves it
    first.wait()
    result = subprocess.run(
        [PYTHON, *worker_command("rounds=6", "optim.lr=0.5")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "other values for optim.lr;" in lines[0], result.stderr
    assert "--set resume=changed" in lines[0] and "--set name=NEW" in lines[0]
    again = subprocess.run(
        [PYTHON, *worker_command("rounds=6", "optim.lr=0.5", "resume=changed")], cwd=REPO, env=env, capture_output=True
    )
    assert again.returncode == 0 and records(run_dir, "resume")[0]["outer_step"] >= 1  # on purpose: resumed


def test_a_finished_run_is_never_resumed_the_next_run_writes_beside_it(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "done"
    shutil.copytree(uninterrupted, run_dir)
    process = torchrun(run_dir, *RESUMABLE)
    output = finish(process)
    assert f"{run_dir} holds a finished run; this run writes to {run_dir}-2" in output
    assert summary(run_dir) == summary(uninterrupted)  # left as it was
    assert not records(run_dir.with_name("done-2"), "resume")
    assert summary(run_dir.with_name("done-2"))["final_param_hash"] == summary(uninterrupted)["final_param_hash"]


def test_a_replica_of_two_processes_ships_half_the_model_per_process_and_replicas_agree(tmp_path):
    """replica_size 2, 2 replicas (4 processes): each process exchanges its half of the parameters
    with its counterpart, then shares it inside the replica; before, every process shipped all of it."""
    whole = records(run_and_check(tmp_path / "s1", nproc=2), "outer")  # 2 replicas of 1 process
    split = records(run_and_check(tmp_path / "s2", nproc=4, replica_size=2), "outer")
    assert [len(r["bytes_sent_per_rank"]) for r in split] == [4, 4]
    for one, two in zip(whole, split, strict=True):
        full = one["bytes_sent_per_rank"][0]  # one process shipping the whole model
        assert full > 0 and one["bytes_sent_per_rank"] == [full, full]
        halves = two["bytes_sent_per_rank"]
        assert halves[0] + halves[1] == pytest.approx(full, rel=0.01)  # the replica ships one model's worth
        assert max(halves) <= 0.51 * full
        assert len(set(two["replica_hashes"])) == 1 and two["replicas"] == 2
        # every process, not each replica's first: a share lost inside a replica shows only here
        assert len(two["rank_hashes"]) == 4 and len(set(two["rank_hashes"])) == 1, two["rank_hashes"]
    done = summary(tmp_path / "s2")
    assert done["replicas_agree"] and done["world_size"] == 4 and done["status"] == "ok"
    assert len(done["rank_hashes"]) == 4 and set(done["rank_hashes"]) == {done["final_param_hash"]}


def run_and_check(run_dir: Path, *, nproc: int, replica_size: int = 1) -> Path:
    finish(torchrun(run_dir, "rounds=2", f"replica_size={replica_size}", "eval.every=0", nproc=nproc), timeout=900)
    return run_dir


@pytest.mark.parametrize(
    ("decay", "expected"),
    [
        # configs/test.yaml: lr 1e-3, 3 rounds x 2 inner steps; step k < 2 takes lr * (k + 1) / 2
        ("none", [0.5e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]),
        # then from lr at step 2 to lr_min (1e-4) at the last step (5), a third of the way a step
        ("linear", [0.5e-3, 1e-3, 1e-3, 0.7e-3, 0.4e-3, 0.1e-3]),
        ("cosine", [0.5e-3, 1e-3, 1e-3, 0.775e-3, 0.325e-3, 0.1e-3]),
    ],
)
def test_the_inner_lr_ramps_over_warmup_steps_then_holds_or_decays_to_lr_min(tmp_path, decay, expected):
    result = run_worker(tmp_path / "lr", "optim.warmup_steps=2", f"optim.decay={decay}", "optim.lr_min=1e-4")
    assert result.returncode == 0, result.stdout[-3000:]
    by_step = {}
    for record in records(tmp_path / "lr", "inner"):
        by_step.setdefault(record["step"], set()).add(record["lr"])
    assert sorted(by_step) == list(range(6))
    for step, lr in enumerate(expected):
        assert [pytest.approx(lr)] == sorted(by_step[step]), (step, by_step[step])  # both replicas alike
