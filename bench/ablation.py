"""`make ablation`: does each channel of `grpo + alpha * sdpo + beta * dpo` help, on held-out accuracy?

The issue-15 grid: GRPO alone (alpha = beta = 0), + SDPO with each hint kind (feedback, partial,
answer, a successful sibling), + SDPO on failures only (`loss.sdpo_on: failed`), + DPO, and all
three, on `addition` (configs/smoke.yaml) and `code_arith` (configs/code-smoke.yaml), >= 3 seeds a
cell. Optional (`--cells`): + SDPO with the live policy as teacher instead of the configs' EMA copy.

Every run is the real trainer: `python -m trainer.worker` on the task's config with the cell's
overrides, one process (one replica, so DiLoCo's outer step still runs every H steps), shortened to
fit the budget (`TASKS`: rounds, prompts per step, evaluation every 2 rounds, greedy pass@1 only).
Fairness: one supervised warm-up per (task, seed), saved in Hugging Face format and loaded by
every cell of that seed (`model.name: <dir>`, `optim.sft_steps: 0`); it trains on the plain prompt,
the answer hint and a sibling's answer (the formats the teacher reads), never on a cell's choice.
So the cells of one seed start from the same weights and differ only in their loss, and each cell
is compared with GRPO alone seed by seed (paired).

Per cell, from each run's `eval` records: held-out greedy pass@1 over training, its area under
the curve (the mean over the evaluations, x = completions generated, trapezoids), the final
value, the completions generated until pass@1 first reaches the threshold (GRPO alone's mean final
pass@1 on that task: "how soon does a cell get where GRPO ends"), and the teacher gate (the mean
per-token log-prob of correct held-out completions under the hinted teacher and the student,
`trainer.rollout.evaluation.teacher_gate`, averaged over the evaluations). Means with sigma = the sample
standard deviation across seeds; `auc_delta` is the paired difference to GRPO alone.

Cells run in a fixed order (TASKS x CELLS x SEEDS), `--jobs` at a time; a run whose summary.json
exists is skipped, a run cut short resumes from its last checkpoint (the worker's own resume), so
rerunning the command continues where it stopped. Progress: one line per run, with an ETA.
Writes bench/results/ablation.md, ablation.json and ablation.png (pass@1 curves per task, and the
DPO reward margin of the DPO cells). Runs live in runs/ablation/.

    .venv/bin/python bench/ablation.py [--jobs 2] [--seeds 3] [--tasks addition code_arith] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from trainer.checkpoint import latest_complete  # noqa: E402
from trainer.metrics import latest_records, paired_rise, read_metrics  # noqa: E402
from trainer.run.placement import write_json  # noqa: E402

# The task's config, and the overrides that size one run to the budget (every cell alike).
TASKS: dict[str, dict] = {
    "addition": dict(
        config="configs/smoke.yaml",
        overrides=dict(
            rounds=8, **{"rollout.prompts_per_step": 16, "eval.every": 2, "eval.k": 1, "loss.dpo_pairs_per_step": 16}
        ),
    ),
    "code_arith": dict(
        config="configs/code-smoke.yaml",
        overrides=dict(
            rounds=8,
            **{"rollout.prompts_per_step": 8, "eval.every": 2, "eval.k": 1, "sandbox.workers": 1},
        ),
    ),
}


@dataclass(frozen=True)
class Cell:
    name: str
    alpha: float
    beta: float
    hint: str | None  # feedback | partial | answer | sibling; None: no SDPO channel
    sdpo_on: str = "all"
    teacher: str = "ema"  # loss.teacher: the configs' slow EMA copy, or the live policy


HINT_LEVELS = {"feedback": "feedback", "partial": "partial", "answer": "reference", "sibling": "sibling"}
CELLS = (
    Cell("grpo", 0.0, 0.0, None),
    Cell("+sdpo feedback", 1.0, 0.0, "feedback"),
    Cell("+sdpo partial", 1.0, 0.0, "partial"),
    Cell("+sdpo answer", 1.0, 0.0, "answer"),
    Cell("+sdpo sibling", 1.0, 0.0, "sibling"),
    Cell("+sdpo answer, on failed", 1.0, 0.0, "answer", "failed"),
    Cell("+dpo", 0.0, 0.1, None),  # alpha and beta as configs/smoke.yaml and code-smoke.yaml set them
    Cell("all three", 1.0, 0.1, "answer"),
)
# Not in the default grid (the budget): --cells names them. Does the EMA teacher's lag cost?
OPTIONAL_CELLS = (Cell("+sdpo answer, policy teacher", 1.0, 0.0, "answer", teacher="policy"),)
ALL_CELLS = CELLS + OPTIONAL_CELLS


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


def cell_overrides(cell: Cell) -> dict:
    level = HINT_LEVELS[cell.hint] if cell.hint else "reference"
    return {
        "loss.alpha": cell.alpha,
        "loss.beta": cell.beta,
        "loss.sdpo_on": cell.sdpo_on,
        "loss.teacher": cell.teacher,
        "task.hint_level": level,
        "task.sibling_hints": False,  # the hint kind is the cell's alone
    }


def sets(overrides: dict) -> list[str]:
    """`--set KEY=VALUE` arguments (values as JSON, which the config's YAML reader parses back)."""
    return [arg for item in sets_to_list(overrides) for arg in ("--set", item)]


def sets_to_list(overrides: dict) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


# ---- running -------------------------------------------------------------------------------------


def warm_start(task: str, seed: int, directory: Path, steps: int | None = None) -> None:
    """The shared warm-up of (task, seed): the trainer's own build + warm-up, saved in HF format.

    `steps`: SFT steps (None: the task config's `optim.sft_steps`)."""
    from trainer.config import load_config
    from trainer.run.build import build
    from trainer.run.step import warm_up

    config = load_config(
        ROOT / TASKS[task]["config"],
        sets_to_list(
            {
                "seed": seed,
                "run_dir": str(directory / "build"),
                "task.hint_level": "reference",
                "task.sibling_hints": True,
                **({} if steps is None else {"optim.sft_steps": steps}),
            }
        ),
    )
    run = build(config)
    warm_up(run)
    run.model.save_pretrained(directory / "model")
    run.tokenizer.save_pretrained(directory / "model")
    (directory / "model" / "DONE").write_text("ok\n")


def run_dir_state(run_dir: Path) -> str:
    """done (summary.json), resumable (a sealed checkpoint: the worker resumes it), or fresh (a run
    cut short before its first checkpoint is cleared, so its partial metrics are not appended to)."""
    if (run_dir / "summary.json").exists():
        return "done"
    if latest_complete(run_dir / "checkpoints") is not None:
        return "resumable"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return "fresh"


def plan(out: Path, tasks: list[str], cells: list[Cell], seeds: int) -> list[tuple[str, Cell, int, Path]]:
    """Every run in the fixed order: task, cell, seed."""
    return [
        (task, cell, seed, out / task / slug(cell.name) / f"seed{seed}")
        for task in tasks
        for cell in cells
        for seed in range(seeds)
    ]


def command(task: str, cell: Cell, seed: int, run_dir: Path, warm_dir: Path, extra: list[str]) -> list[str]:
    overrides = {
        "name": f"ablation-{task}-{slug(cell.name)}-{seed}",
        "run_dir": str(run_dir),
        "seed": seed,
        "model.name": str(warm_dir / "model"),
        "optim.sft_steps": 0,
        **TASKS[task]["overrides"],
        **cell_overrides(cell),
    }
    extra_sets = [arg for item in extra for arg in ("--set", item)]
    config = str(ROOT / TASKS[task]["config"])
    return [sys.executable, "-m", "trainer.worker", "--config", config, *sets(overrides), *extra_sets]


def run_grid(
    out: Path,
    tasks: list[str],
    cells: list[Cell],
    seeds: int,
    jobs: int,
    extra: list[str],
    warmup_steps: int | None = None,
) -> int:
    """Warm-ups, then every run of `plan` not yet done, `jobs` at a time; one progress line per run.
    Returns how many runs it started."""
    runs = plan(out, tasks, cells, seeds)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)), PYTHONPATH=str(ROOT))
    todo = [r for r in runs if run_dir_state(r[3]) != "done"]
    print(f"ablation: {len(runs)} runs ({len(runs) - len(todo)} already done), {jobs} at a time", flush=True)
    warm_ups = [  # first, `jobs` at a time; one saved is never redone
        (task, seed, out / task / "warm-up" / f"seed{seed}")
        for task in tasks
        for seed in range(seeds)
        if not (out / task / "warm-up" / f"seed{seed}" / "model" / "DONE").exists()
        and any(t == task and s == seed for t, _, s, _ in todo)
    ]
    while warm_ups:
        batch, warm_ups = warm_ups[:jobs], warm_ups[jobs:]
        start = time.perf_counter()
        procs = []
        for task, seed, warm_dir in batch:
            warm_dir.mkdir(parents=True, exist_ok=True)
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--warm-start", task, str(seed), str(warm_dir)]
                    + ([] if warmup_steps is None else ["--warmup-steps", str(warmup_steps)]),
                    env=env,
                    stdout=(warm_dir / "warm-up.log").open("w"),
                    stderr=subprocess.STDOUT,
                )
            )
        for proc, (task, seed, warm_dir) in zip(procs, batch, strict=True):
            if proc.wait() != 0:
                raise SystemExit(f"ablation: the warm-up of {task} seed {seed} failed; see {warm_dir}/warm-up.log")
            print(f"  warm-up {task} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    started, running, finished = time.perf_counter(), [], 0
    queue = list(todo)
    while queue or running:
        while queue and len(running) < jobs:
            task, cell, seed, run_dir = queue.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = (run_dir.parent / f"seed{seed}.log").open("a")
            warm_dir = out / task / "warm-up" / f"seed{seed}"
            proc = subprocess.Popen(
                command(task, cell, seed, run_dir, warm_dir, extra), env=env, stdout=log, stderr=subprocess.STDOUT
            )
            running.append((proc, task, cell, seed, run_dir, time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            proc, task, cell, seed, run_dir, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            finished += 1
            seconds = run_dir.parent / f"seed{seed}.seconds"  # a resumed run adds to what it had run before
            spent = float(seconds.read_text()) if seconds.exists() else 0.0
            seconds.write_text(f"{spent + time.perf_counter() - t0:.1f}\n")
            if proc.returncode != 0:
                raise SystemExit(
                    f"ablation: {task} / {cell.name} / seed {seed} failed; see {run_dir.parent}/seed{seed}.log"
                )
            evals = eval_points(run_dir)
            elapsed = time.perf_counter() - started
            eta = elapsed / finished * (len(todo) - finished)
            print(
                f"  [{len(runs) - len(todo) + finished}/{len(runs)}] {task:10} {cell.name:24} seed {seed}: "
                f"pass@1 {evals[0][1]:.3f} -> {evals[-1][1]:.3f} "
                f"({time.perf_counter() - t0:.0f} s; ETA {eta / 60:.1f} min)",
                flush=True,
            )
    return len(todo)


# ---- reading the runs ----------------------------------------------------------------------------


def eval_points(run_dir: Path) -> list[tuple[int, float, dict]]:
    """(completions generated so far, greedy pass@1, the eval record) at each evaluation of a run."""
    config = json.loads((run_dir / "config.json").read_text())
    per_round = config["diloco"]["sync_every"] * config["rollout"]["prompts_per_step"] * config["rollout"]["group_size"]
    _, evals = latest_records(read_metrics(run_dir / "metrics.jsonl"))
    return [(r["round"] * per_round, r["pass_at_1"], r) for r in evals]


def auc(points: list[tuple[int, float, dict]]) -> float:
    """Mean pass@1 over training: the trapezoid area under pass@1 vs completions, over the span."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(xs) < 2 or xs[-1] == xs[0]:
        return ys[-1]
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def samples_to(points: list[tuple[int, float, dict]], threshold: float) -> int | None:
    """Completions generated when pass@1 first reaches `threshold` (None: never in the run)."""
    return next((x for x, y, _ in points if y >= threshold - 1e-9), None)


def mean_sigma(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def gate_kind(cell: Cell) -> str:
    """The hint kind whose gate figures a cell shows (no SDPO: the answer hint, with the policy as teacher)."""
    return HINT_LEVELS[cell.hint] if cell.hint else "reference"


def summarise(out: Path, tasks: list[str], cells: list[Cell], seeds: int) -> dict:
    """The table's rows (one per task and cell with a finished run), mean curves and DPO margins."""
    rows, curves, margins = [], {}, {}
    run_seconds = sum(float(p.read_text()) for p in out.glob("*/*/seed*.seconds"))
    for task in tasks:
        per_cell = {}
        for cell in cells:
            dirs = [out / task / slug(cell.name) / f"seed{s}" for s in range(seeds)]
            done = [(s, d) for s, d in enumerate(dirs) if (d / "summary.json").exists()]
            if done:
                per_cell[cell] = {s: eval_points(d) for s, d in done}
        if not per_cell:
            continue
        grpo = per_cell.get(CELLS[0], {})  # GRPO alone: the threshold and the paired baseline
        threshold = mean_sigma([pts[-1][1] for pts in grpo.values()])[0] if grpo else None
        for cell, by_seed in per_cell.items():
            aucs = {s: auc(p) for s, p in by_seed.items()}
            deltas = [aucs[s] - auc(grpo[s]) for s in aucs if s in grpo]
            kind = gate_kind(cell)
            teacher = [sum(r["teacher_logp"][kind] for *_, r in p) / len(p) for p in by_seed.values()]
            student = [sum(r["student_logp"] for *_, r in p) / len(p) for p in by_seed.values()]
            reach = [samples_to(p, threshold) for p in by_seed.values()] if threshold is not None else []
            auc_mean, auc_sigma = mean_sigma(list(aucs.values()))
            final, final_sigma = mean_sigma([p[-1][1] for p in by_seed.values()])
            delta, delta_sigma = mean_sigma(deltas)
            # the final evaluation against GRPO's, problem by problem (same problems, same seeds): McNemar
            pairs = [(r, grpo[s][-1][2]) for s, p in by_seed.items() if s in grpo for *_, r in p[-1:]]
            final_delta, final_delta_sigmas = paired_rise(
                [c for _, g in pairs for c in g["greedy_correct"]], [c for r, _ in pairs for c in r["greedy_correct"]]
            )
            rows.append(
                dict(
                    task=task,
                    cell=cell.name,
                    alpha=cell.alpha,
                    beta=cell.beta,
                    hint=cell.hint,
                    sdpo_on=cell.sdpo_on,
                    teacher=cell.teacher if cell.alpha > 0 else None,
                    seeds=len(by_seed),
                    auc=auc_mean,
                    auc_sigma=auc_sigma,
                    auc_delta=delta,
                    auc_delta_sigma=None if delta_sigma is None else delta_sigma / math.sqrt(len(deltas)),
                    final_delta=final_delta,
                    final_delta_sigma=abs(final_delta / final_delta_sigmas) if final_delta else None,
                    samples_to_threshold=mean_sigma(reach)[0],
                    reached=f"{sum(r is not None for r in reach)}/{len(reach)}",
                    threshold=threshold,
                    start=mean_sigma([p[0][1] for p in by_seed.values()])[0],
                    final=final,
                    final_sigma=final_sigma,
                    teacher_logp=mean_sigma(teacher)[0],
                    student_logp=mean_sigma(student)[0],
                    gate_kind=kind,
                )
            )
            xs = [x for x, *_ in next(iter(by_seed.values()))]
            ys = [mean_sigma([p[i][1] for p in by_seed.values() if i < len(p)]) for i in range(len(xs))]
            curves.setdefault(task, {})[cell.name] = (xs, ys)
            if cell.beta > 0:
                margins.setdefault(task, {})[cell.name] = dpo_margins(
                    [out / task / slug(cell.name) / f"seed{s}" for s in by_seed]
                )
    return dict(rows=rows, curves=curves, margins=margins, run_seconds=run_seconds)


def dpo_margins(run_dirs: list[Path]) -> list[float]:
    """Mean over seeds of each inner step's DPO reward margin (0 before the first pair)."""
    series = []
    for run_dir in run_dirs:
        inner, _ = latest_records(read_metrics(run_dir / "metrics.jsonl"))
        series.append([r.get("dpo_reward_margin", 0.0) for r in inner])
    length = min(map(len, series))
    return [sum(s[i] for s in series) / len(series) for i in range(length)]


# ---- writing -------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_results(summary: dict, results: Path, wall_s: float | None, jobs: int) -> None:
    results.mkdir(parents=True, exist_ok=True)
    rows = summary["rows"]
    write_json(
        results / "ablation.json",
        dict(
            rows=rows,
            machine=platform.platform(),
            cpus=os.cpu_count(),
            jobs=jobs,
            wall_s=wall_s,
            run_seconds=summary["run_seconds"],
        ),
    )
    lines = [
        "# α/β ablation (issue 15): held-out greedy pass@1",
        "",
        "`make ablation` (bench/ablation.py); every run is `python -m trainer.worker` on the task's config,",
        "one replica, cells sharing one warm-up per seed. AUC: mean pass@1 over training; Δ AUC: paired",
        "difference to GRPO alone (same seed, same warm-up), ± its standard error; σ: standard deviation",
        "across seeds; Δ final: the last evaluation against GRPO's, problem by problem over all seeds, ± the",
        "paired (McNemar) standard error sqrt(gained + lost) / n. Samples: completions generated until pass@1",
        "first reaches the threshold (GRPO's mean final pass@1), mean over the seeds that reach it.",
        "Gate: mean per-token log-prob of the correct",
        "held-out completion under the hinted teacher (the cell's hint; cells without SDPO: the answer",
        "hint, the policy as teacher) and under the student, averaged over evaluations.",
        "",
        f"Time: {summary['run_seconds'] / 60:.1f} min of runs ({jobs} at a time on {os.cpu_count()} cores, "
        f"warm-ups not counted); wall time of the invocation that ran them "
        f"{fmt(wall_s / 60 if wall_s else None, 1)} min (other work shared the cores).",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        lines += [
            "",
            f"## {task} (threshold {fmt(task_rows[0]['threshold'])})",
            "",
            "| cell | α | β | hint | sdpo_on | seeds | start | AUC ± σ | Δ AUC vs GRPO | final ± σ "
            "| Δ final vs GRPO | samples to threshold (reached) | teacher logp | student logp |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in task_rows:
            delta = "–" if r["auc_delta"] is None else f"{r['auc_delta']:+.3f} ± {fmt(r['auc_delta_sigma'])}"
            samples = "–" if r["samples_to_threshold"] is None else f"{r['samples_to_threshold']:.0f}"
            final_delta = "–"
            if r["final_delta_sigma"] is not None:
                final_delta = f"{r['final_delta']:+.3f} ± {r['final_delta_sigma']:.3f}"
            lines.append(
                f"| {r['cell']} | {r['alpha']:g} | {r['beta']:g} | {r['hint'] or '–'} | {r['sdpo_on']} | {r['seeds']} "
                f"| {fmt(r['start'])} | {fmt(r['auc'])} ± {fmt(r['auc_sigma'])} | {delta} "
                f"| {fmt(r['final'])} ± {fmt(r['final_sigma'])} "
                f"| {final_delta} "
                f"| {samples} ({r['reached']}) "
                f"| {fmt(r['teacher_logp'], 2)} ({r['gate_kind']}) | {fmt(r['student_logp'], 2)} |"
            )
    (results / "ablation.md").write_text("\n".join(lines) + "\n")
    plot(summary, results / "ablation.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["curves"])
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(6 * (len(tasks) + 1), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        for name, (xs, ys) in summary["curves"][task].items():
            means = [m for m, _ in ys]
            sig = [s or 0.0 for _, s in ys]
            ax.plot(xs, means, marker="o", label=name, lw=2.5 if name == "grpo" else 1.2)
            low = [m - s for m, s in zip(means, sig, strict=True)]
            ax.fill_between(xs, low, [m + s for m, s in zip(means, sig, strict=True)], alpha=0.08)
        ax.set(xlabel="completions generated", ylabel="held-out greedy pass@1", title=f"{task} (mean ± σ over seeds)")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for task, cells in summary["margins"].items():
        for name, series in cells.items():
            ax.plot(range(len(series)), series, label=f"{task}: {name}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="inner step", ylabel="β·(Δ chosen − Δ rejected)", title="DPO reward margin (mean over seeds)")
    if summary["margins"] and any(summary["margins"].values()):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no DPO cell in this grid", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def positive(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/ablation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=positive, default=2, help="runs at a time (default 2: one per core)")
    parser.add_argument("--seeds", type=positive, default=3, help="seeds a cell, 0..N-1 (default 3, the least σ needs)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--cells", nargs="+", default=[c.name for c in CELLS], choices=[c.name for c in ALL_CELLS])
    parser.add_argument("--warmup-steps", type=int, help="SFT steps of the shared warm-up (default: the config's)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation", help="where the runs live")
    parser.add_argument(
        "--results",
        type=Path,
        help=f"where ablation.{{md,json,png}} go (default {RESULTS.relative_to(ROOT)}: the whole grid, >= 3 seeds)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override, every run")
    parser.add_argument("--warm-start", nargs=3, metavar=("TASK", "SEED", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warm_start:
        task, seed, directory = args.warm_start
        warm_start(task, int(seed), Path(directory), args.warmup_steps)
        return 0
    cells = [c for c in ALL_CELLS if c.name in args.cells]  # the fixed order, whatever the order asked
    whole = set(args.tasks) == set(TASKS) and all(c in cells for c in CELLS) and args.seeds >= 3
    if args.results is None and not whole:  # a subset must not overwrite the committed results
        parser.error(
            f"a subset of the grid (tasks, cells, or fewer than 3 seeds) needs --results DIR; "
            f"{RESULTS.relative_to(ROOT)} holds the whole grid's"
        )
    args.results = args.results or RESULTS
    start = time.perf_counter()
    started = run_grid(args.out, args.tasks, cells, args.seeds, args.jobs, args.set, args.warmup_steps)
    wall_s = time.perf_counter() - start
    previous = args.results / "ablation.json"
    if not started and previous.exists():  # nothing ran: keep the wall time of the invocation that did
        wall_s = json.loads(previous.read_text()).get("wall_s", wall_s)
    write_results(summarise(args.out, args.tasks, cells, args.seeds), args.results, wall_s, args.jobs)
    print(f"wrote {args.results}/ablation.md, ablation.json, ablation.png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
