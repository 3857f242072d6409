"""Environments end to end through the worker (one process, the tiny model): math scored by
reasoning-gym's checker, HumanEval and feature deletion scored by their tests in the sandbox, the
SDPO teacher reading the environment's feedback on each sample. Rewards may be 0 for a random
model; the path must run."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.strict_json import read_strict, read_strict_lines
from trainer.config import load_config
from trainer.model import tiny_model_and_tokenizer
from trainer.rollout.sampling import HFEngine, decode_completions
from trainer.rollout.templates import stop_token_ids
from trainer.run.build import build_env
from trainer.run.collectors import Policy, make_collector

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

ONE_ROUND = (
    "rounds=1",
    "optim.sft_steps=0",
    "task.hint_level=feedback",
    "task.sibling_hints=false",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_completion_length=12",
    "eval.size=4",
)


def run_one_round(run_dir: Path, *overrides: str) -> list[dict]:
    sets = [arg for item in (*ONE_ROUND, *overrides) for arg in ("--set", item)]
    command = [sys.executable, "-m", "trainer.worker", "--config", str(REPO / "configs" / "test.yaml"), *sets]
    env = {**os.environ, "COMPOSER_RUN_DIR": str(run_dir)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = read_strict_lines(run_dir / "metrics.jsonl")  # strict JSON: no NaN, no Infinity
    assert read_strict(run_dir / "summary.json")["status"] == "ok"
    return records


def check_the_path_ran(records: list[dict], *, sandboxed: bool) -> None:
    inner = [r for r in records if r["event"] == "inner"]
    assert len(inner) == 2  # H = 2 steps of one round
    assert all(math.isfinite(r["loss"]) and r["sdpo"] > 0 for r in inner)  # the hinted teacher scored
    assert all(0.0 <= r["reward"] <= 1.0 and r["teacher_reward"] is not None for r in inner)
    if sandboxed:  # 4 student samples and 2 teacher samples a step went through the sandbox
        assert all(r["execution_s"] > 0 for r in inner)
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["size"] for r in evals] == [4, 4]  # before training and after the round


def test_each_row_s_teacher_prompt_holds_that_row_s_own_attempt_and_feedback(tmp_path):
    """The worker's collection step (its collector, environment and sandbox, in this process) at
    hint_level feedback: the SDPO teacher of row r reads row r's attempt and the environment's
    feedback on it, not a sibling's (`sdpo > 0` holds either way)."""
    config = load_config(
        REPO / "configs" / "test.yaml",
        [*ONE_ROUND, "task.source=reasoning_gym:gsm_symbolic", "rollout.max_prompt_length=512"],
    )
    env = build_env(config)
    m = config.model
    model, tokenizer = tiny_model_and_tokenizer(
        env.corpus(),
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        cache_dir=tmp_path,
    )
    torch.manual_seed(0)
    policy = Policy(model, tokenizer, HFEngine(model, tokenizer), stop_token_ids(tokenizer, model))
    samples, _ = make_collector(config, env).collect(
        policy, rng=random.Random(0), teacher=model, feed=None, id_prefix="t", episodes_file=None
    )
    p = samples.policy
    attempts = decode_completions(tokenizer, p.completion_ids, p.completion_mask)
    teachers = decode_completions(tokenizer, p.teacher_prompt_ids, p.teacher_prompt_mask)  # the unpadded prompts
    blocks = [
        f"The attempt:\n{attempt.strip()}\nFeedback:\n{score.feedback.strip()}"
        for attempt, score in zip(attempts, samples.scores, strict=True)
    ]
    assert len(blocks) == 4 and len(set(blocks)) == 4, blocks  # every row's own: a wrong row cannot pass
    for row, teacher in enumerate(teachers):
        assert blocks[row] in teacher, (row, teacher)
        assert all(block not in teacher for other, block in enumerate(blocks) if other != row)


def test_reasoning_gym_gsm_symbolic_runs_through_the_worker_with_feedback_hints(tmp_path):
    records = run_one_round(tmp_path / "gsm", "task.source=reasoning_gym:gsm_symbolic", "rollout.max_prompt_length=512")
    check_the_path_ran(records, sandboxed=False)


def test_humaneval_runs_through_the_worker_with_its_checks_in_the_sandbox(tmp_path):
    records = run_one_round(tmp_path / "he", "task.source=humaneval", "rollout.max_prompt_length=1024")
    check_the_path_ran(records, sandboxed=True)


def test_one_feature_deletion_round_runs_through_the_worker(tmp_path):
    records = run_one_round(
        tmp_path / "fd",
        "task.source=feature_deletion",
        "task.options={context_lines: 4}",
        "rollout.max_prompt_length=2048",
    )
    check_the_path_ran(records, sandboxed=True)
