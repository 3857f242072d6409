"""The build phases: where the run writes, what it is made of, and the replica's training state.

`place_run` chooses the run directory (the lead's choice, for every rank); `build` makes the
environment (and the sandbox first when its checker runs model-written code), the collector, the
model and tokenizer, and decides whether to resume; `build_replica` makes the training-state
registry (inner AdamW, DiLoCo, the EMA teacher and the DPO feed when on), sharding the policy and
its copies first under `parallel.sharding: fsdp` (`trainer.run.sharding`); `resume` loads it.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint
from trainer.checkpoint import PerProcessState, TrainingState
from trainer.config import (
    Config,
    ConfigError,
    dump_config,
    teacher_name,
    vllm_cpu_build,
    vllm_cpu_shape_problem,
)
from trainer.diloco import DiLoCo, split_parameters
from trainer.envs import Environment, make_env
from trainer.model import cached_tokenizer, pretrained_model_and_tokenizer, tiny_model_and_tokenizer
from trainer.objective.replay import CapacityError, PreferenceFeed, PreferenceReplay
from trainer.objective.teacher import EMATeacher
from trainer.precision import autocast, compute_dtype
from trainer.rollout.sampling import Engine, HFEngine
from trainer.rollout.templates import stop_token_ids
from trainer.run.collectors import Collector, Policy, make_collector
from trainer.run.placement import check_resumable, choose_run_dir, is_finished, restart_count
from trainer.run.sharding import (
    ShardedDiLoCoState,
    checkpoint_activations,
    is_sharded,
    local_shards,
    mixed_precision,
    replica_mesh,
    shard,
    unsharded,
)
from trainer.run.topology import Topology, barrier, gather, init_distributed, leave_together, storage_keeper
from trainer.sandbox import SandboxUnavailable, make_sandbox, set_default_sandbox


@dataclass
class Run:
    """What the build phase makes and every later phase reads."""

    config: Config
    topo: Topology
    run_dir: Path
    ckpt_root: Path
    model: torch.nn.Module
    tokenizer: Any
    # Every id that ends the model's turn (`trainer.rollout.templates.stop_token_ids`), computed
    # once here and passed to everything that samples.
    stop_token_ids: list[int]
    env: Environment
    collector: Collector
    engine: Engine  # what samples (`rollout.engine`): the module's own generate, or an inference engine
    device: torch.device
    dtype: torch.dtype | None  # compute dtype (None: fp32 throughout); weights stay fp32
    resume_from: int | None  # newest sealed checkpoint whose files verify (`checkpoint.resume_step`), None: fresh
    keeper: bool = True  # this rank writes its disk's shared files (`storage_keeper`)
    teachers: Any = None  # the external teachers (`trainer.teachers.Teachers`), None: the config lists none

    def autocast(self) -> Any:
        """Forwards in the compute dtype: autocast, except on a sharded model, whose FSDP
        mixed-precision policy casts the gathered parameters itself (`sharding.mixed_precision`)."""
        return autocast(self.device, None if is_sharded(self.model) else self.dtype)

    def policy(self) -> Policy:
        """The policy as the collectors take it: module, tokenizer, engine and stop ids."""
        return Policy(self.model, self.tokenizer, self.engine, self.stop_token_ids)


@dataclass
class Replica:
    """The replica's training state: the checkpoint registry and the parts the step calls directly."""

    state: TrainingState
    inner_optimizer: torch.optim.Optimizer
    diloco: DiLoCo
    teacher: EMATeacher | None
    feed: PreferenceFeed | None
    forward_calls: list[int] = field(default_factory=lambda: [0])  # policy forwards, counted by a hook
    logits_dtype: str = ""  # of the policy's latest forward (a hook): "bfloat16" under bf16 autocast
    round_clock: tuple[float, float] = (0.0, 0.0)  # DiLoCo's compute/communication seconds at round start
    # A replica of S processes: each process's share of the parameters it exchanges across replicas.
    shares: list[list[torch.Tensor]] | None = None

    @property
    def teacher_module(self) -> torch.nn.Module | None:
        """The SDPO teacher's own weights (the EMA copy), None when the teacher is the policy."""
        return self.teacher.module if self.teacher is not None else None


def place_run(config: Config, topo: Topology) -> tuple[Path, bool]:
    """The run directory (the lead's choice) and whether this is a restart after the run's end.

    A fresh launch never resumes a finished run: it takes the next free `<dir>-N`
    (`trainer.run.placement`). But torchrun restarts every worker when one fails, and a failure
    after the summary (a peer dying in a library's teardown on its way out) leaves a finished run
    that is this very run: done, not a reason to start another beside it.
    Environment: COMPOSER_RUN_DIR (where the run writes) wins over `run_dir` and `runs/<name>`.
    """
    base = Path(os.environ.get("COMPOSER_RUN_DIR") or config.run_dir or f"runs/{config.name}")
    if topo.elastic is not None:  # every replica writes where the first one chose; the store knows the end
        return Path(topo.elastic.agree("run_dir", str(choose_run_dir(base)))), topo.elastic.finished() is not None
    after_end = restart_count() > 0 and is_finished(base)
    run_dir, after_end = gather((base if after_end else choose_run_dir(base), after_end))[topo.lead_rank]
    if topo.lead and run_dir != base:
        print(f"{base} holds a finished run; this run writes to {run_dir}", flush=True)
    return run_dir, after_end


def already_finished(topo: Topology, run_dir: Path) -> dict:
    """A restart after the run's end: every rank returns the lead's summary.json, unchanged."""
    if topo.elastic is not None:
        print(f"replica {topo.replica_id}: the run in {run_dir} has ended: nothing to join", flush=True)
        topo.elastic.close()
        return topo.elastic.finished()
    summary = gather(json.loads((run_dir / "summary.json").read_text()) if topo.lead else None)[topo.lead_rank]
    if topo.lead:
        print(f"{run_dir} already holds this run's summary (a worker failed after it): nothing to redo", flush=True)
    leave_together()
    return summary


def policy_model(config: Config, env: Environment, cache_dir: Path, corpus: list[str] | None = None) -> tuple[Any, Any]:
    """The config's policy and tokenizer in fp32 on the CPU: the tiny random Qwen2 with a tokenizer
    trained on `env`'s corpus (`corpus` when the caller already drew it; cached in `cache_dir`), or
    a hub name or saved directory. Raises ConfigError naming model.name when transformers cannot
    load it."""
    m = config.model
    if m.name == "tiny":
        return tiny_model_and_tokenizer(
            env.corpus() if corpus is None else corpus,
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            seed=config.seed,
            cache_dir=cache_dir,
        )
    try:
        return pretrained_model_and_tokenizer(m.name, tokenizer_name=m.tokenizer)
    except OSError as error:  # transformers' "not a repo id", "couldn't connect", "no config.json"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.name: cannot load {m.name!r}: {reason}") from None


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
    collector = make_collector(config, env)
    corpus = env.corpus() if config.model.name == "tiny" else None
    if corpus is not None:
        if keeper:  # train the tokenizer once per disk; the others read the saved copy
            cached_tokenizer(corpus, vocab_size=config.model.vocab_size, cache_dir=run_dir)
        barrier()
    model, tokenizer = policy_model(config, env, run_dir, corpus)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if config.parallel.activation_checkpointing:
        checkpoint_activations(model)
    if config.parallel.sharding == "none":
        model.to(device)  # sharded: the model stays in host memory until `shard` moves each rank's rows
    stops = stop_token_ids(tokenizer, model)
    views = gather(checkpoint.verify_sealed(ckpt_root) if keeper else None)  # each disk's sealed steps, verified
    try:
        resume_from = checkpoint.resume_step(ckpt_root, views, topo.lead_rank)  # the lead's disk decides, damage vetoes
    except checkpoint.CheckpointError as error:  # one line, exit status 2: never a restart loop
        raise ConfigError(str(error)) from None
    if resume_from is not None:
        saved = checkpoint.step_info(ckpt_root, resume_from).get("replicas")
        check_resumable(
            run_dir, dump_config(config), resume=config.resume, replicas=topo.replicas, saved_replicas=saved
        )
    dtype = compute_dtype(config.model.dtype)
    collector.teachers = teachers = make_teachers(config, run_dir, topo.rank, tokenizer)
    engine = make_engine(config, model, tokenizer, config.rollout.max_prompt_length + collector.max_completion_length)
    return Run(
        config,
        topo,
        run_dir,
        ckpt_root,
        model,
        tokenizer,
        stops,
        env,
        collector,
        engine,
        device,
        dtype,
        resume_from,
        keeper,
        teachers,
    )


def make_teachers(config: Config, run_dir: Path, rank: int, tokenizer: Any) -> Any:
    """The run's external teachers (`trainer.teachers.Teachers`; None: the config lists none), each
    probed now: a dead or wrong endpoint, a missing key, or an endpoint teacher without prompt
    log-probs (or with another tokenizer) is a ConfigError naming the key, before any step. Answers
    are cached in `teacher-cache` beside the run directory (unless a teacher names its own
    `cache_dir`), so a repeated run finds them; each call is logged in
    `<run_dir>/teachers/calls-rank<rank>.jsonl`."""
    if not config.teachers:
        return None
    from trainer.teachers import Teachers, TeacherUnavailable

    try:
        teachers = Teachers(
            config.teachers,
            cache_root=run_dir.parent / "teacher-cache",
            log_path=run_dir / "teachers" / f"calls-rank{rank}.jsonl",
        )
        name = teacher_name(config.loss.teacher, "endpoint")
        if name is not None:
            teachers.endpoint(name, top_k=config.loss.sdpo_top_k).probe(tokenizer, "loss.teacher")
    except TeacherUnavailable as error:
        raise ConfigError(str(error)) from None
    return teachers


def make_engine(config: Config, model: torch.nn.Module, tokenizer: Any, max_model_len: int) -> Engine:
    """The sampler `rollout.engine` names: `hf` (the module's own generate) or `vllm` (an in-process
    vLLM engine over a copy of the module, `trainer.rollout.vllm_engine`; the trainer pushes its
    weights in after every update). A loaded hub model whose shape the engine cannot run is refused
    here in one line (a local model directory was refused when the config was read)."""
    r = config.rollout
    if r.engine == "hf":
        return HFEngine(model, tokenizer)
    problem = vllm_cpu_shape_problem(
        model.config.hidden_size, model.config.num_attention_heads, getattr(model.config, "num_key_value_heads", None)
    )
    if problem and vllm_cpu_build():
        raise ConfigError(f"rollout.engine: vllm's CPU backend cannot run model.name {config.model.name!r}: {problem}")
    from trainer.rollout.vllm_engine import VLLMEngine

    dtype = config.model.dtype if r.engine_dtype == "auto" else r.engine_dtype
    return VLLMEngine(
        model,
        tokenizer,
        device=next(model.parameters()).device,
        dtype=dtype,
        max_model_len=max_model_len,
        kv_cache_mb=r.engine_kv_cache_mb,
        seed=config.seed,
    )


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
    if env.executes_code:
        try:
            sandbox = make_sandbox(config.sandbox)
        except SandboxUnavailable as error:
            raise ConfigError(f"sandbox.backend: {error}") from None
        set_default_sandbox(sandbox)
    return env


def build_replica(run: Run) -> Replica:
    """The training-state registry: model, inner AdamW, DiLoCo, and the teacher and DPO feed when on.

    Under `parallel.sharding: fsdp` the DPO reference and the EMA teacher are copied from the
    policy first (an FSDP module cannot be deep-copied), then all three are sharded over the
    replica's ranks; AdamW and DiLoCo are built over the shards, and the checkpoint is sharded.
    """
    config, model, topo = run.config, run.model, run.topo
    feed = build_preference_feed(run) if config.loss.beta > 0 else None
    use_ema = config.loss.alpha > 0 and config.loss.teacher == "ema"
    teacher = EMATeacher(model, rate=config.loss.ema_rate) if use_ema else None
    sharded = config.parallel.sharding == "fsdp"
    mesh = replica_mesh(topo) if sharded else None
    if mesh is not None:
        policy = mixed_precision(run.dtype)
        for module in (model, teacher.module if teacher else None, feed.replay.reference_model if feed else None):
            if module is not None:
                shard(module, mesh, mp_policy=policy)
    if feed is not None:
        fill_from_traces(run, feed)
    inner_optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    d = config.diloco
    shares = None  # unsharded, S > 1 processes a replica: each exchanges 1/S of the model across replicas
    if topo.inner_group is not None and not sharded:
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
        backup_device="cpu" if d.backup_device == "cpu" else run.device,
        timeout_s=d.timeout_s,
        parameters=local_shards(model) if sharded else shares[topo.local_rank] if shares else None,
    )
    if topo.elastic is not None:
        topo.elastic.attach(diloco)
    # Each process of a replica has its own DPO pairs (its own rollouts), and with S > 1 its own
    # share or shard of DiLoCo's state: saved per process.
    per_process = functools.partial(PerProcessState, group=topo.inner_group, local_rank=topo.local_rank)
    saved_feed = per_process(feed, size=topo.replica_size) if feed and topo.replica_size > 1 else feed
    if mesh is not None:
        state = TrainingState(
            model,
            process_group=mesh.get_group(),
            inner_optimizer=inner_optimizer,
            diloco=ShardedDiLoCoState(diloco, model, topo.local_rank),
            replay=saved_feed,
            teacher=teacher,
        )
    else:
        saved_diloco = per_process(diloco, size=topo.replica_size) if shares else diloco
        state = TrainingState(
            model, inner_optimizer=inner_optimizer, diloco=saved_diloco, replay=saved_feed, teacher=teacher
        )
    replica = Replica(state, inner_optimizer, diloco, teacher, feed, shares=shares)
    share_synced_parameters(run, replica)
    # Forwards of the policy inside the loss (student, teacher-as-policy, DPO): the cost of the
    # channels, logged so that alpha = 0 / beta = 0 runs show that they skipped their passes.
    # Registered after the teacher and reference copies were made, so only the policy counts.
    model.register_forward_pre_hook(lambda *_: replica.forward_calls.__setitem__(0, replica.forward_calls[0] + 1))
    # What the forwards really computed in, measured rather than assumed from model.dtype: a run
    # whose autocast is lost shows float32 here.
    model.register_forward_hook(lambda _m, _a, out: setattr(replica, "logits_dtype", _dtype_name(out)))
    return replica


def _dtype_name(output: Any) -> str:
    logits = getattr(output, "logits", None)
    return str(logits.dtype).removeprefix("torch.") if logits is not None else ""


def build_preference_feed(run: Run) -> PreferenceFeed:
    """The frozen DPO reference (the policy after warm-up, saved once) and the pair feed over it.

    Built before any sharding: the reference is a copy of the whole policy, saved and loaded
    whole (`checkpoint.save_reference`). The trace pairs come later (`fill_from_traces`).
    """
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
    return PreferenceFeed(replay, pairs_per_step=config.loss.dpo_pairs_per_step, traces=config.task.traces)


def fill_from_traces(run: Run, feed: PreferenceFeed) -> None:
    """The run's trace pairs (`task.traces`) into the feed, scored by the reference where it now
    lives: on the device, gathered when sharded (every rank scores them all, no collective)."""
    try:
        with unsharded(feed.replay.reference_model):
            feed.fill_from_traces(run.tokenizer, run.config.rollout.max_prompt_length * 4)
    except CapacityError as error:
        raise ConfigError(str(error)) from None


def share_synced_parameters(run: Run, replica: Replica) -> None:
    """Each process of a replica broadcasts its share (which only it synced) to the others."""
    if replica.shares is None:
        return
    first = run.topo.replica_index * run.topo.replica_size  # the replica's ranks are consecutive
    with torch.no_grad():
        for k, share in enumerate(replica.shares):
            flat = torch.cat([p.detach().reshape(-1) for p in share])
            torch.distributed.broadcast(flat, src=first + k, group=run.topo.inner_group)
            offset = 0
            for p in share:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


def resume(run: Run, replica: Replica) -> int:
    """Load the newest sealed checkpoint into every registered member; returns the first round to run.

    Elastic runs: a replica loads its own files only when no newer outer step was committed by
    live peers (a whole run resuming, or this replica back before the others moved on); otherwise,
    or when it has no files at that step, it enters the run as a joiner and is healed with the live
    global state at the next boundary (`ElasticDiLoCo.enter`), its stale checkpoint unused.

    Raises RunFinished (elastic) when the run ended while this replica waited to be admitted.
    """
    elastic = run.topo.elastic
    if elastic is None:
        if run.resume_from is None:
            return 0
        return replica.state.load(run.ckpt_root, run.resume_from, run.topo.replica_id) + 1
    live, own = elastic.live_revision(), run.resume_from
    files = own is not None and (checkpoint.step_dir(run.ckpt_root, own) / f"replica-{run.topo.replica_id}.pt").exists()
    start, has_state = 0, own is None and live is None  # a fresh run: the initial weights are a state
    if files and (live is None or live <= own):
        start, has_state = replica.state.load(run.ckpt_root, own, run.topo.replica_id) + 1, True
    else:
        run.resume_from = None  # nothing of this replica's own checkpoint is used
    if elastic.enter(replica.diloco, has_state=has_state) is not None:
        after_heal(run, replica)
        start = replica.diloco.outer_step
    return start


def after_heal(run: Run, replica: Replica) -> None:
    """A replica healed with a peer's global state (elastic): its EMA teacher restarts from the
    new weights (it averaged weights this replica no longer holds); the DPO store is kept."""
    if replica.teacher is not None:
        replica.teacher.load_state_dict(run.model.state_dict())
    state = replica.diloco
    print(
        f"replica {run.topo.replica_id}: healed by replica {run.topo.elastic.last.donor} to outer step "
        f"{state.outer_step} (SHA-256 of the global state {state.global_state_hash()[:16]})",
        flush=True,
    )
