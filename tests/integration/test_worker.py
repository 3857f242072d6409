"""The training run end to end under torchrun: replicas agree, SIGKILL + resume is bit-exact,
channels can be switched off, and a broken config is one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
pytestmark = pytest.mark.integration


def worker_command(*overrides: str) -> list[str]:
    sets = [arg for item in overrides for arg in ("--set", item)]
    return ["-m", "trainer.worker", "--config", str(REPO / "configs" / "test.yaml"), *sets]


def torchrun(run_dir: Path, *overrides: str, max_restarts: int = 0) -> subprocess.Popen:
    command = [
        TORCHRUN,
        "--standalone",
        "--nproc-per-node=2",
        f"--max-restarts={max_restarts}",
        *worker_command(*overrides),
    ]
    # Restarted workers must not share torchrun's rendezvous store: they could read the dead
    # attempt's addresses and fail to connect (pytorch/pytorch#135712).
    env = {**os.environ, "COMPOSER_RUN_DIR": str(run_dir), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def records(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


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
    outer_steps = {r["outer_step"] for r in records(run_dir, "outer")}
    assert outer_steps == {1, 2, 3, 4, 5, 6}  # none missing (a repeated one is allowed)
    assert summary(run_dir)["final_param_hash"] == summary(uninterrupted)["final_param_hash"]


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
