"""The run's books: metrics records, the round's table row, checkpoints at round ends, held-out
evaluations, and the one verdict in summary.json.

The lead writes the books (metrics.jsonl, config.json, summary.json, curves.png); every rank saves
its replica's share of each checkpoint and takes part in the evaluation. Order at a round's end:
metrics first, then the checkpoint, so a crash in between may repeat a round's lines, never lose one.

Elastic runs (`diloco.elastic`) have no lead for the whole run: the books of each outer step are
written by its donor, the lowest replica that took part (replica 0 while it is there), from what
every participant shared through the store (its inner records, hashes, timings, disk); on each
disk the lowest participant seals the step once every participant saved. A replica whose round did
not count (it was healed instead) writes nothing for it. The end: the last step's books holder
writes summary.json and announces it in the store, where the others (and any late joiner) read it.
Order inside a round's end there: checkpoint, share, books, seal.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from trainer import checkpoint
from trainer.config import Config, dump_config
from trainer.metrics import MetricsLog, mean_and_error, plot_curves, run_summary, table_header, table_row
from trainer.rollout.evaluation import EvalCounts
from trainer.run.build import Replica, Run
from trainer.run.placement import restart_count, write_json
from trainer.run.sharding import full_parameters_hash, unsharded
from trainer.run.sinks import open_sinks
from trainer.run.topology import barrier, disk_of, gather, leave_together, step_seed


@dataclass
class Books:
    """Rank 0's bookkeeping: the metrics file (the verdict is computed from it, whole, at the end)."""

    metrics: MetricsLog | None


def open_books(run: Run, start_round: int) -> Books:
    """Rank 0 opens metrics.jsonl and the other sinks of metrics.sinks, writes config.json and prints
    the run's header."""
    if not run.topo.lead:
        return Books(metrics=None)
    config, topo = run.config, run.topo
    # Elastic: every replica may hold the books of some outer step; the sinks stay with replica 0.
    sinks = open_sinks(config, run.run_dir) if topo.elastic is None or topo.replica_id == 0 else []
    books = Books(metrics=MetricsLog(run.run_dir / "metrics.jsonl", sinks=sinks))
    write_json(run.run_dir / "config.json", dump_config(config))
    if run.resume_from is not None:
        which = {} if topo.elastic is None else {"replica": topo.replica_id}
        books.metrics.log("resume", outer_step=run.resume_from, round=start_round, world_size=topo.world_size, **which)
        print(f"resumed from checkpoint step-{run.resume_from:06d} (round {start_round})", flush=True)
    print(
        f"{topo.replicas} replicas x {topo.replica_size} ranks, H={config.diloco.sync_every}, "
        f"rounds={config.rounds}, alpha={config.loss.alpha}, beta={config.loss.beta}",
        flush=True,
    )
    print(table_header(), flush=True)
    return books


def end_of_round(
    run: Run, replica: Replica, books: Books, records: list[dict], round_index: int, seconds: float
) -> None:
    """Metrics first, then the checkpoint: a crash in between may repeat a round's lines, never lose one."""
    if run.topo.elastic is not None:
        end_of_elastic_round(run, replica, books, records, round_index, seconds)
        return
    diloco = replica.diloco
    everyone = gather(round_view(run, replica, records))
    if books.metrics is not None:
        log_round(run, replica, books, everyone, round_index, seconds)
    # Every replica saves its share, then one rank per disk seals the folder.
    replica.state.save(
        run.ckpt_root, diloco.outer_step, run.topo.replica_id, round_index=round_index, write=run.topo.local_rank == 0
    )
    barrier()
    if run.keeper:
        info = dict(
            round=round_index,
            replicas=run.topo.replicas,
            world_size=run.topo.world_size,
            sharding=run.config.parallel.sharding,
        )
        checkpoint.mark_complete(run.ckpt_root, diloco.outer_step, info, run.config.keep_checkpoints)
    every = run.config.eval.every
    if every and ((round_index + 1) % every == 0 or round_index + 1 == run.config.rounds):
        evaluate_held_out(
            run, books, rounds_done=round_index + 1, outer_step=diloco.outer_step, teacher=replica.teacher_module
        )


def evaluate_held_out(
    run: Run, books: Books, *, rounds_done: int, outer_step: int, teacher: torch.nn.Module | None = None
) -> None:
    """Held-out pass@1 (greedy) and pass@k, the split shared out over all ranks; rank 0 logs an `eval` record.

    Single-turn runs add the teacher gate (issue 15): `student_logp` and `teacher_logp` (per hint
    kind), the mean per-token log-prob of correct completions under the student and the hinted
    `teacher` (the SDPO teacher's weights; None: the policy).
    """
    config, topo = run.config, run.topo
    held_out = run.env.held_out
    if not config.eval.every or not held_out:
        return
    shard = list(held_out[: config.eval.size])[topo.rank :: topo.world_size]
    torch.manual_seed(step_seed(config.seed, -2, outer_step, topo.rank))
    with run.autocast(), unsharded(run.model, teacher):  # each rank generates on its own prompts
        counts, gate = run.collector.evaluate(run.policy(), shard, teacher=teacher)
    total = sum(gather(counts), EvalCounts([], [], config.eval.k))
    gates = gather(gate)
    if books.metrics is not None:
        figures = total.summary()
        scored = {name: [v for g in gates for v in g[name] if v is not None] for name in gate}  # None: not scored
        gate_means = {name: sum(values) / len(values) if values else None for name, values in scored.items()}
        # per-task outcomes (task order is the same at every evaluation): the paired rises
        books.metrics.log(
            "eval",
            round=rounds_done,
            outer_step=outer_step,
            **figures,
            greedy_correct=list(map(int, total.greedy_correct)),
            sampled_correct=list(total.sampled_correct),
            **(dict(student_logp=gate_means.pop("student"), teacher_logp=gate_means) if gate_means else {}),
        )
        print(
            f"held-out after {rounds_done} rounds: pass@1 {figures['pass_at_1']:.3f}, "
            f"pass@{config.eval.k} {figures['pass_at_k']:.3f} ({figures['size']} prompts)",
            flush=True,
        )


def round_view(run: Run, replica: Replica, records: list[dict]) -> dict:
    """What this rank tells the books holder about its round (`log_round`'s `everyone`), and the
    start of its next round's clock."""
    diloco = replica.diloco
    compute_s, communication_s = diloco.compute_seconds, diloco.communication_seconds
    view = dict(
        records=records,
        hash=full_parameters_hash(run.model),  # the whole model's, also when sharded
        pseudo_grad_norm=diloco.last_pseudo_grad_norm,  # of this rank's share or shard
        bytes_sent=diloco.bytes_sent,
        bytes_received=diloco.bytes_received,
        # this rank's seconds this round outside / blocked inside DiLoCo's exchanges (measured)
        compute_s=compute_s - replica.round_clock[0],
        communication_s=communication_s - replica.round_clock[1],
    )
    replica.round_clock = (compute_s, communication_s)
    return view


def end_of_elastic_round(
    run: Run, replica: Replica, books: Books, records: list[dict], round_index: int, seconds: float
) -> None:
    """Elastic: checkpoint, share, the books (the step's donor), the seal (each disk's lowest
    participant), the held-out evaluation (the books holder, alone). Module docstring."""
    config, topo, diloco = run.config, run.topo, replica.diloco
    elastic, boundary = topo.elastic, topo.elastic.last
    view = dict(round_view(run, replica, records), disk=list(disk_of(run.ckpt_root)))
    if boundary.role != "participant":
        print(
            f"replica {topo.replica_id}: its round {round_index + 1} did not count; healed to outer step "
            f"{boundary.rev} by replica {boundary.donor}",
            flush=True,
        )
        return
    step = diloco.outer_step
    replica.state.save(run.ckpt_root, step, topo.replica_id, round_index=round_index)
    elastic.share(f"round/{step}", view)
    views = elastic.collect(f"round/{step}", boundary.participants)
    holder = boundary.participants[0] == topo.replica_id
    if holder and books.metrics is not None:
        before = elastic.committed(step - 1) if step > 1 else None
        joined = sorted(set(boundary.participants) - set(before)) if before is not None else []
        left = sorted(set(before) - set(boundary.participants)) if before is not None else []
        healed = elastic.healed_to(step - 1)
        membership = dict(
            participant_ids=boundary.participants,
            joined=joined,
            left=left,
            healed=healed,
            excluded=boundary.excluded,
            joined_count=len(joined),
            left_count=len(left),
            healed_count=len(healed),
            quorum_attempts=boundary.attempts,
            quorum_wait_s=boundary.wait_s,
            transfer_s=boundary.transfer_s,
        )
        log_round(run, replica, books, [views[p] for p in sorted(views)], round_index, seconds, membership)
    if len(views) == len(boundary.participants):  # every participant's files are in: seal this disk's copy
        here = [p for p, v in views.items() if v["disk"] == view["disk"]]
        if min(here) == topo.replica_id:
            info = dict(round=round_index, replicas=topo.replicas, world_size=topo.replicas, participants=sorted(views))
            checkpoint.mark_complete(run.ckpt_root, step, info, config.keep_checkpoints)
    every = config.eval.every
    if holder and every and ((round_index + 1) % every == 0 or round_index + 1 == config.rounds):
        evaluate_held_out(run, books, rounds_done=round_index + 1, outer_step=step, teacher=replica.teacher_module)


def log_round(
    run: Run,
    replica: Replica,
    books: Books,
    everyone: list[dict],
    round_index: int,
    seconds: float,
    membership: dict[str, Any] | None = None,
) -> None:
    """Rank 0 (elastic: the step's books holder, `everyone` being the participants in id order):
    every rank's inner records, one outer record (+ `membership`), and the round's table row."""
    diloco = replica.diloco
    all_records = [r for rank_view in everyone for r in rank_view["records"]]
    for record in sorted(all_records, key=lambda r: (r["step"], r["rank"])):
        books.metrics.log("inner", **record)
    for step in sorted({r["step"] for r in all_records}):  # curves.png's lines, in TensorBoard and W&B
        books.metrics.log_curves(step, [r for r in all_records if r["step"] == step])
    rank_hashes = [view["hash"] for view in everyone]  # every process's, not one per replica
    hashes = rank_hashes[:: run.topo.replica_size]
    bytes_sent = sum(v["bytes_sent"] for v in everyone)
    syncs = sum(bool(r["synced"]) for r in everyone[0]["records"])  # one per fragment under Streaming DiLoCo
    books.metrics.log(
        "outer",
        outer_step=diloco.outer_step,
        first_outer_step=diloco.outer_step - syncs + 1,
        round=round_index,
        pseudo_grad_norm=replica_norm(everyone[: run.topo.replica_size]),
        participants=diloco.last_participants,
        bytes_sent=bytes_sent,
        bytes_received=sum(v["bytes_received"] for v in everyone),
        bytes_sent_per_rank=[v["bytes_sent"] for v in everyone],
        compute_s=[v["compute_s"] for v in everyone],
        communication_s=[v["communication_s"] for v in everyone],
        param_hash=hashes[0],
        replica_hashes=hashes,
        rank_hashes=rank_hashes,
        replicas=run.topo.replicas,
        **(membership or {}),
    )
    rewards = [r["reward"] for r in all_records]
    reward, error = mean_and_error(rewards)
    teacher_rewards = [r["teacher_reward"] for r in all_records if r["teacher_reward"] is not None]
    means = {k: sum(r[k] for r in all_records) / len(all_records) for k in ("grpo", "sdpo", "dpo")}
    row = (
        round_index + 1,
        reward,
        error,
        sum(teacher_rewards) / len(teacher_rewards) if teacher_rewards else None,
        means["grpo"],
        means["sdpo"],
        means["dpo"],
        replica_norm(everyone[: run.topo.replica_size]),
        bytes_sent / 1e6,
        seconds,
    )
    print(table_row(row), flush=True)


def replica_norm(ranks: list[dict]) -> float:
    """The norm of the whole averaged pseudo-gradient, from the ranks of one replica: each rank's
    DiLoCo exchanged its share (or FSDP shard) of the model, and the shares are disjoint, so the
    whole norm is the root of the sum of their squares (the same in every replica)."""
    return math.sqrt(sum(rank["pseudo_grad_norm"] ** 2 for rank in ranks))


def replicas_expected_to_agree(config: Config) -> bool:
    """Only a full sync with no local mixing (one fragment, fragment_alpha 0) leaves replicas identical.

    Streaming DiLoCo syncs one fragment at a time and, with fragment_alpha > 0, keeps part of each
    replica's local progress, so its replicas legitimately differ at the end.
    """
    return config.diloco.fragments == 1 and config.diloco.fragment_alpha == 0


def verdict(config: Config, rank_hashes: list[str], replica_size: int = 1) -> dict[str, Any]:
    """The run's one verdict, decided here and read by the coordinator, cluster.json and `make docker-up`.

    rank_hashes: every process's final parameter hash in rank order (a replica's `replica_size`
    ranks are consecutive). The processes of one replica must always hold the same weights (they
    average gradients every step and broadcast their synced shares); replicas must agree with each
    other where `replicas_expected_to_agree`. Hashing one process per replica would miss a share
    that never reached the replica's other processes.
    """
    replicas = [rank_hashes[i : i + replica_size] for i in range(0, len(rank_hashes), replica_size)]
    split = [index for index, hashes in enumerate(replicas) if len(set(hashes)) > 1]
    expected, agree = replicas_expected_to_agree(config), len(set(rank_hashes)) == 1
    reason = ""
    if split:
        reason = f"the processes of replica(s) {split} hold different weights: {rank_hashes}"
    elif expected and not agree:
        reason = f"replicas were expected to agree and do not: {[hashes[0] for hashes in replicas]}"
    return dict(
        status="failed" if reason else "ok",
        reason=reason,
        replicas_expected_to_agree=expected,
        replicas_agree=agree,
    )


def finish(run: Run, replica: Replica, books: Books) -> dict:
    """Rank 0 writes summary.json (the verdict, the reward rise), the plot; everyone leaves together."""
    config, topo = run.config, run.topo
    if topo.elastic is not None:
        return finish_elastic(run, replica, books)
    rank_hashes = gather(full_parameters_hash(run.model))  # the whole model's, also when sharded
    final_hashes = rank_hashes[:: topo.replica_size]
    summary = dict(
        name=config.name,
        outer_steps=replica.diloco.outer_step,
        rounds=config.rounds,
        replicas=topo.replicas,
        world_size=topo.world_size,
        final_param_hash=final_hashes[0],
        replica_hashes=final_hashes,
        rank_hashes=rank_hashes,
        **verdict(config, rank_hashes, topo.replica_size),
    )
    write_summary(run, books, summary)
    run.engine.close()  # an inference engine's own groups go before the run's
    if run.teachers is not None:
        run.teachers.close()
    leave_together()
    if config.debug.abort_at_exit_rank == topo.rank and restart_count() == 0:
        os.abort()  # fault injection (debug section): a crash after the run's end
    return summary


def finish_elastic(run: Run, replica: Replica, books: Books) -> dict:
    """Elastic: the last outer step's books holder collects every final hash (its participants'
    and the joiners it healed with the final state), writes summary.json and announces it in the
    store; every other replica returns what was announced (waiting at most diloco.timeout_s)."""
    config, topo = run.config, run.topo
    elastic, boundary = topo.elastic, topo.elastic.last
    elastic.share("final", full_parameters_hash(run.model))
    holder = (
        boundary is not None
        and boundary.role == "participant"
        and boundary.participants[0] == topo.replica_id
        and replica.diloco.outer_step == config.rounds
    )
    if holder:
        finals = elastic.collect("final", sorted({*boundary.participants, *boundary.admitted}))
        ids = sorted(finals)
        rank_hashes = [finals[i] for i in ids]
        summary = dict(
            name=config.name,
            outer_steps=replica.diloco.outer_step,
            rounds=config.rounds,
            replicas=topo.replicas,
            world_size=topo.replicas,
            final_param_hash=finals[topo.replica_id],
            replica_hashes=rank_hashes,
            rank_hashes=rank_hashes,
            final_replicas=ids,
            **verdict(config, rank_hashes, 1),
        )
        write_summary(run, books, summary)
        elastic.finish(summary)
    else:
        if books.metrics is not None:
            books.metrics.close()
        holder = (boundary.participants or [boundary.donor])[0] if boundary is not None else 0
        summary = elastic.wait_finished(holder)
        if summary is None:
            summary = dict(
                status="failed", reason=f"replica {holder}, the last outer step's books holder, never announced the end"
            )
    run.engine.close()
    if run.teachers is not None:
        run.teachers.close()
    elastic.close()
    return summary


def write_summary(run: Run, books: Books, summary: dict) -> None:
    """The lead (elastic: the last books holder) completes `summary` from metrics.jsonl, prints
    it, plots curves.png and writes summary.json; a no-op elsewhere."""
    if books.metrics is not None:
        summary.update(run_summary(run.run_dir / "metrics.jsonl"))  # every round, resumed or not
        if "reward_rise" in summary:
            sigmas = summary["reward_rise_sigmas"]
            said = f"{sigmas:.1f} sigma" if sigmas is not None else f"? sigma ({summary['reward_rise_sigmas_reason']})"
            print(
                f"reward: first rounds {summary['reward_first']:.4f}, last rounds {summary['reward_last']:.4f}, "
                f"rise {summary['reward_rise']:+.4f} = {said}",
                flush=True,
            )
        if "eval_pass_at_1_first" in summary:
            print(
                f"held-out pass@1: {summary['eval_pass_at_1_first']:.3f} -> {summary['eval_pass_at_1_last']:.3f}, "
                f"pass@k: {summary['eval_pass_at_k_first']:.3f} -> {summary['eval_pass_at_k_last']:.3f}, "
                f"sampled pass rate: {summary['eval_sampled_reward_first']:.3f} -> "
                f"{summary['eval_sampled_reward_last']:.3f}",
                flush=True,
            )
        print(f"skipped (non-finite) steps: {summary['skipped_steps']}", flush=True)
        plot_curves(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")
        write_json(run.run_dir / "summary.json", summary)
        books.metrics.close(summary)  # the sinks get the verdict too
        print(f"run dir: {run.run_dir} (metrics.jsonl, curves.png, summary.json, checkpoints/)", flush=True)
        if summary["status"] != "ok":
            print(f"run failed: {summary['reason']}", file=sys.stderr, flush=True)
