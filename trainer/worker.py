"""The training run as a schedule of named phases, top to bottom:

    place (run directory) -> build -> warm-up (fresh runs) -> replica state -> resume -> rounds of
        (inner step x H: collect -> DPO pairs -> three-channel loss -> AdamW -> diloco.step())
        -> end of round (metrics, checkpoint, held-out evaluation)
    -> finish (the run's verdict in summary.json)

Launch under torchrun (`make smoke` runs two CPU processes = two DiLoCo replicas):

    torchrun --standalone --nproc-per-node=2 -m trainer.worker --config configs/smoke.yaml

This file is the schedule only; each phase lives in `trainer.run` (build, step, collectors, books,
topology, placement). Environment: COMPOSER_RUN_DIR (where the run writes), COMPOSER_REPLICA_ID
(stable replica identity for data and checkpoint files when torch ranks move around after an
elastic restart).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from tqdm import tqdm

from trainer.config import Config, ConfigError, load_config_or_exit
from trainer.run.books import end_of_round, evaluate_held_out, finish, open_books
from trainer.run.build import Replica, Run, already_finished, build, build_replica, place_run, resume
from trainer.run.step import EngineFailed, inner_step, push_weights, warm_up
from trainer.run.topology import ElasticError, RunFinished, init_distributed


def train(config: Config) -> dict:
    """Run `config` to the end (or resume it) and return the summary written to summary.json."""
    topo = init_distributed(config)
    run_dir, after_end = place_run(config, topo)
    if after_end:
        return already_finished(topo, run_dir)
    run = build(config, topo, run_dir)
    if run.resume_from is None:
        warm_up(run)
    replica = build_replica(run)
    try:
        return rounds(run, replica)
    except RunFinished:  # elastic: the run ended while this replica waited to be admitted
        return already_finished(topo, run_dir)


def rounds(run: Run, replica: Replica) -> dict:
    """Resume, then the rounds to the end (elastic: from whatever outer step the replica is at
    after each boundary: a healed replica skips to the run's), then the verdict."""
    config, topo = run.config, run.topo
    start_round = resume(run, replica)
    push_weights(run)  # the engine samples from the trained weights from the first step on
    books = open_books(run, start_round)
    if start_round == 0 and (topo.elastic is None or topo.replica_id == 0):
        evaluate_held_out(run, books, rounds_done=0, outer_step=0, teacher=replica.teacher_module)
    replica.round_clock = (replica.diloco.compute_seconds, replica.diloco.communication_seconds)
    H = config.diloco.sync_every
    round_index = start_round
    while round_index < config.rounds:
        round_start = time.perf_counter()
        bar = tqdm(
            total=H,
            desc=f"round {round_index + 1}/{config.rounds}",
            leave=False,
            disable=not run.topo.lead,
            file=sys.stderr,
        )
        records = []
        for step in range(round_index * H, (round_index + 1) * H):
            records.append(inner_step(run, replica, step, round_index))
            bar.set_postfix(reward=f"{records[-1]['reward']:.3f}", loss=f"{records[-1]['loss']:.4f}")
            bar.update()
        bar.close()
        if not records[-1]["synced"]:
            raise RuntimeError(f"round {round_index} ended without a DiLoCo sync; check diloco.sync_every")
        end_of_round(run, replica, books, records, round_index, time.perf_counter() - round_start)
        round_index = replica.diloco.outer_step if topo.elastic is not None else round_index + 1
    return finish(run, replica, books)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key, e.g. --set diloco.sync_every=8 (repeatable)",
    )
    args = parser.parse_args(argv)
    config = load_config_or_exit(args.config, args.set)
    if config.diloco.elastic:  # who came, went and was healed: one line each, on stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logging.getLogger("trainer.elastic").addHandler(handler)
        logging.getLogger("trainer.elastic").setLevel(logging.INFO)
    try:
        code = 0 if train(config)["status"] == "ok" else 1
    except ConfigError as error:  # a run that may not start as asked: one line (from rank 0), exit 2
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except EngineFailed as error:  # the rollout engine died: one line; torchrun restarts, the run resumes
        print(f"error: rank {os.environ.get('RANK', 0)}: {error}", file=sys.stderr, flush=True)
        code = 1
    except ElasticError as error:  # too few replicas for too long: one line, exit 1
        print(f"error: {error}", file=sys.stderr, flush=True)
        code = 1
    if config.diloco.elastic:
        # An exchange abandoned mid-way (a peer died) may still hold a Gloo operation that only its
        # timeout ends; the interpreter's teardown would wait for it. Everything is written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
