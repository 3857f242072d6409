"""Which directory a run writes to, and whether what is already there may be resumed.

Reusing a run name used to resume whatever was there: a finished two-replica run was "resumed" by
eight workers that found no files for six of them, and a changed config silently inherited the
old optimizer settings. The rules: a finished run (it has summary.json) is never resumed, the new
run takes the next free `<dir>-N` and says so; an unfinished run is resumed only with the config
it was started with (`resume: changed` resumes on purpose) and the same number of replicas.
The coordinator and the workers call the same `choose_run_dir`, so they agree on the directory.

torchrun restarts every worker when one fails; `restart_count` tells a restart from a fresh launch.
A run directory's JSON files (summary.json, config.json, cluster.json) are written atomically
(`write_json`), so a reader never sees half a file. The orchestrator imports this module, so it
stays free of torch.distributed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainer.checkpoint import atomic_write, strict_json
from trainer.config import ConfigError

__all__ = ["is_finished", "choose_run_dir", "config_differences", "check_resumable", "restart_count", "write_json"]

# Keys that may differ between the run that saved a checkpoint and the one resuming it.
RESUME_FREE_KEYS = frozenset({"resume"})


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists()


def choose_run_dir(base: Path) -> Path:
    """`base` unless a finished run is there; then the first of base-2, base-3, ... that is not finished."""
    candidate, n = base, 1
    while is_finished(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two dumped configs (resume-free keys aside)."""
    a, b = _flatten(saved), _flatten(new)
    return sorted(
        k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>") and k not in RESUME_FREE_KEYS
    )


def check_resumable(
    run_dir: Path, new_config: dict[str, Any], *, resume: str, replicas: int, saved_replicas: int | None
) -> None:
    """Raise ConfigError (one line: what differs and what to do) when `run_dir` may not be resumed.

    Args:
        run_dir: the unfinished run holding a sealed checkpoint.
        new_config: `dump_config` of the config about to resume it.
        resume: the `resume` key ("auto" or "changed").
        replicas: this run's replica count; saved_replicas: the checkpoint's (None: not recorded).
    """
    if saved_replicas is not None and saved_replicas != replicas:
        raise ConfigError(
            f"{run_dir}: its checkpoints were saved by {saved_replicas} replicas and this run has {replicas}; "
            f"resume it with {saved_replicas} replicas, or start fresh with --set name=NEW (or remove {run_dir})"
        )
    saved_path = run_dir / "config.json"
    if resume == "changed" or not saved_path.exists():
        return
    differing = config_differences(json.loads(saved_path.read_text()), new_config)
    if differing:
        raise ConfigError(
            f"{saved_path}: the run in {run_dir} was started with other values for {', '.join(differing)}; "
            f"start fresh with --set name=NEW (or remove {run_dir}), or resume on purpose with --set resume=changed"
        )


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0: its first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def write_json(path: Path, data: Any) -> Path:
    """`data` as indented strict JSON at `path` (`trainer.checkpoint.strict_json`: NaN and infinities
    become null with the reason beside them), atomically (`trainer.checkpoint.atomic_write`)."""
    return atomic_write(path, strict_json(data, indent=2) + "\n")
