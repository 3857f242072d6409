"""The training steps: the supervised warm-up, and the inner step of RL.

    inner step = collect (the collector's samples and DPO pairs) -> three-channel loss ->
                 (backward, average inside the replica, clip, AdamW, EMA teacher; nothing if
                 non-finite) -> diloco.step()

Under `parallel.sharding: fsdp` every forward of the policy, the EMA teacher and the DPO reference
is a collective over the replica, so collection (sampling, reward probes, reference scoring: work
that differs per rank) runs inside `sharding.unsharded`, and the loss's forwards are made the same
on every rank: the replica's ranks skip the DPO channel together when one of them has no pairs,
and the SDPO teacher forward runs even with nothing to distil (`lockstep`). FSDP's reduce-scatter
averages the gradients, so `average_gradients` is skipped.

No loss math here (`trainer.objective.losses`), no decision about where DPO pairs come from
(`trainer.objective.replay.PreferenceFeed`), no sampling logic (`trainer.rollout`), no exchange
logic (`trainer.diloco`): this orders those calls and returns the step's record.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from trainer.config import ConfigError, OptimConfig, teacher_name
from trainer.objective.losses import ComposerBatch, ComposerLossOutput, composer_total_loss
from trainer.rollout.sampling import Engine, EngineError
from trainer.rollout.warmup import warmup_probe
from trainer.run.build import Replica, Run, after_heal, share_synced_parameters
from trainer.run.placement import restart_count
from trainer.run.sharding import full_weights, is_sharded, unsharded
from trainer.run.topology import Topology, step_seed


def warm_up(run: Run) -> None:
    """Supervised warm-up of a fresh tiny model (`optim.sft_steps`; 0 for real models), then the
    environment's probe of what it taught, where it has one."""
    config = run.config
    if not config.optim.sft_steps:
        return
    # Same seed on every rank: every process draws the same batches and takes its share of the
    # rows (trainer.rollout.warmup.sft_step sums the gradients), so all finish with the same weights.
    rng = random.Random(step_seed(config.seed, -1))
    world = run.topo.world_size
    group = dist.group.WORLD if world > 1 and config.optim.sft_shared else None
    if group is not None and config.optim.sft_batch_size < world:
        raise ConfigError(
            f"optim.sft_batch_size: {config.optim.sft_batch_size} rows cannot be shared by {world} processes;"
            f" use at least {world}, or optim.sft_shared: false"
        )
    with run.autocast():
        sft_losses = run.collector.warm_up(run.policy(), rng=rng, group=group, progress=run.topo.lead)
    if run.topo.lead:
        line = f"warm-up: {len(sft_losses)} SFT steps, loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}"
        probe = run.env.probe_candidates()
        if probe is not None:
            with run.autocast():
                line += f"; {probe.what}: {warmup_probe(run.model, run.tokenizer, probe):.3f}"
        print(line, flush=True)


def inner_step(run: Run, replica: Replica, step: int, round_index: int) -> dict[str, Any]:
    """collect -> loss -> (backward, AdamW, teacher unless non-finite) -> diloco.step(); the step's record."""
    config, topo = run.config, run.topo
    if config.debug.kill_replica_at == [topo.replica_id, step] and first_life(topo, step):
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection (debug section): a replica dies mid-round
    seed = step_seed(config.seed, topo.replica_id, topo.local_rank, step)
    torch.manual_seed(seed)  # generate() samples from the global generator
    rng = random.Random(seed)
    step_start = time.perf_counter()
    prefix = f"r{topo.replica_id}-{topo.local_rank}-s{step}"
    if config.debug.kill_engine_at == step and restart_count() == 0:  # fault injection (debug section)
        run.engine.close()
    reference = replica.feed.replay.reference_model if replica.feed is not None else None
    collecting = unsharded(run.model, replica.teacher_module, reference)  # sharded: each rank samples alone
    with run.autocast(), engine_failures_name(step, round_index), collecting:
        samples, preference = run.collector.collect(
            run.policy(),
            rng=rng,
            teacher=teacher_model(run, replica),
            feed=replica.feed,
            id_prefix=prefix,
            episodes_file=run.run_dir / "episodes" / f"rank{topo.global_rank}.jsonl",
        )
    preference = together(preference, topo.inner_group)
    with run.autocast():
        forwards_before = replica.forward_calls[0]
        loss_start = time.perf_counter()
        out = three_channel_loss(run, replica, ComposerBatch(policy=samples.policy, preference=preference))
    if config.debug.inject_nan_loss_at == step:  # fault injection (debug section): off by default
        out.total = out.total * float("nan")
    lr = inner_lr(config.optim, step, total_steps=config.rounds * config.diloco.sync_every)
    applied = optimizer_step(run, replica, out.total, lr=lr)
    loss_s = time.perf_counter() - loss_start
    synced = replica.diloco.step()
    if synced:
        share_synced_parameters(run, replica)
        if topo.elastic is not None and topo.elastic.last.role == "healed":  # its round did not count
            after_heal(run, replica)
    with engine_failures_name(step, round_index):
        weight_sync_s = push_weights(run) if applied or synced else 0.0  # the engine samples the new weights
    in_sync = {"engine_weights_equal": run.engine.weights_equal(run.model)} if config.debug.check_engine_sync else {}
    replay = replica.feed.replay if replica.feed is not None else None
    stats = samples.stats
    return dict(
        round=round_index,
        step=step,
        replica=topo.replica_id,
        rank=topo.global_rank,
        reward=stats.reward,
        teacher_reward=stats.teacher_reward,
        solved=stats.solved_groups,
        lr=replica.inner_optimizer.param_groups[0]["lr"],
        tokens_per_s=stats.completion_tokens / (time.perf_counter() - step_start),
        pairs=len(replay) if replay is not None else 0,
        pairs_evicted=replay.evicted if replay is not None else 0,
        synced=synced,
        skipped=not applied,
        generation_s=stats.generation_s,
        execution_s=stats.execution_s,
        loss_s=loss_s,
        weight_sync_s=weight_sync_s,
        loss_forwards=replica.forward_calls[0] - forwards_before,
        logits_dtype=replica.logits_dtype,  # the loss's last policy forward: bfloat16 under bf16 autocast
        reference_forwards=replay.reference_forward_passes if replay is not None else 0,
        **samples.metrics,
        **out.metrics,
        **in_sync,
    )


def first_life(topo: Topology, step: int) -> bool:
    """Whether `debug.kill_replica_at` may still fire: once per run (elastic: the store counts it,
    so the replica that comes back lives; otherwise torchrun's first attempt only)."""
    if topo.elastic is not None:
        return topo.elastic.once(f"kill/{topo.replica_id}/{step}")
    return restart_count() == 0


class EngineFailed(RuntimeError):
    """The rollout engine failed during an inner step; the message names the step."""


@contextlib.contextmanager
def engine_failures_name(step: int, round_index: int) -> Iterator[None]:
    """An engine that fails (dies mid-run, refuses a request) is one error naming the step; the run
    exits non-zero and torchrun's restart resumes it from its newest checkpoint."""
    try:
        yield
    except EngineError as error:
        raise EngineFailed(
            f"rollout engine failed at inner step {step} (round {round_index}): {error}; "
            "a restart resumes the run from its newest checkpoint"
        ) from None


def push_weights(run: Run) -> float:
    """The trainer's weights into the run's engine (an inference engine holds its own copy; the
    `hf` engine samples the module itself and takes nothing); returns the seconds it took. Under
    fsdp every rank of the replica must call it (the weights are gathered layer by layer)."""
    clock = time.perf_counter()
    if is_sharded(run.model):  # gathered one FSDP group at a time, every rank in step: bounded memory
        run.engine.push(full_weights(run.model))
    else:
        run.engine.push(run.model.state_dict().items())
    return time.perf_counter() - clock


def teacher_model(run: Run, replica: Replica) -> torch.nn.Module | Engine | None:
    """What the SDPO teacher samples with for its reward: the EMA copy, the policy's engine, the
    endpoint (`loss.teacher: endpoint:<name>`), or none."""
    if run.config.loss.alpha == 0:
        return None
    endpoint = teacher_name(run.config.loss.teacher, "endpoint")
    if endpoint is not None:
        return run.teachers.engine(endpoint, pad_token_id=run.tokenizer.pad_token_id)
    return replica.teacher_module or run.engine


def three_channel_loss(run: Run, replica: Replica, batch: ComposerBatch) -> ComposerLossOutput:
    """`composer_total_loss` with the run's settings; the loss scores at the sampling temperature."""
    loss, r = run.config.loss, run.config.rollout
    return composer_total_loss(
        run.model,
        batch,
        alpha=loss.alpha,
        beta=loss.beta,
        teacher=replica.teacher,
        loss_type=loss.loss_type,
        epsilon_low=loss.epsilon_low,
        epsilon_high=loss.epsilon_high,
        max_completion_length=run.collector.max_completion_length,
        sdpo_jsd_alpha=loss.sdpo_jsd_alpha,
        sdpo_top_k=loss.sdpo_top_k,
        dpo_beta=loss.dpo_beta,
        temperature=r.temperature,
        rollout_correction_mode=loss.rollout_correction,
        rollout_correction_cap=loss.rollout_correction_cap,
        lockstep=is_sharded(run.model),
    )


def together(preference: Any, group: dist.ProcessGroup | None) -> Any:
    """This step's DPO batch, or None when any rank of the replica has none: the ranks of a
    replica run the same channels (their gradients are averaged; sharded, their forwards must pair)."""
    if group is None:
        return preference
    everyone = torch.tensor(float(preference is not None))
    dist.all_reduce(everyone, op=dist.ReduceOp.MIN, group=group)
    return preference if everyone.item() else None


def inner_lr(optim: OptimConfig, step: int, total_steps: int) -> float:
    """The inner AdamW's lr at global inner step `step` (0-based) of a run of `total_steps`:
    optim.lr, ramped linearly over the first optim.warmup_steps steps (step k gets
    lr * (k + 1) / warmup_steps), then held (optim.decay none) or decayed to optim.lr_min at the
    last step, linearly or along a half cosine (the warm-up + decay schedule of torchtitan's
    lr_scheduler and of Loshchilov & Hutter 2017, arXiv 1608.03983). A function of the step alone,
    so a resumed run continues the schedule with nothing extra in its checkpoint."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay == "none":
        return optim.lr
    span = max(1, total_steps - 1 - optim.warmup_steps)
    done = min(1.0, (step - optim.warmup_steps) / span)
    shape = 1.0 - done if optim.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    return optim.lr_min + (optim.lr - optim.lr_min) * shape


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


def optimizer_step(run: Run, replica: Replica, loss: torch.Tensor, lr: float | None = None) -> bool:
    """Backward, average inside the replica, clip, AdamW (at `lr` when given), EMA teacher; False
    (nothing moved) if non-finite.

    A step whose loss or gradient norm is not finite takes no optimizer step and no teacher update,
    so a NaN never reaches the weights, the sampler or the teacher; the ranks of a replica decide
    together (their gradients were averaged, so one rank's NaN is everyone's).
    """
    if lr is not None:
        for group in replica.inner_optimizer.param_groups:
            group["lr"] = lr
    replica.inner_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if not is_sharded(run.model):  # sharded: FSDP's reduce-scatter has averaged them already
        average_gradients(run.model, run.topo.inner_group)
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.optim.max_grad_norm)
    finite = torch.tensor(float(bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))))
    if run.topo.inner_group is not None:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=run.topo.inner_group)
    if not finite.item():
        replica.inner_optimizer.zero_grad(set_to_none=True)
        return False
    replica.inner_optimizer.step()
    if replica.teacher is not None:
        replica.teacher.update()
    return True
