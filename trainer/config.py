"""One typed config for a training run, loaded from YAML and validated before anything starts.

Every knob has one name (its dotted path, e.g. `diloco.sync_every`), one default (the dataclass
field) and one place it is checked (`__post_init__` of its section). Errors name the file, the
line and the key, so a typo fails in the launcher, not twenty minutes into a multi-node run.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem; `str(error)` is the one line a user needs (file, line, key, what to do)."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    name: str = "tiny"  # "tiny" builds a random Qwen2 offline; anything else is a hub name or path
    tokenizer: str | None = None  # hub name or path; default: the model's (tiny: trained on the tasks)
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
        _require(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            f"must be divisible by model.num_heads ({self.num_heads})",
        )


@dataclass
class TaskConfig:
    source: Literal["addition"] = "addition"
    max_operand: int = 19  # operands are drawn from [0, max_operand]
    hint_level: int = 2  # which of the layered hints (0 = weakest) the SDPO teacher reads
    sibling_hints: bool = True  # a correct sibling rollout, when there is one, replaces the hint
    traces: str | None = None  # agent-trace file/dir: DPO pairs come from it instead of siblings

    def __post_init__(self) -> None:
        _require(self.max_operand >= 1, "task.max_operand", "must be >= 1")
        _require(0 <= self.hint_level <= 2, "task.hint_level", "must be 0, 1 or 2")


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
    teacher: Literal["policy", "ema"] = "policy"
    ema_rate: float = 0.05

    def __post_init__(self) -> None:
        _require(self.alpha >= 0, "loss.alpha", f"must be >= 0, got {self.alpha}")
        _require(self.beta >= 0, "loss.beta", f"must be >= 0, got {self.beta}")
        _require(self.epsilon_low > 0, "loss.epsilon_low", "must be > 0")
        _require(0 <= self.sdpo_jsd_alpha <= 1, "loss.sdpo_jsd_alpha", "must be in [0, 1]")
        _require(self.sdpo_top_k is None or self.sdpo_top_k >= 1, "loss.sdpo_top_k", "must be >= 1")
        _require(self.dpo_beta > 0, "loss.dpo_beta", "must be > 0")
        _require(self.dpo_pairs_per_step >= 1, "loss.dpo_pairs_per_step", "must be >= 1")
        _require(0 < self.ema_rate <= 1, "loss.ema_rate", "must be in (0, 1]")


@dataclass
class RolloutConfig:
    prompts_per_step: int = 32
    group_size: int = 8  # G samples per prompt
    max_prompt_length: int = 128
    max_completion_length: int = 8
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _require(self.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
        _require(
            self.group_size >= 2,
            "rollout.group_size",
            f"must be >= 2 (group advantages need siblings), got {self.group_size}",
        )
        _require(self.max_prompt_length >= 1, "rollout.max_prompt_length", "must be >= 1")
        _require(self.max_completion_length >= 1, "rollout.max_completion_length", "must be >= 1")
        _require(self.temperature > 0, "rollout.temperature", "must be > 0")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # inner AdamW
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    sft_steps: int = 0  # supervised warm-up on generated solutions before RL (tiny models only)
    sft_lr: float = 1e-3
    sft_batch_size: int = 64

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "must be > 0")
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
    # that did not answer (and torchrun restarts and resumes); sized for a slow link.
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "diloco.timeout_s", f"must be > 0, got {self.timeout_s}")
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
class Config:
    name: str = "run"
    seed: int = 0
    rounds: int = 10  # outer steps; the run takes rounds * diloco.sync_every inner steps
    run_dir: str | None = None  # default runs/<name>; $COMPOSER_RUN_DIR overrides both
    checkpoint_dir: str | None = None  # default <run_dir>/checkpoints; must be shared by all replicas
    replica_size: int | None = None  # ranks per replica; default: one torchrun node
    dist_timeout_s: float = 600.0  # collective timeout: how long survivors wait for a dead peer
    keep_checkpoints: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        _require(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        _require(self.replica_size is None or self.replica_size >= 1, "replica_size", "must be >= 1")
        _require(self.dist_timeout_s > 0, "dist_timeout_s", "must be > 0")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read `path`, apply `KEY=VALUE` overrides (dotted keys, YAML values) and validate it all."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config ({error.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        _set_dotted(data, key.strip(), yaml.safe_load(value), source=f"--set {item!r}")
        lines[key.strip()] = 0  # 0 = came from the command line
    try:
        return _build(Config, data, prefix="")
    except ConfigError as error:
        key = str(error).split(":", 1)[0]
        line = lines.get(key) or next((n for k, n in lines.items() if n and key.startswith(k + ".")), None)
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {error}") from None


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line where it is written, so errors can point at it."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
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
    return cls(**kwargs)  # each section's __post_init__ names its keys in full


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _coerce(inner, value, key)
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
    """The fully resolved config as plain data (written next to the run's metrics)."""
    return dataclasses.asdict(config)


def load_config_or_exit(path: str | Path, overrides: list[str] = ()) -> Config:
    """For command lines: one `error: FILE:LINE: KEY: ...` line on stderr and exit status 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as error:
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
