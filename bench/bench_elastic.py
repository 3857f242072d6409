"""Churn: four replicas, one killed (SIGKILL) every few outer steps and restarted by its torchrun,
under elastic DiLoCo against no churn and against today's stop-and-resume.

Scenarios (the same tiny config, 4 replicas of one process, H = 4, 24 outer steps):

- ``no churn``: elastic DiLoCo (`diloco.elastic`), nothing killed: the reference.
- ``elastic churn``: elastic, and every KILL_EVERY outer steps one replica's worker (replicas 1, 2,
  3 in turn; replica 0 is the survivor watched) is SIGKILLed; its own `torchrun --standalone`
  restarts it and it is healed by a peer at a round boundary; the others never stop.
- ``stop-and-resume``: one `torchrun --nproc-per-node=4` world (what runs without `diloco.elastic`),
  the same kills: torchrun restarts every worker and the run resumes from its newest checkpoint.

Measured from each run's own books (metrics.jsonl, the latest record of each outer step):
``wall_s`` (launch to exit), ``training_s`` (the first outer step in the books to the end),
``survivor_utilisation`` (replica 0's compute seconds in the rounds the run kept, over
training_s), ``participants`` per outer step, and the reward curve (mean reward of each round's
inner steps). Writes bench/results/elastic.{md,json,png}; about
7 minutes on a shared 2-core machine. Run from the repo root: `.venv/bin/python bench/bench_elastic.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch.distributed import TCPStore  # noqa: E402

from trainer.run.placement import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
REPLICAS = 4
SETS = (  # configs/test.yaml, warmed up enough to have a reward to follow
    "optim.sft_steps=150",
    "optim.sft_lr=3e-3",
    "optim.lr=3e-4",
    "rollout.prompts_per_step=12",
    "diloco.sync_every=4",
    "task.max_operand=5",
    "model.hidden_size=48",
    "eval.every=0",
    "keep_checkpoints=2",
)
ELASTIC = (
    "diloco.elastic=true",
    "diloco.quorum_timeout_s=60",
    "diloco.heartbeat_s=0.5",
    "diloco.heartbeat_timeout_s=3",
)


def command(rounds: int, *extra: str, nproc: int = 1, restarts: int = 10) -> list[str]:
    argv = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={restarts}", "-m", "trainer.worker"]
    argv += ["--config", str(REPO / "configs" / "test.yaml")]
    return argv + [arg for item in (*SETS, f"rounds={rounds}", *extra) for arg in ("--set", item)]


def children(pid: int) -> list[int]:
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    ranks = [int(item[5:]) for item in environ if item.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def outer_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if r["event"] == "outer"
    ]


def run(name: str, run_dir: Path, rounds: int, kill_every: int | None, elastic: bool) -> dict[str, Any]:
    """One scenario to its end; kills a worker whenever the books reach the next multiple of kill_every."""
    run_dir.mkdir(parents=True)
    env = {**os.environ, "COMPOSER_RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env |= {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "MASTER_ADDR": "127.0.0.1"}
    logs = []
    started = time.monotonic()
    if elastic:
        store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
        env |= {"COMPOSER_ELASTIC_STORE": f"127.0.0.1:{store.port}", "COMPOSER_REPLICAS": str(REPLICAS)}
        agents = []
        for replica in range(REPLICAS):
            logs.append((run_dir.parent / f"{name}-{replica}.log").open("w"))
            agents.append(
                subprocess.Popen(
                    command(rounds, *ELASTIC),
                    cwd=REPO,
                    env=env | {"COMPOSER_REPLICA_ID": str(replica)},
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                )
            )
    else:
        logs.append((run_dir.parent / f"{name}.log").open("w"))
        agents = [
            subprocess.Popen(
                command(rounds, "dist_timeout_s=30", nproc=REPLICAS),
                cwd=REPO,
                env=env,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
            )
        ]
    kills, victims, next_kill = [], [1, 2, 3], kill_every
    first_outer = None  # when the books first show an outer step: start-up and warm-up are over
    while any(agent.poll() is None for agent in agents):
        steps = {r["outer_step"] for r in outer_records(run_dir)}
        if steps and first_outer is None:
            first_outer = time.monotonic()
        if next_kill is not None and next_kill in steps and next_kill < rounds - kill_every:
            victim = victims[len(kills) % len(victims)]
            if elastic:
                pids = children(agents[victim].pid)
            else:
                pids = [pid for pid in children(agents[0].pid) if rank_of(pid) == victim]
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                kills.append({"outer_step": next_kill, "replica": victim, "s": round(time.monotonic() - started, 1)})
                print(f"  {name}: killed replica {victim} after outer step {next_kill}", flush=True)
            next_kill += kill_every
        time.sleep(0.2)
    wall = time.monotonic() - started
    training_end = time.monotonic()
    codes = [agent.returncode for agent in agents]
    latest = {r["outer_step"]: r for r in outer_records(run_dir)}  # a resumed run may log a step twice
    inner = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip() and json.loads(line)["event"] == "inner"
    ]
    by_step: dict[tuple[int, int], dict] = {(r["step"], r["rank"]): r for r in inner}
    rewards: dict[int, list[float]] = {}
    for record in by_step.values():
        rewards.setdefault(record["round"] + 1, []).append(record["reward"])
    # replica 0 (never killed): its compute seconds in the rounds the run kept, after the first
    survivor_compute = sum(record["compute_s"][0] for step, record in latest.items() if step > 1)
    training_s = training_end - (first_outer or started)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return {
        "scenario": name,
        "exit_codes": codes,
        "status": summary.get("status"),
        "outer_steps": sorted(latest),
        "kills": kills,
        "wall_s": round(wall, 1),
        "training_s": round(training_s, 1),
        "survivor_compute_s": round(survivor_compute, 2),
        "survivor_utilisation": round(survivor_compute / training_s, 3),
        "participants": [latest[s].get("participants") for s in sorted(latest)],
        "reward": [round(sum(v) / len(v), 4) for _, v in sorted(rewards.items())],
        "resumes": sum(
            1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event": "resume"' in line
        ),
        "final_replicas_agree": summary.get("replicas_agree"),
    }


def write(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPU cores, shared with other work while it ran",
        "replicas": REPLICAS,
        "rounds": args.rounds,
        "kill_every": args.kill_every,
        "config": ["configs/test.yaml", *SETS],
    }
    write_json(RESULTS / "elastic.json", {"meta": meta, "scenarios": results})
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    # equal curves (no churn, stop-and-resume) stay visible: a big marker under a dashed line
    styles = {"no churn": ("-", 6), "elastic churn": ("-", 3), "stop-and-resume": ("--", 3)}
    for result in results:
        steps = result["outer_steps"]
        line, size = styles.get(result["scenario"], ("-", 3))
        rounds = range(1, len(result["reward"]) + 1)
        left.plot(rounds, result["reward"], line, marker="o", ms=size, label=result["scenario"])
        right.step(steps, result["participants"], line, where="mid", label=result["scenario"])
    left.set(xlabel="outer step (round)", ylabel="mean sampled reward", title="reward per round")
    right.set(
        xlabel="outer step", ylabel="replicas averaged", title="participants per outer step", ylim=(0, REPLICAS + 0.5)
    )
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / "elastic.png", dpi=120)
    base = next(r for r in results if r["scenario"] == "no churn")
    lines = [
        "# Elastic DiLoCo under churn (`bench/bench_elastic.py`)",
        "",
        f"{REPLICAS} replicas of one process, H = 4, {args.rounds} outer steps of a tiny model "
        f"(configs/test.yaml + {', '.join(SETS)}); in the churn scenarios one worker (replicas 1, 2, 3 in "
        f"turn) is SIGKILLed every {args.kill_every} outer steps and restarted by its torchrun. "
        f"Measured on {meta['machine']}: timings are of this loaded machine, compare them within the table.",
        "",
        "| scenario | wall s | vs no churn | training s | survivor utilisation | kills | resumes | outer steps | "
        "mean participants | final replicas agree | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mean = sum(r["participants"]) / len(r["participants"]) if r["participants"] else 0
        cells = [r["scenario"], r["wall_s"], f"{r['wall_s'] / base['wall_s']:.2f}x", r["training_s"]]
        cells += [f"{r['survivor_utilisation']:.3f}"]
        cells += [len(r["kills"]), r["resumes"], len(r["outer_steps"]), f"{mean:.2f}", r["final_replicas_agree"]]
        lines.append("| " + " | ".join(map(str, [*cells, r["status"]])) + " |")
    lines += [
        "",
        "- **wall s**: launch to the last process's exit (start-up and warm-up included, equal in all three).",
        "- **training s**: from the first outer step in the books to the end (start-up and warm-up left out).",
        "- **survivor utilisation**: replica 0 (never killed): its compute seconds (`compute_s`, outside "
        "DiLoCo's exchanges) in outer steps 2.. the run kept (the latest record of each), over the training "
        "seconds. Under stop-and-resume every kill also stops replica 0: the restart, the reload and the "
        "replayed round are time it does not compute; elastically it only waits at the boundary for a "
        "dead peer's heartbeat to time out (3 s here).",
        "- **mean participants**: replicas averaged per outer step; under elastic churn a killed replica is out "
        "until its torchrun has restarted it and a peer has healed it (about 6 rounds here), then back.",
        "- **reward**: stop-and-resume replays each interrupted round bit for bit, so its curve is the no-churn "
        "one; elastic churn averages fewer replicas while one is away, so its curve departs after the first kill.",
        "- Four replicas share 2 cores here: while one is down the others get more CPU, which is why elastic "
        "churn keeps pace with no churn (and its survivor utilisation can exceed it); on machines of their own "
        "a replica that is away is only missing work. The gap to stop-and-resume is what the survivors lose: "
        "every kill restarts all four, reloads the checkpoint and replays the round.",
        "",
        "![reward and participants](elastic.png)",
        "",
    ]
    (RESULTS / "elastic.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--kill-every", type=int, default=6)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-elastic")
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for name, kill_every, elastic in (
        ("no churn", None, True),
        ("elastic churn", args.kill_every, True),
        ("stop-and-resume", args.kill_every, False),
    ):
        print(f"== {name}", flush=True)
        result = run(name, args.out / stamp / name.replace(" ", "-"), args.rounds, kill_every, elastic)
        print(
            f"  {json.dumps({k: result[k] for k in ('wall_s', 'survivor_utilisation', 'kills', 'status')})}", flush=True
        )
        results.append(result)
    write(results, args)
    print(f"wrote {RESULTS / 'elastic.md'}", flush=True)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
