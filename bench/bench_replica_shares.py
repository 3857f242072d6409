"""Cross-replica bytes per process when a replica is several processes (`replica_size` S > 1).

Two DiLoCo replicas of the tiny smoke-sized model, run by the real worker under torchrun: once with
one process per replica (2 processes), once with two (4 processes, `replica_size: 2`). With S
processes a replica, each exchanges its 1/S share of the parameters with its counterparts in the
other replicas and then broadcasts it inside the replica, so a replica still ships one model's
worth and each process 1/S of it (before, every process shipped the whole model: S times the
traffic). Figures are the worker's own `bytes_sent_per_rank` (payload bytes DiLoCo put on the wire,
see trainer.diloco) for the first outer step. Writes bench/results/replica_shares.{md,json}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.run.placement import write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SETTINGS = ("rounds=2", "eval.every=0", "model.hidden_size=64", "model.num_layers=2")


def outer_records(nproc: int, replica_size: int, run_dir: Path) -> list[dict]:
    sets = [a for s in (*SETTINGS, f"replica_size={replica_size}") for a in ("--set", s)]
    command = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "trainer.worker"]
    command += ["--config", "configs/test.yaml", *sets]
    env = {**os.environ, "COMPOSER_RUN_DIR": str(run_dir), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "outer"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for nproc, size in ((2, 1), (4, 2)):
            outer = outer_records(nproc, size, Path(tmp) / f"s{size}")
            rows.append(
                dict(
                    processes=nproc,
                    replica_size=size,
                    replicas=outer[0]["replicas"],
                    bytes_per_process=outer[0]["bytes_sent_per_rank"],
                    replicas_agree=all(len(set(r["replica_hashes"])) == 1 for r in outer),
                )
            )
    full = rows[0]["bytes_per_process"][0]
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "replica_shares.json", rows)
    lines = [
        "# Cross-replica bytes per process with `replica_size` > 1 (`bench/bench_replica_shares.py`)",
        "",
        "2 DiLoCo replicas of a 2x64 tiny Qwen2 (configs/test.yaml), fp32 pseudo-gradients, first outer step.",
        "",
        "| processes | replica_size | bytes sent per process | vs one process a replica | replicas agree |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ratios = ", ".join(f"{b / full:.3f}" for b in row["bytes_per_process"])
        lines.append(
            f"| {row['processes']} | {row['replica_size']} | {', '.join(map(str, row['bytes_per_process']))} | "
            f"{ratios} | {row['replicas_agree']} |"
        )
    lines += ["", "Before this change every process of a replica shipped the whole model (ratio 1.0 each)."]
    (RESULTS / "replica_shares.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
