"""The cost floor of external teachers: N real states (tasks the policy failed) x each teacher.

The project's plan asks for "5 real states x 3 teachers, p95 latency + cost" before any teacher is
put into a run: what one hint costs in seconds and dollars, what it would cost per 1,000 failed
states, how often the endpoint errs or throttles, and whether the hint helps at all. That last
figure is measured, not assumed: the policy samples each state k times behind the plain prompt and
k times behind the teacher's hint, with the same seed, and the report gives the two pass rates on
the states that got a hint, with the paired standard error of their difference.

`measure` works on states and a `Teachers`; `python -m trainer.teachers cost-floor` builds the
policy from a run config and writes `cost_floor.{md,json,png}` (`write_report`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import atomic_write, strict_json
from trainer.envs import HintRequest, Score, Task
from trainer.rollout.sampling import decode_completions, sample
from trainer.rollout.templates import chat_prompt_ids, hinted_prompt_ids
from trainer.teachers.client import percentile
from trainer.teachers.hints import hint_messages

ScoreMany = Callable[[Sequence[Task], Sequence[str]], list[Score]]


@dataclass
class State:
    """One failed attempt: what a hint writer reads (`request`) and, for single-turn tasks, the
    policy's own prompt ids (None for an agent episode: the hint's effect is not measured there)."""

    request: HintRequest
    prompt_ids: list[int] | None = None


def sample_states(
    sampler: Any,
    tokenizer: Any,
    draw: Callable[[], Task],
    n: int,
    *,
    score_many: ScoreMany,
    max_prompt_length: int,
    max_completion_length: int,
    temperature: float,
    stop_token_ids: Sequence[int],
    batch: int = 16,
    max_draws: int = 4096,
) -> list[State]:
    """`n` states: tasks from `draw()`, one sample each from `sampler` at `temperature`, the failed
    ones kept in order. Raises RuntimeError when `max_draws` tasks give fewer than `n` failures."""
    states: list[State] = []
    drawn = 0
    while len(states) < n:
        if drawn >= max_draws:
            raise RuntimeError(
                f"the policy failed only {len(states)} of {drawn} tasks; fewer than the {n} states asked"
            )
        tasks = [draw() for _ in range(batch)]
        drawn += batch
        prompts = chat_prompt_ids(tokenizer, [t.prompt() for t in tasks], max_prompt_length)
        out = sample(
            sampler,
            tokenizer,
            prompts,
            max_new_tokens=max_completion_length,
            temperature=temperature,
            stop_token_ids=stop_token_ids,
        )
        texts = decode_completions(tokenizer, out.completion_ids, out.completion_mask)
        for task, prompt, text, score in zip(tasks, prompts, texts, score_many(tasks, texts), strict=True):
            if not score.passed and len(states) < n:
                states.append(State(HintRequest(task, text, score.feedback), prompt))
    return states


def pass_rates(
    sampler: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    tasks: list[Task],
    *,
    k: int,
    seed: int,
    score_many: ScoreMany,
    max_completion_length: int,
    temperature: float,
    stop_token_ids: Sequence[int],
) -> list[float]:
    """Per prompt, the fraction of `k` samples (torch seeded with `seed`) its task's checker passes."""
    if not prompts:
        return []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = sample(
            sampler,
            tokenizer,
            [p for p in prompts for _ in range(k)],
            max_new_tokens=max_completion_length,
            temperature=temperature,
            stop_token_ids=stop_token_ids,
        )
    texts = decode_completions(tokenizer, out.completion_ids, out.completion_mask)
    scores = score_many([t for t in tasks for _ in range(k)], texts)
    return [sum(s.passed for s in scores[i * k : (i + 1) * k]) / k for i in range(len(prompts))]


def paired_gain(hinted: list[float], plain: list[float]) -> tuple[float | None, float | None]:
    """Mean of hinted - plain over the pairs and its standard error (None: no pair; one pair: no error)."""
    diffs = [h - p for h, p in zip(hinted, plain, strict=True)]
    if not diffs:
        return None, None
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, None
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def measure(
    teachers: Any,
    names: Sequence[str],
    states: list[State],
    *,
    sampler: Any = None,
    tokenizer: Any = None,
    k: int = 8,
    seed: int = 0,
    score_many: ScoreMany | None = None,
    max_prompt_length: int = 128,
    max_completion_length: int = 8,
    temperature: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Each named teacher writes a hint for every state (one batch each, its `timeout_s`): latency
    p50 / p95 / max of the sent calls, tokens, cost paid and cost per 1,000 states at its prices,
    retries and errors by kind, the hints' fates, and (with a `sampler`: the policy) the pass rate
    of the policy behind each accepted hint against the plain prompt on the same states, k samples
    each. Returns the report as JSON data (`write_report` writes it)."""
    measure_help = sampler is not None and all(s.prompt_ids is not None for s in states)
    plain: list[float] = []
    if measure_help:
        progress(f"the policy on the {len(states)} states without a hint, {k} samples each")
        plain = pass_rates(
            sampler,
            tokenizer,
            [s.prompt_ids for s in states],
            [s.request.task for s in states],
            k=k,
            seed=seed,
            score_many=score_many,
            max_completion_length=max_completion_length,
            temperature=temperature,
            stop_token_ids=stop_token_ids,
        )
    rows = [
        {
            "task": s.request.task.prompt(),
            "attempt": s.request.attempt,
            "feedback": s.request.feedback,
            "unhinted_pass_rate": plain[i] if plain else None,
            "hints": {},
        }
        for i, s in enumerate(states)
    ]
    results = []
    for name in names:
        client = teachers.clients[name]
        writer = teachers.hints(name)
        mark = len(teachers.book)
        progress(f"teacher {name} ({client.config.model} at {client.config.base_url}): {len(states)} hints")
        hints = writer([s.request for s in states])
        calls = teachers.book.records[mark:]
        counts = writer.take_counts()
        live = sorted(r.latency_s for r in calls if r.latency_s is not None)
        tokens_in, tokens_out = sum(r.input_tokens for r in calls), sum(r.output_tokens for r in calls)
        retries: dict[str, int] = {}
        for r in calls:
            for kind, count in r.retries.items():
                retries[kind] = retries.get(kind, 0) + count
        errors: dict[str, int] = {}
        for r in calls:
            if r.error:
                errors[r.error] = errors.get(r.error, 0) + 1
        result: dict[str, Any] = {
            "name": name,
            "model": client.config.model,
            "calls": len(calls),
            "cache_hits": sum(r.cached for r in calls),
            "latency_p50_s": percentile(live, 50),
            "latency_p95_s": percentile(live, 95),
            "latency_max_s": live[-1] if live else None,
            "input_tokens": tokens_in,
            "output_tokens": tokens_out,
            "cost_paid_usd": sum(r.cost_usd for r in calls),
            # what 1,000 such states cost at list price, whatever the cache saved this time
            "cost_per_1000_states_usd": client.cost(tokens_in, tokens_out) / max(1, len(states)) * 1000,
            "retries": retries,
            "errors": errors,
            **counts.as_metrics(),
            "wait_s": writer.wait_s,
        }
        with_hint = [i for i, h in enumerate(hints) if h is not None]
        for i, hint in enumerate(hints):
            rows[i]["hints"][name] = hint
        if measure_help:
            hinted = pass_rates(
                sampler,
                tokenizer,
                [hinted_prompt_ids(tokenizer, states[i].request.task, hints[i], max_prompt_length) for i in with_hint],
                [states[i].request.task for i in with_hint],
                k=k,
                seed=seed,
                score_many=score_many,
                max_completion_length=max_completion_length,
                temperature=temperature,
                stop_token_ids=stop_token_ids,
            )
            for i, rate in zip(with_hint, hinted, strict=True):
                rows[i].setdefault("hinted_pass_rate", {})[name] = rate
            gain, error = paired_gain(hinted, [plain[i] for i in with_hint])
            result |= {
                "states_with_hint": len(with_hint),
                "hinted_pass_rate": sum(hinted) / len(hinted) if hinted else None,
                "unhinted_pass_rate": sum(plain[i] for i in with_hint) / len(with_hint) if with_hint else None,
                "hint_gain": gain,
                "hint_gain_se": error,
            }
        else:
            result |= {"states_with_hint": len(with_hint), "hinted_pass_rate": None, "unhinted_pass_rate": None}
        results.append(result)
    return {
        "states": len(states),
        "samples_per_state": k if measure_help else None,
        "hint_prompt": hint_messages(states[0].request)[0]["content"] if states else None,
        "teachers": results,
        "rows": rows,
    }


def _cell(value: Any, fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: the table, what each column means, then every state's hints."""
    n = report["states"]
    lines = [
        "# Teacher cost floor",
        "",
        f"{n} real states (tasks the policy failed) x {len(report['teachers'])} teachers"
        + (
            f"; the policy samples each state {report['samples_per_state']} times per context."
            if report["samples_per_state"]
            else "."
        ),
        "",
        "| teacher | model | latency p50 / p95 / max (s) | tokens in / out per state | paid (USD) "
        "| USD per 1,000 states | hints used / leaked / late / failed | retries | errors "
        "| pass rate: hinted vs unhinted (gain ± se) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in report["teachers"]:
        latency = " / ".join(_cell(t[k], "{:.2f}") for k in ("latency_p50_s", "latency_p95_s", "latency_max_s"))
        help_cell = "not measured"
        if t.get("hinted_pass_rate") is not None:
            gain = _cell(t.get("hint_gain"), "{:+.3f}") + (
                f" ± {t['hint_gain_se']:.3f}" if t.get("hint_gain_se") is not None else ""
            )
            help_cell = (
                f"{t['hinted_pass_rate']:.3f} vs {t['unhinted_pass_rate']:.3f} ({gain}, {t['states_with_hint']} states)"
            )
        elif t["states_with_hint"] == 0:
            help_cell = "no hint used"
        lines.append(
            f"| {t['name']} | {t['model']} | {latency} | {t['input_tokens'] / max(1, n):.0f} / "
            f"{t['output_tokens'] / max(1, n):.0f} | {t['cost_paid_usd']:.6f} | {t['cost_per_1000_states_usd']:.4f} | "
            f"{t['hints_written']} / {t['hints_leaked']} / {t['hints_late']} / {t['hints_failed']} | "
            f"{_kinds(t['retries'])} | {_kinds(t['errors'])} | {help_cell} |"
        )
    lines += [
        "",
        "Latency is over the calls sent (cache hits are not timed; `cache_hits` in the JSON), retries "
        "included. USD per 1,000 states is the tokens of these hints at the teacher's list prices "
        "(`price_in_per_mtok`, `price_out_per_mtok`), whatever the cache saved. A hint that states the "
        "task's answer is refused (leaked); one not back within the teacher's `timeout_s` is late.",
        "",
        "## The states and their hints",
        "",
    ]
    for i, row in enumerate(report["rows"], start=1):
        lines.append(
            f"{i}. **{_one_line(row['task'])}** attempt: `{_one_line(row['attempt']) or '(empty)'}`; "
            f"feedback: {_one_line(row['feedback'])}"
        )
        for name, hint in row["hints"].items():
            rate = (row.get("hinted_pass_rate") or {}).get(name)
            said = f" (pass rate {rate:.2f} vs {row['unhinted_pass_rate']:.2f})" if rate is not None else ""
            lines.append(f"   - {name}: {_one_line(hint) if hint else '(none)'}{said}")
    return "\n".join(lines) + "\n"


def _one_line(text: str | None, limit: int = 160) -> str:
    text = " ".join((text or "").split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """cost_floor.json (the report), cost_floor.md (`report_markdown`) and cost_floor.png (latency,
    cost per 1,000 states, pass rates) under `out`, each written atomically; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "cost_floor.json", out / "cost_floor.md", out / "cost_floor.png"]
    atomic_write(paths[0], strict_json(report, indent=2))
    atomic_write(paths[1], report_markdown(report))
    teachers = report["teachers"]
    names = [t["name"] for t in teachers]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = range(len(names))
    for offset, key, label in (
        (-0.25, "latency_p50_s", "p50"),
        (0.0, "latency_p95_s", "p95"),
        (0.25, "latency_max_s", "max"),
    ):
        axes[0].bar([i + offset for i in x], [t[key] or 0 for t in teachers], width=0.25, label=label)
    axes[0].set(title="latency per hint (s)", xticks=list(x), xticklabels=names)
    axes[0].legend()
    axes[1].bar(list(x), [t["cost_per_1000_states_usd"] for t in teachers], color="tab:green")
    axes[1].set(title="USD per 1,000 states (list prices)", xticks=list(x), xticklabels=names)
    hinted = [t.get("hinted_pass_rate") or 0 for t in teachers]
    plain = [t.get("unhinted_pass_rate") or 0 for t in teachers]
    axes[2].bar([i - 0.2 for i in x], plain, width=0.4, label="no hint")
    axes[2].bar([i + 0.2 for i in x], hinted, width=0.4, label="teacher's hint")
    axes[2].set(title="policy pass rate on the states with a hint", xticks=list(x), xticklabels=names, ylim=(0, 1))
    axes[2].legend()
    fig.suptitle(f"teacher cost floor: {report['states']} states x {len(names)} teachers")
    fig.tight_layout()
    atomic_write(paths[2], lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return paths
