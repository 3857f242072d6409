"""The training run, top to bottom: config -> model -> warm-up -> rounds of
(rollout -> three-channel loss -> inner AdamW step -> diloco.step()) -> checkpoint, metrics.

Launch under torchrun (`make smoke` runs two CPU processes = two DiLoCo replicas):

    torchrun --standalone --nproc-per-node=2 -m trainer.worker --config configs/smoke.yaml

A replica is `replica_size` consecutive ranks (default: one torchrun node). Inside a replica,
gradients are averaged every inner step (data parallel); across replicas only DiLoCo talks,
once per `diloco.sync_every` steps. Global rank 0 writes metrics, the summary and the plot.
Environment: COMPOSER_RUN_DIR (where the run writes), COMPOSER_REPLICA_ID (stable replica
identity for data and checkpoint files when torch ranks move around after an elastic restart).
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from trainer import checkpoint
from trainer.config import Config, ConfigError, dump_config, load_config_or_exit
from trainer.diloco import DiLoCo, parameters_hash
from trainer.losses import EMATeacher, TeacherReplayBuffer, composer_total_loss
from trainer.metrics import MetricsLog, mean_and_error, plot_curves, reward_rise, table_header, table_row
from trainer.model import cached_tokenizer, pretrained_model_and_tokenizer, tiny_model_and_tokenizer
from trainer.rollout import rollout
from trainer.tasks import make_tasks
from trainer.warmup import supervised_warmup


@dataclass
class Topology:
    rank: int
    world_size: int
    replicas: int
    replica_index: int  # position among replicas in this world (changes across restarts)
    replica_id: int  # stable identity: data shard and checkpoint files
    local_rank: int  # rank inside the replica
    inner_group: dist.ProcessGroup | None  # ranks of this replica (None: a replica of one)
    outer_group: dist.ProcessGroup | None  # rank `local_rank` of every replica (None: the world)


def init_distributed(config: Config) -> Topology:
    """Process groups for inner data parallel (within a replica) and DiLoCo (across replicas)."""
    if "RANK" not in os.environ:  # plain `python -m trainer.worker`: one replica of one
        return Topology(0, 1, 1, 0, int(os.environ.get("COMPOSER_REPLICA_ID", 0)), 0, None, None)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=config.dist_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    size = config.replica_size or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world % size:
        raise ConfigError(f"replica_size: {size} does not divide the world size {world}")
    replicas = world // size
    inner_group = outer_group = None
    if size > 1:  # every rank must create every group, in the same order
        for r in range(replicas):
            group = dist.new_group(list(range(r * size, (r + 1) * size)))
            inner_group = group if r == rank // size else inner_group
        for k in range(size):
            group = dist.new_group([r * size + k for r in range(replicas)])
            outer_group = group if k == rank % size else outer_group
    replica_index = rank // size
    replica_id = int(os.environ.get("COMPOSER_REPLICA_ID", replica_index))
    return Topology(rank, world, replicas, replica_index, replica_id, rank % size, inner_group, outer_group)


def step_seed(*parts: int) -> int:
    """A seed that is a pure function of the position, so a resumed run draws the same data."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def average_gradients(model: torch.nn.Module, group: dist.ProcessGroup | None) -> None:
    """Inner data parallel: one all-reduce of all gradients, flattened, within the replica."""
    if group is None:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def gather(value: object) -> list:
    """Everyone's `value`, in rank order (a list of one without torch.distributed)."""
    if not dist.is_initialized():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def train(config: Config) -> dict:
    topo = init_distributed(config)
    lead = topo.rank == 0
    run_dir = Path(os.environ.get("COMPOSER_RUN_DIR") or config.run_dir or f"runs/{config.name}")
    ckpt_root = Path(config.checkpoint_dir) if config.checkpoint_dir else run_dir / "checkpoints"
    if "OMP_NUM_THREADS" not in os.environ:  # an explicit setting (torchrun, compose) wins
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    alpha, beta, rollout_cfg = config.loss.alpha, config.loss.beta, config.rollout
    H = config.diloco.sync_every

    # ---- model and tasks -------------------------------------------------------------------
    tasks = make_tasks(config.task.source, max_operand=config.task.max_operand)
    if config.model.name == "tiny":
        corpus = tasks.corpus()
        if lead:  # train the tokenizer once; the others read the saved copy
            cached_tokenizer(corpus, vocab_size=config.model.vocab_size, cache_dir=run_dir)
        barrier()
        model, tokenizer = tiny_model_and_tokenizer(
            corpus,
            vocab_size=config.model.vocab_size,
            hidden_size=config.model.hidden_size,
            num_layers=config.model.num_layers,
            num_heads=config.model.num_heads,
            seed=config.seed,
            cache_dir=run_dir,
        )
    else:
        model, tokenizer = pretrained_model_and_tokenizer(
            config.model.name, tokenizer_name=config.model.tokenizer, dtype=config.model.dtype
        )
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # ---- warm-up (fresh runs only) and the frozen DPO reference ----------------------------
    resume_from = gather(checkpoint.latest_complete(ckpt_root))[0]  # rank 0's view decides for all
    if resume_from is None and config.optim.sft_steps:
        # Same seed on every rank: replicas finish the warm-up bit-identical, no sync needed.
        sft_losses = supervised_warmup(
            model,
            tokenizer,
            tasks,
            steps=config.optim.sft_steps,
            batch_size=config.optim.sft_batch_size,
            lr=config.optim.sft_lr,
            hint_level=config.task.hint_level,
            sibling_hints=config.task.sibling_hints,
            max_prompt_length=rollout_cfg.max_prompt_length,
            rng=random.Random(step_seed(config.seed, -1)),
        )
        if lead:
            print(f"warm-up: {len(sft_losses)} SFT steps, loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}", flush=True)
    reference = None
    if beta > 0:
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        if resume_from is None:
            if lead:
                checkpoint.save_reference(ckpt_root, reference)
        elif not checkpoint.load_reference(ckpt_root, reference):
            raise FileNotFoundError(f"{ckpt_root}/reference.safetensors: missing, cannot resume the DPO channel")

    # ---- optimizers, DiLoCo, teacher, DPO replay ------------------------------------------
    inner_optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    diloco = DiLoCo(
        model,
        inner_optimizer,
        sync_every=H,
        group=topo.outer_group,
        outer_optimizer=functools.partial(
            torch.optim.SGD,
            lr=config.diloco.outer_lr,
            momentum=config.diloco.outer_momentum,
            nesterov=config.diloco.outer_momentum > 0,
        ),
        fragments=config.diloco.fragments,
        fragment_delay=config.diloco.fragment_delay,
        fragment_alpha=config.diloco.fragment_alpha,
        compression=config.diloco.compression,
        error_feedback=config.diloco.error_feedback,
        timeout_s=config.diloco.timeout_s,
    )
    teacher = EMATeacher(model, rate=config.loss.ema_rate) if alpha > 0 and config.loss.teacher == "ema" else None
    replay = TeacherReplayBuffer(reference, pad_token_id=tokenizer.pad_token_id, device=device) if beta > 0 else None
    if replay is not None and config.task.traces:
        _fill_from_traces(replay, config.task.traces, tokenizer, rollout_cfg.max_prompt_length * 4)

    start_round = 0
    if resume_from is not None:
        state = checkpoint.load_replica(ckpt_root, resume_from, topo.replica_id, model)
        inner_optimizer.load_state_dict(state["inner_optimizer"])
        diloco.load_state_dict(state["diloco"])
        if replay is not None:
            replay.load_state_dict(state["replay"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        start_round = state["round"] + 1

    metrics = MetricsLog(run_dir / "metrics.jsonl") if lead else None
    if lead:
        (run_dir / "config.json").write_text(json.dumps(dump_config(config), indent=2))
        if resume_from is not None:
            metrics.log("resume", outer_step=resume_from, round=start_round, world_size=topo.world_size)
            print(f"resumed from checkpoint step-{resume_from:06d} (round {start_round})", flush=True)
        print(
            f"{topo.replicas} replicas x {topo.world_size // topo.replicas} ranks, H={H}, "
            f"rounds={config.rounds}, alpha={alpha}, beta={beta}",
            flush=True,
        )
        print(table_header(), flush=True)

    # Forwards of the policy inside the loss (student, teacher-as-policy, DPO): the cost of the
    # channels, logged so that alpha = 0 / beta = 0 runs show that they skipped their passes.
    forward_calls = [0]
    model.register_forward_pre_hook(lambda *_: forward_calls.__setitem__(0, forward_calls[0] + 1))

    # ---- the loop ------------------------------------------------------------------------
    step_rewards_by_round: list[list[float]] = []  # for the reward-rise verdict at the end
    round_clock = (diloco.compute_seconds, diloco.communication_seconds)  # DiLoCo's at round start
    for round_index in range(start_round, config.rounds):
        round_start = time.perf_counter()
        records = []
        bar = tqdm(
            total=H, desc=f"round {round_index + 1}/{config.rounds}", leave=False, disable=not lead, file=sys.stderr
        )
        for step_in_round in range(H):
            step = round_index * H + step_in_round
            seed = step_seed(config.seed, topo.replica_id, topo.local_rank, step)
            torch.manual_seed(seed)  # generate() samples from the global generator
            rng = random.Random(seed)
            step_start = time.perf_counter()

            batch, stats = rollout(
                model,
                tokenizer,
                [tasks.sample(rng) for _ in range(rollout_cfg.prompts_per_step)],
                group_size=rollout_cfg.group_size,
                max_prompt_length=rollout_cfg.max_prompt_length,
                max_completion_length=rollout_cfg.max_completion_length,
                temperature=rollout_cfg.temperature,
                hint_level=config.task.hint_level,
                sibling_hints=config.task.sibling_hints,
                teacher=None if alpha == 0 else teacher.module if teacher is not None else model,
                replay=replay,
                mine_sibling_pairs=not config.task.traces,
                pairs_per_step=config.loss.dpo_pairs_per_step,
                pair_id_prefix=f"r{topo.replica_id}-{topo.local_rank}-s{step}",
                rng=rng,
            )
            forwards_before = forward_calls[0]
            out = composer_total_loss(
                model,
                batch,
                alpha=alpha,
                beta=beta,
                teacher=teacher,
                loss_type=config.loss.loss_type,
                epsilon_low=config.loss.epsilon_low,
                epsilon_high=config.loss.epsilon_high,
                max_completion_length=rollout_cfg.max_completion_length,
                sdpo_jsd_alpha=config.loss.sdpo_jsd_alpha,
                sdpo_top_k=config.loss.sdpo_top_k,
                dpo_beta=config.loss.dpo_beta,
            )
            inner_optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            average_gradients(model, topo.inner_group)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
            inner_optimizer.step()
            if teacher is not None:
                teacher.update()
            synced = diloco.step()

            elapsed = time.perf_counter() - step_start
            records.append(
                dict(
                    round=round_index,
                    step=step,
                    replica=topo.replica_id,
                    rank=topo.rank,
                    reward=stats.reward,
                    teacher_reward=stats.teacher_reward,
                    solved=stats.solved_groups,
                    lr=inner_optimizer.param_groups[0]["lr"],
                    tokens_per_s=stats.completion_tokens / elapsed,
                    pairs=len(replay) if replay is not None else 0,
                    synced=synced,
                    loss_forwards=forward_calls[0] - forwards_before,
                    reference_forwards=replay.reference_forward_passes if replay is not None else 0,
                    **{k: v for k, v in out.metrics.items()},
                )
            )
            bar.set_postfix(reward=f"{stats.reward:.3f}", loss=f"{out.metrics['loss']:.4f}")
            bar.update()
        bar.close()
        if not synced:
            raise RuntimeError(f"round {round_index} ended without a DiLoCo sync; check diloco.sync_every")

        # ---- end of round: metrics (before the checkpoint: a crash may repeat, never lose, one)
        everyone = gather(
            dict(
                records=records,
                hash=parameters_hash(model),
                bytes_sent=diloco.bytes_sent,
                bytes_received=diloco.bytes_received,
                compute_s=diloco.compute_seconds - round_clock[0],
                communication_s=diloco.communication_seconds - round_clock[1],
            )
        )
        round_clock = (diloco.compute_seconds, diloco.communication_seconds)
        if lead:
            all_records = [r for rank_view in everyone for r in rank_view["records"]]
            for record in sorted(all_records, key=lambda r: (r["step"], r["rank"])):
                metrics.log("inner", **record)
            hashes = [view["hash"] for view in everyone][:: topo.world_size // topo.replicas]
            metrics.log(
                "outer",
                outer_step=diloco.outer_step,
                round=round_index,
                pseudo_grad_norm=diloco.last_pseudo_grad_norm,
                participants=diloco.last_participants,
                bytes_sent=sum(v["bytes_sent"] for v in everyone),
                bytes_received=sum(v["bytes_received"] for v in everyone),
                # Per rank this round: seconds outside / blocked inside DiLoCo exchanges.
                compute_s=[v["compute_s"] for v in everyone],
                communication_s=[v["communication_s"] for v in everyone],
                param_hash=hashes[0],
                replica_hashes=hashes,
                replicas=topo.replicas,
            )
            rewards = [r["reward"] for r in all_records]
            reward, error = mean_and_error(rewards)
            teacher_rewards = [r["teacher_reward"] for r in all_records if r["teacher_reward"] is not None]
            means = {k: sum(r[k] for r in all_records) / len(all_records) for k in ("grpo", "sdpo", "dpo")}
            step_rewards_by_round.append(rewards)
            print(
                table_row(
                    (
                        round_index + 1,
                        reward,
                        error,
                        sum(teacher_rewards) / len(teacher_rewards) if teacher_rewards else None,
                        means["grpo"],
                        means["sdpo"],
                        means["dpo"],
                        diloco.last_pseudo_grad_norm,
                        sum(v["bytes_sent"] for v in everyone) / 1e6,
                        time.perf_counter() - round_start,
                    )
                ),
                flush=True,
            )

        # ---- checkpoint: every replica saves its share, then rank 0 seals the folder ----------
        if topo.local_rank == 0:
            state = dict(round=round_index, inner_optimizer=inner_optimizer.state_dict(), diloco=diloco.state_dict())
            if replay is not None:
                state["replay"] = replay.state_dict()
            if teacher is not None:
                state["teacher"] = teacher.state_dict()
            checkpoint.save_replica(ckpt_root, diloco.outer_step, topo.replica_id, model, state)
        barrier()
        if lead:
            checkpoint.mark_complete(ckpt_root, diloco.outer_step, dict(round=round_index), config.keep_checkpoints)

    # ---- the end ---------------------------------------------------------------------------
    final_hashes = gather(parameters_hash(model))[:: topo.world_size // topo.replicas]
    summary = dict(
        status="ok",
        name=config.name,
        outer_steps=diloco.outer_step,
        rounds=config.rounds,
        replicas=topo.replicas,
        world_size=topo.world_size,
        final_param_hash=final_hashes[0],
        replica_hashes=final_hashes,
        replicas_agree=len(set(final_hashes)) == 1,
    )
    if lead:
        if len(step_rewards_by_round) >= 2:
            summary.update(reward_rise(step_rewards_by_round))
            print(
                f"reward: first rounds {summary['reward_first']:.4f}, last rounds {summary['reward_last']:.4f}, "
                f"rise {summary['reward_rise']:+.4f} = {summary['reward_rise_sigmas']:.1f} sigma",
                flush=True,
            )
        metrics.close()
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        tmp = run_dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, run_dir / "summary.json")
        print(f"run dir: {run_dir} (metrics.jsonl, curves.png, summary.json, checkpoints/)", flush=True)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def _fill_from_traces(replay: TeacherReplayBuffer, path: str, tokenizer, max_length: int) -> None:
    """Trace-replay DPO: pairs mined from real agent logs, reference-scored once, cached by id."""
    from trainer.traces import TraceIngester, mine_pairs, render_pair

    for pair in mine_pairs(TraceIngester().ingest(path)):
        tokens = render_pair(pair, tokenizer, max_length=max_length)
        replay.add(pair.id, tokens.chosen_ids, tokens.chosen_loss_mask, tokens.rejected_ids, tokens.rejected_loss_mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.worker", description=__doc__.split("\n\n")[0])
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
    summary = train(config)
    # Only a full sync with no local mixing (one fragment, alpha 0) leaves replicas identical.
    expect_agreement = config.diloco.fragments == 1 and config.diloco.fragment_alpha == 0
    return 1 if expect_agreement and not summary["replicas_agree"] else 0


if __name__ == "__main__":
    sys.exit(main())
