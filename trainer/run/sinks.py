"""TensorBoard and W&B beside metrics.jsonl: where users of torchtitan, TRL, verl and prime-rl
already look. The lead's `MetricsLog` hands every record's scalars to these sinks under the names of
`trainer.metrics.record_scalars` (the same names in both), against the global inner step or the
outer step; the run's config goes in as hyperparameters and summary.json's figures at the end.

metrics.jsonl stays the record of the run: the books, the verdict and the report are computed from
it; the sinks are views. Whether a sink can start (its package, W&B's login or offline mode) is
decided at config time (`trainer.config.MetricsConfig`), so here a failure is a real one.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from trainer.config import Config, dump_config
from trainer.metrics import flat_config

# The hyperparameter comparison's columns in TensorBoard (names of record_scalars / curve_means).
HPARAM_METRICS = ("eval/pass_at_1", "eval/pass_at_k", "curves/reward", "outer/pseudo_grad_norm")


class TensorBoardSink:
    """Event files under <run_dir>/tensorboard (`tensorboard --logdir runs/`), written with
    torch.utils.tensorboard: scalars as float64 tensors (`new_style`, `double_precision`), so a
    value read back is the one in metrics.jsonl to the last bit; the config as hyperparameters
    (dotted keys, `loss.alpha`) and as text; summary.json as text at the end."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        flat = {key: _hparam_value(json.loads(value)) for key, value in flat_config(dump_config(config)).items()}
        for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer._get_file_writer().add_summary(summary)
        self.writer.add_text("config", _code_block(dump_config(config)))

    def scalars(self, axis: str, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step, new_style=True, double_precision=True)

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.writer.add_text("summary", _code_block(summary))
        self.writer.close()


class WandbSink:
    """A W&B run: project $WANDB_PROJECT (default composer-replication), named after the run,
    files under <run_dir>/wandb (all of it, offline: `wandb sync <run_dir>/wandb/offline-run-*`
    uploads it later). Inner scalars are plotted against `inner_step`, the others against
    `outer_step` (W&B's define_metric); the config is the run's config; summary.json's figures go
    to the run summary as summary/<key>. The run id is a function of the run directory, so a
    resumed run continues the same W&B run."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        import os

        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "composer-replication"),
            name=config.name,
            id=wandb_run_id(config.name, run_dir),
            resume="allow",
            dir=str(run_dir),
            config=dump_config(config),
            settings=wandb.Settings(console="off"),  # the worker's own stdout stays as it is
        )
        for axis in ("inner", "outer"):
            self.run.define_metric(f"{axis}_step")
        for prefix, axis in (("inner", "inner"), ("curves", "inner"), ("outer", "outer"), ("eval", "outer")):
            self.run.define_metric(f"{prefix}/*", step_metric=f"{axis}_step")
        self.run.define_metric("resume/*", step_metric="outer_step")

    def scalars(self, axis: str, step: int, values: dict[str, float]) -> None:
        self.run.log({f"{axis}_step": step, **values})

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.run.summary.update({f"summary/{key}": value for key, value in summary.items()})
        self.run.finish(exit_code=0 if summary is not None and summary.get("status") == "ok" else 1)


def wandb_run_id(name: str, run_dir: Path) -> str:
    """W&B's run id for a run directory: the name (W&B's allowed characters) and 8 hex digits of the
    directory's absolute path, so two runs of one name in two directories never share a W&B run."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', name)[:54]}-{digest}"


def open_sinks(config: Config, run_dir: Path) -> list[Any]:
    """The sinks of `metrics.sinks` beside metrics.jsonl (which MetricsLog writes itself)."""
    kinds = {"tensorboard": TensorBoardSink, "wandb": WandbSink}
    return [kinds[name](run_dir, config) for name in config.metrics.sinks if name in kinds]


def _hparam_value(value: Any) -> Any:
    """TensorBoard's hyperparameters take numbers, strings and bools; lists and null as JSON text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _code_block(data: dict[str, Any]) -> str:
    """Markdown (TensorBoard's text plugin) that shows `data` as indented JSON."""
    return "\n".join("    " + line for line in json.dumps(data, indent=2).splitlines())
