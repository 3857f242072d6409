"""`python -m orchestrator up|status|logs|down|build`: multi-node DiLoCo runs in containers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import docker

from orchestrator import launcher
from orchestrator.cluster import run_name
from orchestrator.images import DEFAULT_IMAGE, GPU_IMAGE, ImageBuildError, ensure_image


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run N trainer containers to the end of a run")
    up.add_argument("--workers", type=int, required=True, help="containers = DiLoCo replicas")
    up.add_argument("--config", required=True, help="config file, relative to the repository (e.g. configs/smoke.yaml)")
    up.add_argument("--run", help="run name (default: the config's file name); results land in RUNS_DIR/RUN")
    up.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, repeatable (passed to trainer.worker)",
    )
    up.add_argument("--image", help=f"default: {DEFAULT_IMAGE}, or {GPU_IMAGE} with --gpus")
    up.add_argument("--runs-dir", type=Path, default=Path("runs"))
    up.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts per worker (re-rendezvous)")
    up.add_argument("--worker-restarts", type=int, default=3, help="container restarts per worker")
    up.add_argument("--threads", type=int, default=1, help="OMP threads per worker")
    up.add_argument("--gpus", action="store_true", help="give every worker all GPUs (NCCL)")
    up.add_argument("--rebuild", action="store_true", help="rebuild the image even when it is up to date")

    status = commands.add_parser("status", help="containers and progress of the runs")
    status.add_argument("--run")

    logs = commands.add_parser("logs", help="a run's container logs")
    logs.add_argument("--run", required=True)
    logs.add_argument("target", nargs="?", default="all", help="coordinator, a worker index, or all")
    logs.add_argument("--follow", "-f", action="store_true")
    logs.add_argument("--tail", type=int, default=200)

    down = commands.add_parser("down", help="remove a run's containers, network and volume")
    down.add_argument("--run", help="default: every run")

    build = commands.add_parser("build", help="build the trainer image unless it is up to date")
    build.add_argument("--image", help=f"default: {DEFAULT_IMAGE}, or {GPU_IMAGE} with --gpus")
    build.add_argument("--base-image", help="default: the one compose/provision.sh chose")
    build.add_argument("--gpus", action="store_true", help="CUDA torch from the index, not the wheelhouse")
    build.add_argument("--rebuild", action="store_true")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        print(f"error: no Docker engine answers ({error}); run `bash compose/provision.sh`", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            if not Path(args.config).is_file():
                print(f"error: --config {args.config}: no such file", file=sys.stderr)
                return 2
            options = launcher.UpOptions(
                workers=args.workers,
                config=args.config,
                run=args.run or run_name(args.config),
                overrides=args.overrides,
                image=args.image,
                runs_dir=args.runs_dir,
                torch_restarts=args.max_restarts,
                worker_restarts=args.worker_restarts,
                threads=args.threads,
                gpus=args.gpus,
                rebuild=args.rebuild,
            )
            return launcher.up(client, options)
        if args.command == "status":
            return launcher.status(client, args.run)
        if args.command == "logs":
            return launcher.logs(client, args.run, args.target, follow=args.follow, tail=args.tail)
        if args.command == "down":
            return launcher.down(client, args.run)
        ensure_image(
            client,
            tag=args.image or (GPU_IMAGE if args.gpus else DEFAULT_IMAGE),
            base_image=args.base_image,
            rebuild=args.rebuild,
            gpu=args.gpus,
        )
        return 0
    except (ValueError, ImageBuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
