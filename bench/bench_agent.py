"""Multi-turn agent episodes (`trainer.rollout.episodes`): episodes per second, and the cost of each tool call.

Two measurements on `agent_code_arith` tasks, one torch thread (token-by-token decoding of the tiny
model is fastest that way on a shared CPU):

- tool calls: each tool executed directly against a fresh workspace, REPEATS times: read_file,
  write_file and edit_file are text I/O on the host; run_tests runs the target file against the
  task's check in the sandbox (the bubblewrap process backend, zygote as root). Median ms per call.
- episodes: the tiny model of configs/agent-smoke.yaml (hidden 128, 2 layers) after its supervised
  warm-up on scripted episodes (`AgentCodeArith.scripted_episode`, WARMUP_STEPS x 16), runs
  EPISODES episodes at temperature 1 (max 4 turns, 384 tokens, 64 per turn), once one at a time
  (`run_episode`) and once in lockstep (`run_episodes`: one batched generate per turn, as a training
  step does); episodes/s, and the split of the time between the model and the tools.

Writes bench/results/agent.md and agent.json. Run from the repo root: `.venv/bin/python bench/bench_agent.py`.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from trainer.envs import make_env
from trainer.envs.workspace import ParsedCall, Workspace, execute_tool
from trainer.model import tiny_model_and_tokenizer
from trainer.rollout.episodes import episode_metrics, run_episode, run_episodes
from trainer.rollout.warmup import episode_warmup
from trainer.sandbox import SandboxConfig, make_sandbox

REPEATS = 30
EPISODES = 64
WARMUP_STEPS = 300
SETTINGS = dict(max_turns=4, max_tokens=384, max_turn_tokens=64, temperature=1.0)
OUT = Path(__file__).resolve().parent / "results"


def tool_costs(env, box) -> dict[str, float]:
    task = env.train[0]
    calls = {
        "read_file": ParsedCall("read_file", {"path": "test_calc.py"}, ""),
        "write_file": ParsedCall("write_file", {"path": "calc.py", "content": task.reference}, ""),
        "edit_file": ParsedCall("edit_file", {"path": "calc.py", "old": "?", "new": "+"}, ""),
        "run_tests": ParsedCall("run_tests", {}, ""),
    }
    execute_tool(calls["run_tests"], task, Workspace(task.files), box, tuple(calls))  # warm: zygote, page cache
    costs = {}
    for name, call in calls.items():
        times = []
        for _ in range(REPEATS):
            workspace = Workspace(task.files)
            start = time.perf_counter()
            execute_tool(call, task, workspace, box, tuple(calls))
            times.append((time.perf_counter() - start) * 1000)
            workspace.close()
        costs[name] = statistics.median(times)
    return costs


def episodes(env, box) -> dict[str, float]:
    model, tokenizer = tiny_model_and_tokenizer(env.corpus(), hidden_size=128, num_layers=2)
    start = time.perf_counter()
    losses = episode_warmup(
        model,
        tokenizer,
        env.train,
        steps=WARMUP_STEPS,
        batch_size=16,
        lr=2e-3,
        rng=random.Random(0),
        script=env.scripted_episode,
    )
    warmup_s = time.perf_counter() - start
    rng = random.Random(0)
    tasks = [env.sample(rng) for _ in range(EPISODES)]
    figures = {"warmup_steps": WARMUP_STEPS, "warmup_loss_first": losses[0], "warmup_loss_last": losses[-1]}
    figures["warmup_s"] = warmup_s
    for mode in ("one_at_a_time", "lockstep"):
        torch.manual_seed(0)
        start = time.perf_counter()
        if mode == "lockstep":
            done = run_episodes(model, tokenizer, tasks, sandbox=box, **SETTINGS)
        else:
            done = [run_episode(model, tokenizer, task, sandbox=box, **SETTINGS) for task in tasks]
        wall = time.perf_counter() - start
        metrics = episode_metrics(done)
        figures[mode] = {
            "episodes": EPISODES,
            "episodes_per_s": EPISODES / wall,
            "turns_per_episode": metrics["episode_turns"],
            "tokens_per_episode": metrics["episode_tokens"],
            "tool_calls": sum(v for k, v in metrics.items() if k.startswith("tool_calls/")),
            "error_observations": metrics["error_observations"],
            "passed": metrics["episode_passed"],
            "model_s": metrics["model_s"],
            "tools_s": metrics["tools_s"],
            "wall_s": wall,
        }
    return figures


def main() -> None:
    torch.set_num_threads(1)
    env = make_env("agent_code_arith")
    box = make_sandbox(SandboxConfig())
    costs = tool_costs(env, box)
    figures = episodes(env, box)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, root={os.geteuid() == 0}"
    OUT.mkdir(exist_ok=True)
    (OUT / "agent.json").write_text(json.dumps({"machine": machine, "tool_ms": costs, **figures}, indent=2) + "\n")
    lines = [
        "# Agent episodes (`bench/bench_agent.py`)",
        "",
        f"Machine: {machine}. One torch thread. Task family: agent_code_arith.",
        "",
        f"## Cost per tool call (median of {REPEATS}, ms)",
        "",
        "| tool | where | ms |",
        "|---|---|---:|",
    ]
    for name, ms in costs.items():
        where = "sandbox (bubblewrap)" if name == "run_tests" else "host text I/O"
        lines.append(f"| {name} | {where} | {ms:.2f} |")
    lines += [
        "",
        f"## Episodes (tiny model after {WARMUP_STEPS} warm-up steps on scripted episodes, {EPISODES} episodes)",
        "",
        "| decoding | episodes/s | turns/episode | tokens/episode | tool calls | error obs. | passed | model s "
        "| tools s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("one_at_a_time", "lockstep"):
        f = figures[mode]
        lines.append(
            f"| {mode.replace('_', ' ')} | {f['episodes_per_s']:.2f} | {f['turns_per_episode']:.2f} "
            f"| {f['tokens_per_episode']:.0f} | {f['tool_calls']:.0f} | {f['error_observations']:.0f} "
            f"| {f['passed']:.2f} | {f['model_s']:.1f} | {f['tools_s']:.2f} |"
        )
    lines += [
        "",
        "Lockstep: each turn is one batched `generate` over the episodes still running (each row keeps",
        "exactly its own ids); one at a time: batch 1. The warm-up teaches the tools, not the operator",
        "(drawn at random in the scripts), so about a third of the episodes pass before RL.",
    ]
    (OUT / "agent.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
