"""The training run as a schedule of named phases, top to bottom:

    place (run directory) -> build -> warm-up (fresh runs) -> replica state -> resume -> rounds of
        (inner step x H: rollout -> DPO pairs -> three-channel loss -> AdamW -> diloco.step())
        -> end of round (metrics, checkpoint)
    -> finish (the run's verdict in summary.json)

Launch under torchrun (`make smoke` runs two CPU processes = two DiLoCo replicas):

    torchrun --standalone --nproc-per-node=2 -m trainer.worker --config configs/smoke.yaml

A replica is `replica_size` consecutive ranks (default: one torchrun node). Inside a replica,
gradients are averaged every inner step (data parallel); across replicas only DiLoCo talks,
once per `diloco.sync_every` steps. The lead (the first process of replica 0, global rank 0 unless
a restart moved it) writes metrics, the summary and the plot.
Environment: COMPOSER_RUN_DIR (where the run writes), COMPOSER_REPLICA_ID (stable replica
identity for data and checkpoint files when torch ranks move around after an elastic restart).

What this file deliberately does not do: no loss math (`trainer.losses`), no decision about where
DPO pairs come from (`trainer.replay.PreferenceFeed`), no sampling logic (`trainer.rollout`), no
exchange logic (`trainer.diloco`). It orders those calls and keeps the books.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from trainer import agent, checkpoint
from trainer.checkpoint import PerProcessState, TrainingState
from trainer.config import Config, ConfigError, OptimConfig, dump_config, load_config_or_exit
from trainer.diloco import DiLoCo, parameters_hash, split_parameters
from trainer.envs import Environment, make_env
from trainer.evaluation import EvalCounts, evaluate, teacher_gate
from trainer.losses import ComposerBatch, ComposerLossOutput, composer_total_loss, route_sdpo_on_failures
from trainer.metrics import MetricsLog, mean_and_error, plot_curves, run_summary, table_header, table_row
from trainer.model import cached_tokenizer, pretrained_model_and_tokenizer, tiny_model_and_tokenizer
from trainer.precision import autocast, compute_dtype
from trainer.replay import PreferenceFeed, PreferenceReplay
from trainer.rollout import rollout
from trainer.run_dir import check_resumable, choose_run_dir, is_finished
from trainer.sandbox import SandboxConfig, SandboxUnavailable, make_sandbox, set_default_sandbox
from trainer.teacher import EMATeacher
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
    # The rank that writes the books: the first process of replica id 0, wherever torchrun's
    # rendezvous put it (across machines it is the coordinator's host, which keeps the metrics).
    lead_rank: int = 0

    @property
    def lead(self) -> bool:
        return self.rank == self.lead_rank

    @property
    def replica_size(self) -> int:
        return self.world_size // self.replicas


@dataclass
class Run:
    """What the build phase makes and every later phase reads."""

    config: Config
    topo: Topology
    run_dir: Path
    ckpt_root: Path
    model: torch.nn.Module
    tokenizer: Any
    env: Environment
    device: torch.device
    dtype: torch.dtype | None  # autocast compute dtype (None: fp32 throughout); weights stay fp32
    resume_from: int | None  # newest sealed checkpoint (the lead's view), None: a fresh run
    keeper: bool = True  # this rank writes its disk's shared files (`storage_keeper`)

    def autocast(self) -> Any:
        return autocast(self.device, self.dtype)


@dataclass
class Replica:
    """The replica's training state: the checkpoint registry and the parts the step calls directly."""

    state: TrainingState
    inner_optimizer: torch.optim.Optimizer
    diloco: DiLoCo
    teacher: EMATeacher | None
    feed: PreferenceFeed | None
    forward_calls: list[int] = field(default_factory=lambda: [0])  # policy forwards, counted by a hook
    round_clock: tuple[float, float] = (0.0, 0.0)  # DiLoCo's compute/communication seconds at round start
    # A replica of S processes: each process's share of the parameters it exchanges across replicas.
    shares: list[list[torch.Tensor]] | None = None


@dataclass
class Books:
    """Rank 0's bookkeeping: the metrics file (the verdict is computed from it, whole, at the end)."""

    metrics: MetricsLog | None


def init_distributed(config: Config) -> Topology:
    """Process groups for inner data parallel (within a replica) and DiLoCo (across replicas)."""
    if "RANK" not in os.environ:  # plain `python -m trainer.worker`: one replica of one
        return Topology(0, 1, 1, 0, int(os.environ.get("COMPOSER_REPLICA_ID", 0)), 0, None, None)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():  # before the process group: NCCL binds each rank to its device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
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
    identities = gather((replica_id, rank % size))
    lead_rank = identities.index(min(identities))
    return Topology(rank, world, replicas, replica_index, replica_id, rank % size, inner_group, outer_group, lead_rank)


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


# ---- the schedule -------------------------------------------------------------------------------


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
    start_round = resume(run, replica)
    books = open_books(run, start_round)
    if start_round == 0:
        evaluate_held_out(run, books, rounds_done=0, outer_step=0, teacher=teacher_module(replica))
    replica.round_clock = (replica.diloco.compute_seconds, replica.diloco.communication_seconds)
    H = config.diloco.sync_every
    for round_index in range(start_round, config.rounds):
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
    return finish(run, replica, books)


# ---- phases -------------------------------------------------------------------------------------


def place_run(config: Config, topo: Topology) -> tuple[Path, bool]:
    """The run directory (the lead's choice) and whether this is a restart after the run's end.

    A fresh launch never resumes a finished run: it takes the next free `<dir>-N`
    (`trainer.run_dir`). But torchrun restarts every worker when one fails, and a failure after
    the summary (a peer dying in a library's teardown on its way out) leaves a finished run that
    is this very run: done, not a reason to start another beside it.
    """
    base = Path(os.environ.get("COMPOSER_RUN_DIR") or config.run_dir or f"runs/{config.name}")
    after_end = restart_count() > 0 and is_finished(base)
    run_dir, after_end = gather((base if after_end else choose_run_dir(base), after_end))[topo.lead_rank]
    if topo.lead and run_dir != base:
        print(f"{base} holds a finished run; this run writes to {run_dir}", flush=True)
    return run_dir, after_end


def build(config: Config, topo: Topology | None = None, run_dir: Path | None = None) -> Run:
    """Tasks, checkpoint storage, the model and tokenizer on this rank's device (the processes and
    the run directory too when not given, as for bench/ablation.py's shared warm-ups)."""
    if topo is None:
        topo = init_distributed(config)
    if run_dir is None:
        run_dir, _ = place_run(config, topo)
    ckpt_root = Path(config.checkpoint_dir) if config.checkpoint_dir else run_dir / "checkpoints"
    keeper = storage_keeper(topo, ckpt_root)
    if "OMP_NUM_THREADS" not in os.environ:  # an explicit setting (torchrun, compose) wins
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    env = build_env(config)
    if config.model.name == "tiny":
        corpus = env.corpus()
        if keeper:  # train the tokenizer once per disk; the others read the saved copy
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
        model, tokenizer = pretrained_model_and_tokenizer(config.model.name, tokenizer_name=config.model.tokenizer)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    model.to(device)
    views = gather(checkpoint.verify_sealed(ckpt_root) if keeper else None)  # each disk's sealed steps, verified
    resume_from = checkpoint.resume_step(ckpt_root, views, topo.lead_rank)  # the lead's disk decides, damage vetoes
    if resume_from is not None:
        saved = checkpoint.step_info(ckpt_root, resume_from).get("replicas")
        check_resumable(
            run_dir, dump_config(config), resume=config.resume, replicas=topo.replicas, saved_replicas=saved
        )
    dtype = compute_dtype(config.model.dtype)
    return Run(config, topo, run_dir, ckpt_root, model, tokenizer, env, device, dtype, resume_from, keeper)


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0: its first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def already_finished(topo: Topology, run_dir: Path) -> dict:
    """A restart after the run's end: every rank returns the lead's summary.json, unchanged."""
    summary = gather(json.loads((run_dir / "summary.json").read_text()) if topo.lead else None)[topo.lead_rank]
    if topo.lead:
        print(f"{run_dir} already holds this run's summary (a worker failed after it): nothing to redo", flush=True)
    leave_together()
    return summary


def leave_together() -> None:
    """Every rank waits for the others, then the process groups are torn down."""
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def storage_keeper(topo: Topology, ckpt_root: Path) -> bool:
    """Whether this rank keeps the shared files of its disk: the tokenizer, the DPO reference and
    the checkpoint seals. One rank per checkpoint directory: the lead for its own; across machines
    (each keeps its replicas' checkpoints, issue 16) the first rank of each other one. A directory
    is known by (kernel boot id, device, inode), so one directory seen by several containers of a
    machine is one disk, and two machines never share a keeper."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    stat = ckpt_root.stat()
    disk = (boot_id.read_text().strip() if boot_id.exists() else "", stat.st_dev, stat.st_ino)
    disks = gather(disk)
    keepers = {disks[topo.lead_rank]: topo.lead_rank}
    for rank, other in enumerate(disks):
        keepers.setdefault(other, rank)
    return keepers[disk] == topo.rank


def build_env(config: Config) -> Environment:
    """The task environment, and the sandbox first when its checker runs model-written code.

    A sandbox backend that cannot run here fails now, before any program or model is touched.
    """
    options = dict(config.task.options)
    if config.task.source == "addition":
        options.setdefault("max_operand", config.task.max_operand)
        options.setdefault("held_out", config.eval.size if config.eval.every else 0)
    try:
        env = make_env(config.task.source, **options)
    except ValueError as error:
        key = "eval.size" if "held_out" in str(error) else "task.options"
        raise ConfigError(f"{key}: {error}") from None
    if config.agent.enabled and not env.name.startswith("agent_"):  # issue 12: episodes need workspaces
        raise ConfigError(f"agent.enabled: task.source {config.task.source!r} is not an agentic source (agent_*)")
    if env.executes_code:
        s = config.sandbox
        try:
            sandbox = make_sandbox(SandboxConfig(backend=s.backend, zygote=s.zygote, allow_network=s.allow_network))
        except SandboxUnavailable as error:
            raise ConfigError(f"sandbox.backend: {error}") from None
        set_default_sandbox(sandbox)
    return env


def warm_up(run: Run) -> None:
    """Supervised warm-up of a fresh tiny model (`optim.sft_steps`; 0 for real models)."""
    config = run.config
    if not config.optim.sft_steps:
        return
    # Same seed on every rank: every process draws the same batches and takes its share of the
    # rows (trainer.warmup.sft_step sums the gradients), so all finish with the same weights.
    rng = random.Random(step_seed(config.seed, -1))
    world = run.topo.world_size
    group = dist.group.WORLD if world > 1 and config.optim.sft_shared else None
    if group is not None and config.optim.sft_batch_size < world:
        raise ConfigError(
            f"optim.sft_batch_size: {config.optim.sft_batch_size} rows cannot be shared by {world} processes;"
            f" use at least {world}, or optim.sft_shared: false"
        )
    with run.autocast():
        if config.agent.enabled:  # issue 12: scripted episodes
            sft_losses = agent.episode_warmup(
                run.model,
                run.tokenizer,
                run.env.train,
                steps=config.optim.sft_steps,
                batch_size=config.optim.sft_batch_size,
                lr=config.optim.sft_lr,
                rng=rng,
                script=getattr(run.env, "scripted_episode", None),
                group=group,
                progress=run.topo.lead,
            )
        else:
            sft_losses = supervised_warmup(
                run.model,
                run.tokenizer,
                run.env,
                steps=config.optim.sft_steps,
                batch_size=config.optim.sft_batch_size,
                lr=config.optim.sft_lr,
                hint_level=config.task.hint_level,
                sibling_hints=config.task.sibling_hints,
                max_prompt_length=config.rollout.max_prompt_length,
                rng=rng,
                group=group,
                progress=run.topo.lead,
            )
    if run.topo.lead:
        line = f"warm-up: {len(sft_losses)} SFT steps, loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}"
        probe = getattr(run.env, "warmup_probe", None)  # what the warm-up has taught, where an env can say
        if probe is not None:
            with run.autocast():
                what, value = probe(run.model, run.tokenizer)
            line += f"; {what}: {value:.3f}"
        print(line, flush=True)


def build_replica(run: Run) -> Replica:
    """The training-state registry: model, inner AdamW, DiLoCo, and the teacher and DPO feed when on."""
    config, model = run.config, run.model
    feed = build_preference_feed(run) if config.loss.beta > 0 else None
    inner_optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    d = config.diloco
    topo = run.topo
    shares = None  # with S > 1 processes a replica, each exchanges 1/S of the model across replicas
    if topo.inner_group is not None:
        shares = split_parameters([p for p in model.parameters() if p.requires_grad], topo.replica_size)
    diloco = DiLoCo(
        model,
        inner_optimizer,
        sync_every=d.sync_every,
        group=run.topo.outer_group,
        outer_optimizer=functools.partial(
            torch.optim.SGD, lr=d.outer_lr, momentum=d.outer_momentum, nesterov=d.outer_momentum > 0
        ),
        fragments=d.fragments,
        fragment_delay=d.fragment_delay,
        fragment_alpha=d.fragment_alpha,
        compression=d.compression,
        error_feedback=d.error_feedback,
        timeout_s=d.timeout_s,
        parameters=shares[topo.local_rank] if shares else None,
    )
    use_ema = config.loss.alpha > 0 and config.loss.teacher == "ema"
    teacher = EMATeacher(model, rate=config.loss.ema_rate) if use_ema else None
    saved_diloco = PerProcessState(diloco, topo.inner_group, topo.local_rank, topo.replica_size) if shares else diloco
    state = TrainingState(model, inner_optimizer=inner_optimizer, diloco=saved_diloco, replay=feed, teacher=teacher)
    replica = Replica(state, inner_optimizer, diloco, teacher, feed, shares=shares)
    share_synced_parameters(run, replica)
    # Forwards of the policy inside the loss (student, teacher-as-policy, DPO): the cost of the
    # channels, logged so that alpha = 0 / beta = 0 runs show that they skipped their passes.
    # Registered after the teacher and reference copies were made, so only the policy counts.
    model.register_forward_pre_hook(lambda *_: replica.forward_calls.__setitem__(0, replica.forward_calls[0] + 1))
    return replica


def build_preference_feed(run: Run) -> PreferenceFeed:
    """The frozen DPO reference (the policy after warm-up, saved once) and the pair feed over it."""
    reference = copy.deepcopy(run.model).requires_grad_(False).eval()
    if run.resume_from is None:
        if run.keeper:
            checkpoint.save_reference(run.ckpt_root, reference)
    elif not checkpoint.load_reference(run.ckpt_root, reference):
        raise FileNotFoundError(f"{run.ckpt_root}/reference.safetensors: missing, cannot resume the DPO channel")
    config = run.config
    replay = PreferenceReplay(
        reference, pad_token_id=run.tokenizer.pad_token_id, device=run.device, capacity=config.loss.dpo_capacity
    )
    feed = PreferenceFeed(replay, pairs_per_step=config.loss.dpo_pairs_per_step, traces=config.task.traces)
    feed.fill_from_traces(run.tokenizer, config.rollout.max_prompt_length * 4)
    return feed


def resume(run: Run, replica: Replica) -> int:
    """Load the newest sealed checkpoint into every registered member; returns the first round to run."""
    if run.resume_from is None:
        return 0
    return replica.state.load(run.ckpt_root, run.resume_from, run.topo.replica_id) + 1


def open_books(run: Run, start_round: int) -> Books:
    """Rank 0 opens metrics.jsonl, writes config.json and prints the run's header."""
    if not run.topo.lead:
        return Books(metrics=None)
    config, topo = run.config, run.topo
    books = Books(metrics=MetricsLog(run.run_dir / "metrics.jsonl"))
    (run.run_dir / "config.json").write_text(json.dumps(dump_config(config), indent=2))
    if run.resume_from is not None:
        books.metrics.log("resume", outer_step=run.resume_from, round=start_round, world_size=topo.world_size)
        print(f"resumed from checkpoint step-{run.resume_from:06d} (round {start_round})", flush=True)
    print(
        f"{topo.replicas} replicas x {topo.replica_size} ranks, H={config.diloco.sync_every}, "
        f"rounds={config.rounds}, alpha={config.loss.alpha}, beta={config.loss.beta}",
        flush=True,
    )
    print(table_header(), flush=True)
    return books


def inner_step(run: Run, replica: Replica, step: int, round_index: int) -> dict[str, Any]:
    """rollout -> DPO pairs -> loss -> (backward, AdamW, teacher unless non-finite) -> diloco.step()."""
    config, topo = run.config, run.topo
    seed = step_seed(config.seed, topo.replica_id, topo.local_rank, step)
    torch.manual_seed(seed)  # generate() samples from the global generator
    rng = random.Random(seed)
    step_start = time.perf_counter()
    with run.autocast():
        collect = agent_step if config.agent.enabled else single_turn_step  # episodes, or one completion each
        samples, preference = collect(run, replica, step, rng)
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
    replay = replica.feed.replay if replica.feed is not None else None
    stats = samples.stats
    return dict(
        round=round_index,
        step=step,
        replica=topo.replica_id,
        rank=topo.rank,
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
        loss_forwards=replica.forward_calls[0] - forwards_before,
        reference_forwards=replay.reference_forward_passes if replay is not None else 0,
        **getattr(samples, "metrics", {}),
        **out.metrics,
    )


def share_synced_parameters(run: Run, replica: Replica) -> None:
    """Each process of a replica broadcasts its share (which only it synced) to the others."""
    if replica.shares is None:
        return
    first = run.topo.replica_index * run.topo.replica_size  # the replica's ranks are consecutive
    with torch.no_grad():
        for k, share in enumerate(replica.shares):
            flat = torch.cat([p.detach().reshape(-1) for p in share])
            dist.broadcast(flat, src=first + k, group=run.topo.inner_group)
            offset = 0
            for p in share:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


def single_turn_step(run: Run, replica: Replica, step: int, rng: random.Random) -> tuple[Any, Any]:
    """This step's samples (G completions of each prompt, scored) and its DPO pairs."""
    config, topo = run.config, run.topo
    samples = rollout(
        run.model,
        run.tokenizer,
        [run.env.sample(rng) for _ in range(config.rollout.prompts_per_step)],
        group_size=config.rollout.group_size,
        max_prompt_length=config.rollout.max_prompt_length,
        max_completion_length=config.rollout.max_completion_length,
        temperature=config.rollout.temperature,
        hint_level=config.task.hint_level,
        sibling_hints=config.task.sibling_hints,
        teacher=teacher_model(run, replica),
        score_many=functools.partial(run.env.score_many, workers=config.sandbox.workers),
    )
    if config.loss.sdpo_on == "failed" and config.loss.alpha > 0:  # issue 15: each sample to one channel
        p = samples.policy
        p.advantages, p.sdpo_weight = route_sdpo_on_failures(p.advantages, samples.rewards > 0, p.sdpo_weight)
    preference = None
    if replica.feed is not None:
        preference = replica.feed.step(samples, id_prefix=f"r{topo.replica_id}-{topo.local_rank}-s{step}", rng=rng)
    return samples, preference


def agent_step(run: Run, replica: Replica, step: int, rng: random.Random) -> tuple[Any, Any]:
    """Issue 12: this step's episodes (written to <run_dir>/episodes when asked) and DPO pairs."""
    config, topo, a = run.config, run.topo, run.config.agent
    samples = agent.agent_rollout(
        run.model,
        run.tokenizer,
        [run.env.sample(rng) for _ in range(config.rollout.prompts_per_step)],
        group_size=config.rollout.group_size,
        max_turns=a.max_turns,
        max_tokens=a.max_tokens,
        max_turn_tokens=a.max_turn_tokens,
        temperature=config.rollout.temperature,
        tools=a.tools,
        hint_level=config.task.hint_level if config.loss.alpha > 0 else None,
        require_finish=a.require_finish,
    )
    prefix = f"r{topo.replica_id}-{topo.local_rank}-s{step}"
    if a.write_episodes:
        agent.write_episodes(samples.episodes, run.run_dir / "episodes" / f"rank{topo.rank}.jsonl", prefix=prefix)
    preference = None
    if replica.feed is not None:
        pairs = agent.episode_pairs(samples.episodes, group_size=config.rollout.group_size, id_prefix=prefix)
        preference = replica.feed.step_pairs(pairs, rng=rng)
    return samples, preference


def teacher_model(run: Run, replica: Replica) -> torch.nn.Module | None:
    """The model the SDPO teacher samples with for its reward: the EMA copy, the policy, or none."""
    if run.config.loss.alpha == 0:
        return None
    return teacher_module(replica) or run.model


def teacher_module(replica: Replica) -> torch.nn.Module | None:
    """The SDPO teacher's own weights (the EMA copy), None when the teacher is the policy."""
    return replica.teacher.module if replica.teacher is not None else None


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
        max_completion_length=run.config.agent.max_tokens if run.config.agent.enabled else r.max_completion_length,
        sdpo_jsd_alpha=loss.sdpo_jsd_alpha,
        sdpo_top_k=loss.sdpo_top_k,
        dpo_beta=loss.dpo_beta,
        temperature=r.temperature,
    )


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


def end_of_round(
    run: Run, replica: Replica, books: Books, records: list[dict], round_index: int, seconds: float
) -> None:
    """Metrics first, then the checkpoint: a crash in between may repeat a round's lines, never lose one."""
    diloco = replica.diloco
    compute_s, communication_s = diloco.compute_seconds, diloco.communication_seconds
    everyone = gather(
        dict(
            records=records,
            hash=parameters_hash(run.model),
            bytes_sent=diloco.bytes_sent,
            bytes_received=diloco.bytes_received,
            # this rank's seconds this round outside / blocked inside DiLoCo's exchanges (measured)
            compute_s=compute_s - replica.round_clock[0],
            communication_s=communication_s - replica.round_clock[1],
        )
    )
    replica.round_clock = (compute_s, communication_s)
    if books.metrics is not None:
        log_round(run, replica, books, everyone, round_index, seconds)
    # Every replica saves its share, then one rank per disk seals the folder.
    replica.state.save(
        run.ckpt_root, diloco.outer_step, run.topo.replica_id, round_index=round_index, write=run.topo.local_rank == 0
    )
    barrier()
    if run.keeper:
        info = dict(round=round_index, replicas=run.topo.replicas, world_size=run.topo.world_size)
        checkpoint.mark_complete(run.ckpt_root, diloco.outer_step, info, run.config.keep_checkpoints)
    every = run.config.eval.every
    if every and ((round_index + 1) % every == 0 or round_index + 1 == run.config.rounds):
        evaluate_held_out(
            run, books, rounds_done=round_index + 1, outer_step=diloco.outer_step, teacher=teacher_module(replica)
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
    held_out = getattr(run.env, "held_out", None)
    if not config.eval.every or not held_out:
        return
    shard = list(held_out[: config.eval.size])[topo.rank :: topo.world_size]
    torch.manual_seed(step_seed(config.seed, -2, outer_step, topo.rank))
    with run.autocast():
        counts = (
            agent_evaluate(run, shard)
            if config.agent.enabled
            else evaluate(
                run.model,
                run.tokenizer,
                shard,
                k=config.eval.k,
                max_prompt_length=config.rollout.max_prompt_length,
                max_completion_length=config.rollout.max_completion_length,
                temperature=config.rollout.temperature,
                score_many=functools.partial(run.env.score_many, workers=config.sandbox.workers),
            )
        )
        gate = {} if config.agent.enabled else held_out_gate(run, teacher, shard, counts)
    total = sum(gather(counts), EvalCounts([], [], config.eval.k))
    gates = gather(gate)
    if books.metrics is not None:
        figures = total.summary()
        gate_means = {
            name: sum(v for g in gates for v in g[name]) / max(1, sum(len(g[name]) for g in gates)) for name in gate
        }
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


def held_out_gate(run: Run, teacher: torch.nn.Module | None, tasks: list, counts: EvalCounts) -> dict[str, list[float]]:
    """This rank's share of the teacher gate (`trainer.evaluation.teacher_gate`), per held-out task."""
    return teacher_gate(
        run.model,
        run.model if teacher is None else teacher,
        run.tokenizer,
        tasks,
        counts.greedy_attempts,
        max_prompt_length=run.config.rollout.max_prompt_length,
    )


def agent_evaluate(run: Run, tasks: list) -> EvalCounts:
    """Issue 12: held-out pass@1 (greedy) and pass@k over whole episodes."""
    a, config = run.config.agent, run.config
    return agent.evaluate_episodes(
        run.model,
        run.tokenizer,
        tasks,
        k=config.eval.k,
        max_turns=a.max_turns,
        max_tokens=a.max_tokens,
        max_turn_tokens=a.max_turn_tokens,
        temperature=config.rollout.temperature,
        tools=a.tools,
    )


def log_round(run: Run, replica: Replica, books: Books, everyone: list[dict], round_index: int, seconds: float) -> None:
    """Rank 0: every rank's inner records, one outer record, and the round's table row."""
    diloco = replica.diloco
    all_records = [r for rank_view in everyone for r in rank_view["records"]]
    for record in sorted(all_records, key=lambda r: (r["step"], r["rank"])):
        books.metrics.log("inner", **record)
    hashes = [view["hash"] for view in everyone][:: run.topo.replica_size]
    bytes_sent = sum(v["bytes_sent"] for v in everyone)
    syncs = sum(bool(r["synced"]) for r in everyone[0]["records"])  # one per fragment under Streaming DiLoCo
    books.metrics.log(
        "outer",
        outer_step=diloco.outer_step,
        first_outer_step=diloco.outer_step - syncs + 1,
        round=round_index,
        pseudo_grad_norm=diloco.last_pseudo_grad_norm,
        participants=diloco.last_participants,
        bytes_sent=bytes_sent,
        bytes_received=sum(v["bytes_received"] for v in everyone),
        bytes_sent_per_rank=[v["bytes_sent"] for v in everyone],
        compute_s=[v["compute_s"] for v in everyone],
        communication_s=[v["communication_s"] for v in everyone],
        param_hash=hashes[0],
        replica_hashes=hashes,
        replicas=run.topo.replicas,
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
        diloco.last_pseudo_grad_norm,
        bytes_sent / 1e6,
        seconds,
    )
    print(table_row(row), flush=True)


def replicas_expected_to_agree(config: Config) -> bool:
    """Only a full sync with no local mixing (one fragment, fragment_alpha 0) leaves replicas identical.

    Streaming DiLoCo syncs one fragment at a time and, with fragment_alpha > 0, keeps part of each
    replica's local progress, so its replicas legitimately differ at the end.
    """
    return config.diloco.fragments == 1 and config.diloco.fragment_alpha == 0


def verdict(config: Config, final_hashes: list[str]) -> dict[str, Any]:
    """The run's one verdict, decided here and read by the coordinator, cluster.json and `make docker-up`."""
    expected, agree = replicas_expected_to_agree(config), len(set(final_hashes)) == 1
    ok = agree or not expected
    return dict(
        status="ok" if ok else "failed",
        reason="" if ok else f"replicas were expected to agree and do not: {final_hashes}",
        replicas_expected_to_agree=expected,
        replicas_agree=agree,
    )


def finish(run: Run, replica: Replica, books: Books) -> dict:
    """Rank 0 writes summary.json (the verdict, the reward rise), the plot; everyone leaves together."""
    config, topo = run.config, run.topo
    final_hashes = gather(parameters_hash(run.model))[:: topo.replica_size]
    summary = dict(
        name=config.name,
        outer_steps=replica.diloco.outer_step,
        rounds=config.rounds,
        replicas=topo.replicas,
        world_size=topo.world_size,
        final_param_hash=final_hashes[0],
        replica_hashes=final_hashes,
        **verdict(config, final_hashes),
    )
    if books.metrics is not None:
        books.metrics.close()
        summary.update(run_summary(run.run_dir / "metrics.jsonl"))  # every round, resumed or not
        if "reward_rise" in summary:
            print(
                f"reward: first rounds {summary['reward_first']:.4f}, last rounds {summary['reward_last']:.4f}, "
                f"rise {summary['reward_rise']:+.4f} = {summary['reward_rise_sigmas']:.1f} sigma",
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
        tmp = run.run_dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, run.run_dir / "summary.json")
        print(f"run dir: {run.run_dir} (metrics.jsonl, curves.png, summary.json, checkpoints/)", flush=True)
        if summary["status"] != "ok":
            print(f"run failed: {summary['reason']}", file=sys.stderr, flush=True)
    leave_together()
    if config.debug.abort_at_exit_rank == topo.rank and restart_count() == 0:
        os.abort()  # fault injection (debug section): a crash after the run's end
    return summary


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
    try:
        return 0 if train(config)["status"] == "ok" else 1
    except ConfigError as error:  # a run that may not start as asked: one line (from rank 0), exit 2
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
