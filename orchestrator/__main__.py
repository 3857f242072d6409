"""`python -m orchestrator up|serve|join|status|logs|down|build`: multi-node DiLoCo runs in containers.

`up` runs every replica on this Docker host; `serve` (first machine) and `join` (every other one)
spread one run over several machines, the run's secret read from COMPOSER_SECRET or
--secret-file, never from the command line."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import docker

from orchestrator import across, gate, launcher
from orchestrator.cluster import RDZV_PORT, ClusterError, run_name
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

    serve = commands.add_parser("serve", help="first machine of a run over several: coordinator + workers")
    serve.add_argument("--replicas", type=int, required=True, help="replicas over all machines (the world)")
    join = commands.add_parser("join", help="join a run served on another machine: this machine's workers")
    join.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the address `serve` printed")
    for command in (serve, join):
        command.add_argument("--config", required=True, help="the same config on every machine (checked)")
        command.add_argument("--run", help="run name (default: the config's file name)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        command.add_argument("--workers", type=int, default=1, help="this machine's workers (replicas)")
        command.add_argument("--image", help=f"used as it is here (default: {DEFAULT_IMAGE}, built when stale)")
        command.add_argument("--runs-dir", type=Path, default=Path("runs"))
        command.add_argument(
            "--interface", help="network interface for the collectives (default: the route to the coordinator)"
        )
        command.add_argument("--secret-file", help=f"file holding the run's secret (else ${gate.SECRET_ENV})")
        command.add_argument("--name", default=socket.gethostname(), help="this machine's name in the run")
        command.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the coordinator")
        command.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts per worker")
        command.add_argument("--worker-restarts", type=int, default=3, help="container restarts per worker")
        command.add_argument("--threads", type=int, default=1, help="OMP threads per worker")
        command.add_argument("--gpus", action="store_true", help="give every worker all GPUs (NCCL)")
    serve.add_argument("--port", type=int, default=RDZV_PORT, help="the gate's port (open it to the other hosts)")

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
        if args.command in ("serve", "join"):
            return across_command(client, args)
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
    except (ValueError, ImageBuildError, ClusterError, gate.GateError, across.JoinError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def across_command(client: docker.DockerClient, args: argparse.Namespace) -> int:
    """`serve` or `join`: the secret from --secret-file or the environment (serve makes one when
    neither is given and says where it is, never what it is)."""
    if not Path(args.config).is_file():
        raise ValueError(f"--config {args.config}: no such file")
    generated = False
    try:
        secret = gate.load_secret(secret_file=args.secret_file)
    except gate.GateError:
        if args.command == "join" or args.secret_file:
            raise
        secret, generated = gate.new_secret().encode(), True
    options = across.AcrossOptions(
        config=args.config,
        run=args.run or run_name(args.config),
        secret=secret,
        overrides=args.overrides,
        workers=args.workers,
        image=args.image,
        runs_dir=args.runs_dir,
        interface=args.interface,
        name=args.name,
        timeout_s=args.timeout,
        torch_restarts=args.max_restarts,
        worker_restarts=args.worker_restarts,
        threads=args.threads,
        gpus=args.gpus,
    )
    if args.command == "join":
        return across.join(client, options, coordinator_address(args.coordinator))
    options.port = args.port
    if generated:
        print(f"no secret given: made one for this run (in {args.runs_dir}/.secrets/{options.run} once served)")
    return across.serve(client, options, replicas=args.replicas)


def coordinator_address(text: str) -> tuple[str, int]:
    """`join --coordinator HOST:PORT` as (host, port). IPv4 addresses and host names only: the
    workers' torchrun endpoint and the gate take a bare HOST:PORT, so an IPv6 literal is refused.

    Raises ValueError naming the flag."""
    host, _, port = text.rpartition(":")
    if ":" in host or host.startswith("["):
        raise ValueError(
            f"--coordinator {text!r}: IPv6 addresses are not supported; use the machine's IPv4 address or name"
        )
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {text!r}: expected HOST:PORT, e.g. 10.0.0.1:{RDZV_PORT}")
    return host, int(port)


if __name__ == "__main__":
    sys.exit(main())
