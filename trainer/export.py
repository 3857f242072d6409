"""`python -m trainer.export RUN_DIR [--step N] [--replica K] --out DIR`: a run's checkpoint as a
Hugging Face model directory.

Why: a checkpoint is the project's own layout (`replica-<id>.safetensors` + state, or a sharded
torch.distributed.checkpoint folder), which nothing else reads. The export is what
`AutoModelForCausalLM.from_pretrained(DIR)` loads: `model.safetensors` (fp32, the master weights
the run trained), `config.json`, the run's tokenizer and a `generation_config.json` that samples
as the run did (pure sampling at `rollout.temperature`). It runs in one process with no process
group, whatever the checkpoint: a sharded one is read with DCP's no-dist load, only the model's
bytes, straight into an ordinary model.

The newest sealed step whose files verify is exported unless `--step` names one (it must verify
too); replica 0's weights unless `--replica` says otherwise (replicas agree after a full sync).
The directory is written under a temporary name and renamed into place, so DIR is whole or absent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from trainer import checkpoint
from trainer.config import Config, ConfigError, load_config
from trainer.model import tiny_config


class ExportError(RuntimeError):
    """The run cannot be exported as asked; the message names the file or the flag."""


def run_config(run_dir: Path) -> Config:
    """The run's resolved config (`config.json`, written by the lead at the run's start)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{path}: missing; is {run_dir} a run directory (python -m trainer.worker writes it)?")
    try:
        return load_config(path)
    except ConfigError as error:
        raise ExportError(str(error)) from None


def run_tokenizer(config: Config, run_dir: Path):
    """The tokenizer the run trained with: the tiny model's own (saved in the run directory) or the hub one."""
    if config.model.name != "tiny":
        tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.name)
    else:
        saved = sorted(p for p in run_dir.glob("tokenizer-*") if (p / "tokenizer.json").is_file())
        if len(saved) != 1:
            raise ExportError(f"{run_dir}: expected one saved tokenizer-*/ folder, found {[p.name for p in saved]}")
        tokenizer = AutoTokenizer.from_pretrained(saved[0])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def empty_model(config: Config, tokenizer) -> PreTrainedModel:
    """A fp32 model of the run's shape, weights to be loaded (the hub model's config, or the tiny shape)."""
    m = config.model
    if m.name == "tiny":
        shape = tiny_config(tokenizer, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads)
    else:
        shape = AutoConfig.from_pretrained(m.name)
    return AutoModelForCausalLM.from_config(shape, dtype=torch.float32)


def load_checkpoint_model(run_dir: Path, step: int | None = None, replica: int = 0) -> tuple[PreTrainedModel, int]:
    """The model a checkpoint of `run_dir` holds, unsharded, and the step it came from.

    Raises ExportError: no sealed step verifies, `step` is not sealed or is damaged, or the
    checkpoint holds no files for `replica`.
    """
    config = run_config(run_dir)
    root = Path(config.checkpoint_dir) if config.checkpoint_dir else run_dir / "checkpoints"
    try:
        if step is None:
            step = checkpoint.latest_loadable(root)
            if step is None:
                raise ExportError(f"{root}: no sealed checkpoint to export")
        elif step not in checkpoint.complete_steps(root):
            raise ExportError(
                f"--step {step}: not a sealed checkpoint in {root} (sealed: {checkpoint.complete_steps(root)})"
            )
        elif (problem := checkpoint.verify_step(root, step)) is not None:
            raise ExportError(f"--step {step}: damaged checkpoint: {problem}")
    except checkpoint.CheckpointError as error:
        raise ExportError(str(error)) from None
    model = empty_model(config, run_tokenizer(config, run_dir))
    folder = checkpoint.step_dir(root, step)
    sharded, plain = folder / f"replica-{replica}", folder / f"replica-{replica}.safetensors"
    if sharded.is_dir():
        checkpoint.load_sharded_model(sharded, model)
    elif plain.is_file():
        load_model(model, str(plain))
    else:
        saved = sorted(p.name for p in folder.glob("replica-*"))
        raise ExportError(f"{folder}: no files for --replica {replica} (saved: {saved})")
    return model.eval(), step


def export(run_dir: Path, out: Path, *, step: int | None = None, replica: int = 0) -> Path:
    """Write the Hugging Face directory `out` from `run_dir`'s checkpoint; returns `out`.

    Raises ExportError: `out` exists, or the checkpoint cannot be read (see `load_checkpoint_model`).
    """
    if out.exists():
        raise ExportError(f"--out {out}: already exists; choose a new directory")
    config = run_config(run_dir)
    tokenizer = run_tokenizer(config, run_dir)
    model, step = load_checkpoint_model(run_dir, step, replica)
    # Sampling as the run sampled (trainer.rollout.sampling): the full distribution at the run's temperature.
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=config.rollout.temperature,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            checkpoint.fsync(path)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.fsync(out.parent)
    count = sum(p.numel() for p in model.parameters())
    print(f"exported step {step} of replica {replica} ({count:,} parameters) to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (runs/<name>)")
    parser.add_argument(
        "--step", type=int, default=None, help="outer step to export (default: the newest that verifies)"
    )
    parser.add_argument("--replica", type=int, default=0, help="whose weights (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face directory to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        export(args.run_dir, args.out, step=args.step, replica=args.replica)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
