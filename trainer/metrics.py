"""What people look at: `metrics.jsonl` (one JSON object per line), a per-round table on stdout,
and `curves.png` drawn from the JSONL at the end of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainer.checkpoint import strict_json

TABLE_COLUMNS = ("round", "reward", "±σ", "teacher", "grpo", "sdpo", "dpo", "|Δ|", "MB sent", "s")


class MetricsLog:
    """Append-only JSONL; every line is flushed so a killed run keeps what it logged. Lines are strict
    JSON (`trainer.checkpoint.strict_json`): a non-finite value (a NaN or infinite figure) is
    written as null with `<key>_reason` beside it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def log(self, event: str, **fields: Any) -> None:
        self._file.write(strict_json({"event": event, **fields}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of per-step mean rewards.

    Measured from the spread of the steps themselves, so it holds every source of sampling noise
    (which prompts were drawn, which completions were sampled), not only the Bernoulli part.
    """
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def reward_rise(step_rewards_by_round: list[list[float]]) -> dict[str, Any]:
    """Last quarter of the rounds against the first: the rise and how many standard errors it is.

    reward_rise_sigmas is None where no standard error exists, with reward_rise_sigmas_reason
    saying why: "no variation" (every step's reward alike in both spans), or "one step per span"
    (a standard error needs two).
    """
    span = max(1, len(step_rewards_by_round) // 4)
    first_steps = [r for rnd in step_rewards_by_round[:span] for r in rnd]
    last_steps = [r for rnd in step_rewards_by_round[-span:] for r in rnd]
    first, first_error = mean_and_error(first_steps)
    last, last_error = mean_and_error(last_steps)
    noise = math.hypot(first_error, last_error)
    rise: dict[str, Any] = dict(reward_first=first, reward_last=last, reward_rise=last - first)
    if noise > 0:
        rise["reward_rise_sigmas"] = (last - first) / noise
    else:
        rise["reward_rise_sigmas"] = None
        rise["reward_rise_sigmas_reason"] = "one step per span" if math.isnan(noise) else "no variation"
    return rise


def _rise_sigmas(summary: dict[str, Any], key: str, sigmas: float, reason: str) -> None:
    """summary[key] = sigmas, or None with `<key>_reason` where they are undefined (nan)."""
    summary[key] = None if math.isnan(sigmas) else sigmas
    if summary[key] is None:
        summary[f"{key}_reason"] = reason


def paired_rise(before: list[bool], after: list[bool]) -> tuple[float, float]:
    """(rise, rise in standard errors) of pass@1 between two evaluations of the same tasks.

    The same tasks are scored twice, so the noise is in the tasks that changed: with b tasks gained
    and c lost out of n, rise = (b - c) / n and its standard error sqrt(b + c) / n (the paired,
    McNemar form); nan sigmas when nothing changed.
    """
    if len(before) != len(after):
        raise ValueError(f"paired_rise: {len(before)} and {len(after)} outcomes; evaluate the same tasks")
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    n = len(before)
    rise = (gained - lost) / n
    return rise, rise / (math.sqrt(gained + lost) / n) if gained + lost else float("nan")


def paired_mean_rise(before: list[float], after: list[float]) -> tuple[float, float]:
    """(rise, rise / its standard error) of a per-task rate measured twice on the same tasks.

    For the held-out pass rate of sampled episodes (each task's fraction of k samples that passed):
    with per-task differences d_i = after_i - before_i, rise = mean(d) and its standard error
    std(d) / sqrt(n) with the sample standard deviation: the paired t statistic (Student 1908; what
    scipy.stats.ttest_rel reports). nan sigmas when every task changed by the same amount.
    """
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"paired_mean_rise: {len(before)} and {len(after)} rates; evaluate the same >= 2 tasks")
    diffs = [a - b for b, a in zip(before, after, strict=True)]
    n = len(diffs)
    rise = sum(diffs) / n
    spread = math.sqrt(sum((d - rise) ** 2 for d in diffs) / (n - 1))
    return rise, rise / (spread / math.sqrt(n)) if spread else float("nan")


def table_header() -> str:
    return " ".join(f"{c:>8}" for c in TABLE_COLUMNS)


def table_row(values: tuple) -> str:
    cells = []
    for value in values:
        if value is None:
            cells.append(f"{'-':>8}")
        elif isinstance(value, float):
            small = value != 0 and abs(value) < 1e-3
            cells.append(f"{value:>8.1e}" if small else f"{value:>8.4f}" if abs(value) < 100 else f"{value:>8.1f}")
        else:
            cells.append(f"{value:>8}")
    return " ".join(cells)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def latest_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inner, eval) records with a resumed run's repeats removed: the last line for a position wins.

    A crash between a round's metrics and its checkpoint makes the resumed run log that round
    again; keying inner records by (step, rank) and eval records by outer step keeps one of each.
    """
    inner = {(r["step"], r.get("rank", r.get("replica"))): r for r in records if r.get("event") == "inner"}
    evals = {r["outer_step"]: r for r in records if r.get("event") == "eval"}
    return [inner[k] for k in sorted(inner)], [evals[k] for k in sorted(evals)]


def run_summary(path: Path) -> dict[str, Any]:
    """The end-of-run figures, from the whole metrics file (every round, across resumes).

    reward_first/last/rise/rise_sigmas (`reward_rise` over the rounds), skipped_steps (inner steps
    at which some replica took no optimizer step; skipped_replica_steps counts each replica),
    eval_* (held-out pass@1 and pass@k at the first and last evaluation, when there were any;
    pass@1's paired rise over the greedy episodes, and sampled_reward's, the pass rate of the k
    sampled episodes per task, with `paired_mean_rise`).
    """
    inner, evals = latest_records(read_metrics(path))
    by_round: dict[int, list[float]] = {}
    for record in inner:
        by_round.setdefault(record["round"], []).append(record["reward"])
    skipped = [r for r in inner if r.get("skipped")]
    summary: dict[str, Any] = {
        "skipped_steps": len({r["step"] for r in skipped}),
        "skipped_replica_steps": len({(r["step"], r["replica"]) for r in skipped}),
    }
    if len(by_round) >= 2:
        summary.update(reward_rise([by_round[k] for k in sorted(by_round)]))
    if evals:
        for key in ("pass_at_1", "pass_at_k"):
            summary[f"eval_{key}_first"] = evals[0][key]
            summary[f"eval_{key}_last"] = evals[-1][key]
        summary["eval_size"], summary["eval_k"] = evals[-1]["size"], evals[-1]["k"]
        if len(evals) >= 2 and "greedy_correct" in evals[0] and "greedy_correct" in evals[-1]:
            rise, sigmas = paired_rise(evals[0]["greedy_correct"], evals[-1]["greedy_correct"])
            summary["eval_pass_at_1_rise"] = rise
            _rise_sigmas(summary, "eval_pass_at_1_rise_sigmas", sigmas, "no task changed")
        if "sampled_reward" in evals[0]:
            summary["eval_sampled_reward_first"] = evals[0]["sampled_reward"]
            summary["eval_sampled_reward_last"] = evals[-1]["sampled_reward"]
        if len(evals) >= 2 and "sampled_correct" in evals[0] and "sampled_correct" in evals[-1]:
            k = evals[-1]["k"]
            before, after = ([c / k for c in e["sampled_correct"]] for e in (evals[0], evals[-1]))
            rise, sigmas = paired_mean_rise(before, after)
            summary["eval_sampled_reward_rise"] = rise
            _rise_sigmas(summary, "eval_sampled_reward_rise_sigmas", sigmas, "every task changed alike")
    return summary


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Reward (student and hinted teacher), the loss channels, pseudo-gradient norm, held-out pass@1/pass@k,
    and the DPO reward margin when the run has a DPO channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    inner, evals = latest_records(records)
    outer = [r for r in records if r["event"] == "outer"]
    margin = any("dpo_reward_margin" in r for r in inner)  # issue 15: the DPO channel's signal
    fig, axes = plt.subplots(1, 5 if margin else 4, figsize=(25 if margin else 20, 4))
    by_step: dict[int, list[dict]] = {}
    for r in inner:
        by_step.setdefault(r["step"], []).append(r)
    steps = sorted(by_step)

    def value(r: dict, key: str) -> float:
        """A value written as null for being non-finite (null with a reason) is a gap; other nulls 0."""
        return math.nan if r[key] is None and f"{key}_reason" in r else r[key] or 0.0

    def mean_of(key: str) -> list[float]:
        return [sum(value(r, key) for r in by_step[s]) / len(by_step[s]) for s in steps]

    axes[0].plot(steps, mean_of("reward"), label="student reward")
    if any(r.get("teacher_reward") is not None for r in inner):
        axes[0].plot(steps, mean_of("teacher_reward"), label="hinted teacher reward")
    axes[0].set(xlabel="inner step", title="sampled reward (mean over replicas)")
    for key in ("grpo", "sdpo", "dpo", "loss"):
        axes[1].plot(steps, mean_of(key), label=key)
    axes[1].set(xlabel="inner step", title="loss channels")
    axes[2].plot([r["outer_step"] for r in outer], [value(r, "pseudo_grad_norm") for r in outer], marker="o")
    axes[2].set(xlabel="outer step", title="pseudo-gradient norm")
    if evals:
        k = evals[-1]["k"]
        axes[3].plot([r["outer_step"] for r in evals], [r["pass_at_1"] for r in evals], marker="o", label="pass@1")
        axes[3].plot([r["outer_step"] for r in evals], [r["pass_at_k"] for r in evals], marker="s", label=f"pass@{k}")
        axes[3].legend()
    axes[3].set(xlabel="outer step", ylim=(0, 1), title=f"held-out ({evals[-1]['size'] if evals else 0} prompts)")
    if margin:
        margins = [sum(r.get("dpo_reward_margin", 0.0) for r in by_step[s]) / len(by_step[s]) for s in steps]
        axes[4].plot(steps, margins, alpha=0.4, label="per step")
        window = max(1, len(steps) // 8)
        smooth = [
            sum(margins[max(0, i - window + 1) : i + 1]) / len(margins[max(0, i - window + 1) : i + 1])
            for i in range(len(margins))
        ]
        axes[4].plot(steps, smooth, label=f"mean of {window} steps")
        axes[4].axhline(0, color="grey", lw=0.5)
        axes[4].set(xlabel="inner step", title="DPO reward margin (chosen - rejected)")
        axes[4].legend()
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# Keys that measure speed, not what the run computed: they differ between two runs of one seed.
TIMING_KEYS = frozenset(
    {"tokens_per_s", "generation_s", "execution_s", "loss_s", "compute_s", "communication_s", "model_s", "tools_s"}
)


def compare_metrics(a: Path, b: Path, *, ignore: frozenset[str] = TIMING_KEYS) -> list[str]:
    """Every difference between two runs' metrics.jsonl, timings aside; [] when they computed the same.

    Records are compared in file order, values exactly (a refactor must not move a float by an ulp).
    Returns one line per difference, naming the line and key.
    """
    left, right = read_metrics(a), read_metrics(b)
    differences = [f"{a}: {len(left)} records, {b}: {len(right)}"] if len(left) != len(right) else []
    for line, (x, y) in enumerate(zip(left, right, strict=False), start=1):
        for key in sorted((set(x) | set(y)) - ignore):
            if x.get(key, "<absent>") != y.get(key, "<absent>"):
                differences.append(
                    f"line {line} ({x.get('event')}): {key}: {x.get(key, '<absent>')!r} != {y.get(key, '<absent>')!r}"
                )
    return differences


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.metrics compare A B`: exit 0 when two runs logged the same numbers."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.metrics")
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="diff two metrics.jsonl files, timings aside")
    compare.add_argument("a", type=Path)
    compare.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    differences = compare_metrics(args.a, args.b)
    for line in differences[:50]:
        print(line)
    records = len(read_metrics(args.a))
    keys = len({key for r in read_metrics(args.a) for key in r} - TIMING_KEYS)
    print(
        f"{records} records, {keys} keys compared (ignored: {', '.join(sorted(TIMING_KEYS))}): "
        f"{len(differences)} differences"
    )
    return 1 if differences else 0


if __name__ == "__main__":
    raise SystemExit(main())
