"""What people look at: `metrics.jsonl` (one JSON object per line), a per-round table on stdout,
`curves.png` drawn from the JSONL at the end of a run, the same scalars in TensorBoard or W&B
(`MetricsLog`'s sinks), and a static HTML report of one run or a comparison of several.

`SCHEMA` is the one written description of the records: every kind, every field, its unit, and
how it becomes scalars (`record_scalars`), so the sinks, the report and a reader of the file agree.
`python -m trainer.metrics schema` prints it; `unnamed_keys` is how the tests hold the worker to it.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from trainer.checkpoint import strict_json

TABLE_COLUMNS = ("round", "reward", "±σ", "teacher", "grpo", "sdpo", "dpo", "|Δ|", "MB sent", "s")


def set_aside_torn_line(path: Path) -> str | None:
    """Move a last line that a crash cut short (the file does not end in a newline) from `path` to
    `<path>.torn` (appended, with a newline), cutting `path` back to its last whole line; nothing is
    dropped. Returns "line N (B bytes)" of what was moved and warns on stderr, or None when the
    file is absent, empty or ends in a newline. Raises OSError from the reads and writes.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return None
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return None
    keep = data.rfind(b"\n") + 1
    line = data.count(b"\n", 0, keep) + 1
    torn = f"line {line} ({len(data) - keep} bytes)"
    aside = path.with_name(path.name + ".torn")
    with aside.open("ab") as file:
        file.write(data[keep:] + b"\n")
        file.flush()
        os.fsync(file.fileno())
    with path.open("rb+") as file:
        file.truncate(keep)
        os.fsync(file.fileno())
    print(
        f"warning: {path}: its last line, {torn}, was cut short (a crash while writing it); moved to {aside}",
        file=sys.stderr,
    )
    return torn


class MetricsLog:
    """Append-only JSONL; every line is flushed so a killed run keeps what it logged. Lines are strict
    JSON (`trainer.checkpoint.strict_json`): a non-finite value (a NaN or infinite figure) is
    written as null with `<key>_reason` beside it.

    `sinks` (trainer.run.sinks: TensorBoard, W&B) get each record's scalars (`record_scalars`)
    after its line is written, so a sink that fails loses nothing of metrics.jsonl. A sink is any
    object with `scalars(axis, step, values)` (axis "inner" or "outer", values {name: float}) and
    `close(summary)` (summary.json's dict, or None when the run did not finish).

    Opening a file whose last line a crash cut short (no newline at its end) moves that line to
    `<name>.torn` first (`set_aside_torn_line`; `torn` says which line), so the resumed run's
    records start on a line of their own and every line of metrics.jsonl is JSON again.
    """

    def __init__(self, path: Path, sinks: Sequence[Any] = ()) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.torn = set_aside_torn_line(path)
        self._file = path.open("a", encoding="utf-8")
        self.sinks = list(sinks)

    def log(self, event: str, **fields: Any) -> None:
        self._file.write(strict_json({"event": event, **fields}) + "\n")
        self._file.flush()
        scalars = record_scalars(event, fields) if self.sinks else None
        for sink in self.sinks if scalars else ():
            sink.scalars(*scalars)

    def log_curves(self, step: int, records: list[dict[str, Any]]) -> None:
        """To the sinks only: curves.png's values at inner step `step` (`curve_means` of that step's
        records, every rank's), which metrics.jsonl holds as the records themselves."""
        for sink in self.sinks:
            sink.scalars("inner", step, curve_means(records))

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Close the file, then each sink with the run's summary (None: the run did not finish)."""
        if not self._file.closed:
            self._file.close()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(summary)


class Field(NamedTuple):
    """One field of a record kind. kind: how it becomes scalars in the sinks (`record_scalars`):
    index (the record's position: an axis or part of a name, not a scalar), scalar (one number or
    bool; null where not measured), per_rank (a list, one number per global rank: `<name>/rank<i>`),
    per_kind (a mapping of name to number: `<name>/<key>`), per_task (a list in held-out task order,
    not a scalar), text (not a scalar)."""

    kind: str
    unit: str
    text: str


# The records of metrics.jsonl, every field with its unit. A name ending in `/*` stands for a family
# (`tool_calls/read_file`). Units: 1 (a pure number), fraction (0..1), nats, s (seconds, measured
# wall time), bytes, count, bool, hex.
EVENTS = {
    "inner": "one per inner step and global rank, written by the lead at the round's end; sinks: "
    "inner/<field>/rank<rank> against the global inner step",
    "outer": "one per round, after its inner records (the round's last DiLoCo outer step); sinks: "
    "outer/<field> against the outer step",
    "eval": "one per held-out evaluation (before the first round, every eval.every rounds, after the "
    "last); sinks: eval/<field> against the outer step",
    "resume": "one per resume from a checkpoint; sinks: resume/<field> against the outer step",
}
_TIMING = "timing: differs between two runs of one seed"
SCHEMA: dict[str, dict[str, Field]] = {
    "inner": {
        "round": Field("index", "count", "the round (0-based) the step belongs to"),
        "step": Field("index", "count", "global inner step (0-based): the axis of inner scalars"),
        "replica": Field("index", "count", "DiLoCo replica of the rank"),
        "rank": Field("index", "count", "global rank that took the step"),
        "reward": Field(
            "scalar", "fraction", "mean checker reward of the student's samples (episodes: of the episodes)"
        ),
        "teacher_reward": Field(
            "scalar", "fraction", "the same prompts sampled with the hint in context; null: not measured"
        ),
        "solved": Field("scalar", "fraction", "prompts with at least one correct sample"),
        "lr": Field("scalar", "1", "inner AdamW learning rate of the step (optim.warmup_steps, optim.decay)"),
        "tokens_per_s": Field("scalar", "tokens/s", f"completion tokens sampled per second of the step ({_TIMING})"),
        "pairs": Field("scalar", "count", "DPO pairs in the replay store after the step"),
        "pairs_evicted": Field("scalar", "count", "rollout pairs dropped from the store so far (loss.dpo_capacity)"),
        "synced": Field("scalar", "bool", "the step ended with a DiLoCo exchange"),
        "skipped": Field("scalar", "bool", "non-finite loss or gradient: no optimizer step, no teacher update"),
        "generation_s": Field("scalar", "s", f"sampling (student and teacher-reward samples; {_TIMING})"),
        "execution_s": Field("scalar", "s", f"scoring the samples (the sandbox for code; {_TIMING})"),
        "loss_s": Field("scalar", "s", f"loss forwards, backward and optimizer step ({_TIMING})"),
        "engine_weights_equal": Field(
            "scalar",
            "bool",
            "the rollout engine's weights hash-equal the trainer's after the push (debug.check_engine_sync)",
        ),
        "weight_sync_s": Field(
            "scalar", "s", f"pushing the trainer's weights into the rollout engine (0: hf engine; {_TIMING})"
        ),
        "loss_forwards": Field("scalar", "count", "model forwards the loss took this step"),
        "reference_forwards": Field("scalar", "count", "DPO reference forwards so far (each pair scored once)"),
        "ratio_mean": Field("scalar", "1", "mean importance ratio pi / pi_old over completion tokens"),
        "clip_fraction": Field("scalar", "fraction", "completion tokens whose ratio was clipped"),
        "sampler_logp_diff": Field("scalar", "nats", "mean |trainer - sampler| log-prob of the sampled tokens"),
        "mismatch_kl": Field("scalar", "nats", "k3 estimate of KL(sampler || trainer) on the sampled tokens"),
        "capped_fraction": Field(
            "scalar", "fraction", "sampled tokens whose pi_train / pi_sampler exceeds loss.rollout_correction_cap"
        ),
        "loss": Field("scalar", "1", "the composed loss: grpo + alpha * sdpo + beta * dpo"),
        "logits_dtype": Field("text", "1", "dtype of the policy's logits in the loss (bfloat16 under autocast)"),
        "grpo": Field("scalar", "1", "the Dr.GRPO channel (policy-gradient surrogate)"),
        "sdpo": Field("scalar", "nats", "the SDPO channel (generalised JSD to the hinted teacher, per token)"),
        "dpo": Field("scalar", "nats", "the DPO channel (-log sigmoid of the reward margin, mean over pairs)"),
        "dpo_chosen_reward": Field("scalar", "nats", "dpo_beta * log(pi / pi_ref) of the chosen answers"),
        "dpo_rejected_reward": Field("scalar", "nats", "dpo_beta * log(pi / pi_ref) of the rejected answers"),
        "dpo_reward_margin": Field("scalar", "nats", "chosen minus rejected reward (curves.png's DPO panel)"),
        "dpo_reward_accuracy": Field("scalar", "fraction", "pairs whose chosen reward exceeds the rejected one"),
        "episodes": Field("scalar", "count", "agent episodes run this step"),
        "episode_reward": Field("scalar", "fraction", "mean episode reward"),
        "episode_passed": Field("scalar", "fraction", "episodes whose final files pass the task's tests"),
        "episode_turns": Field("scalar", "turns", "mean assistant turns per episode"),
        "episode_tokens": Field("scalar", "tokens", "mean episode length (prompt, samples and observations)"),
        "model_s": Field("scalar", "s", f"seconds in the model over the step's episodes ({_TIMING})"),
        "tools_s": Field("scalar", "s", f"seconds in tools and the final check ({_TIMING})"),
        "error_observations": Field("scalar", "count", "tool calls answered with an error"),
        "tool_calls/*": Field("scalar", "count", "tool calls by tool (trainer.envs.workspace.TOOLS, and invalid)"),
        "errors/*": Field("scalar", "count", "error observations by kind (trainer.envs.workspace.ERROR_KINDS)"),
        # external teachers (trainer.teachers): the calls since the previous step's record, this rank's
        "teacher_calls": Field("scalar", "count", "requests to external teachers (the cache's answers included)"),
        "teacher_cache_hits": Field("scalar", "count", "teacher requests answered from the disk cache (not paid)"),
        "teacher_cache_misses": Field("scalar", "count", "teacher requests sent to an endpoint"),
        "teacher_input_tokens": Field("scalar", "tokens", "prompt tokens of the teachers' answers (usage)"),
        "teacher_output_tokens": Field("scalar", "tokens", "completion tokens of the teachers' answers (usage)"),
        "teacher_cost_usd": Field("scalar", "USD", "paid for the sent requests: tokens x teachers[i].price_*_per_mtok"),
        "teacher_latency_p50_s": Field(
            "scalar", "s", f"median latency of answered sent requests, retries in ({_TIMING})"
        ),
        "teacher_latency_max_s": Field("scalar", "s", f"slowest answered sent request ({_TIMING})"),
        "teacher_retries/*": Field("scalar", "count", "teacher retries by the error that caused them"),
        "teacher_errors/*": Field("scalar", "count", "teacher requests that failed for good, by the final error"),
        "teacher_wait_s": Field("scalar", "s", f"the step waited on teachers, <= timeout_s a batch ({_TIMING})"),
        "hints_written": Field("scalar", "count", "teacher hints used as the SDPO teacher's context"),
        "hints_leaked": Field("scalar", "count", "teacher hints refused: they state the task's answer"),
        "hints_late": Field("scalar", "count", "teacher hints not there by the deadline: that sample got none"),
        "hints_failed": Field("scalar", "count", "teacher hint requests that failed after retries, or came back blank"),
        "teacher_pairs": Field("scalar", "count", "DPO pairs from teacher solutions the checker passed"),
        "teacher_pairs_failed": Field("scalar", "count", "teacher solutions the checker failed (never used)"),
        "teacher_pairs_late": Field("scalar", "count", "teacher solutions not there by the deadline"),
        "teacher_pairs_errors": Field("scalar", "count", "teacher solution requests that failed, or did not render"),
        "endpoint_scored": Field("scalar", "count", "samples the endpoint teacher scored for SDPO"),
        "endpoint_missing": Field("scalar", "count", "samples it could not score in time (no distillation)"),
    },
    "outer": {
        "outer_step": Field("index", "count", "DiLoCo outer steps taken (1-based): the axis of outer scalars"),
        "round": Field("index", "count", "the round (0-based)"),
        "first_outer_step": Field(
            "scalar", "count", "the round's first outer step (one per fragment under Streaming DiLoCo)"
        ),
        "pseudo_grad_norm": Field("scalar", "1", "L2 norm of the last averaged pseudo-gradient"),
        "participants": Field("scalar", "count", "replicas in the last exchange"),
        "bytes_sent": Field("scalar", "bytes", "sent by all ranks' exchanges so far (cumulative, kept across resumes)"),
        "bytes_received": Field("scalar", "bytes", "received by all ranks' exchanges so far (cumulative)"),
        "bytes_sent_per_rank": Field("per_rank", "bytes", "sent by each rank so far (cumulative)"),
        "compute_s": Field("per_rank", "s", f"each rank's round outside DiLoCo's exchanges ({_TIMING})"),
        "communication_s": Field("per_rank", "s", f"each rank's round blocked in the exchanges ({_TIMING})"),
        "replicas": Field("scalar", "count", "DiLoCo replicas of the run"),
        "param_hash": Field("text", "hex", "SHA-256 of replica 0's parameters after the round"),
        "replica_hashes": Field("text", "hex", "the same for each replica (equal unless Streaming DiLoCo mixes)"),
        "rank_hashes": Field("text", "hex", "the same for each global rank"),
        # diloco.elastic only (docs/elastic.md): who took part, who came and went
        "participant_ids": Field("text", "count", "elastic: the replicas whose pseudo-gradients were averaged"),
        "joined": Field("text", "count", "elastic: participants of this outer step that were not in the previous one"),
        "left": Field("text", "count", "elastic: participants of the previous outer step that are not in this one"),
        "healed": Field("text", "count", "elastic: replicas given the previous outer step's global state by a peer"),
        "excluded": Field("text", "count", "elastic: registered to train, not averaged (stale, forked or late)"),
        "joined_count": Field("scalar", "count", "elastic: len(joined)"),
        "left_count": Field("scalar", "count", "elastic: len(left)"),
        "healed_count": Field("scalar", "count", "elastic: len(healed)"),
        "quorum_attempts": Field("scalar", "count", "elastic: quorum attempts the boundary took (1: no abort)"),
        "quorum_wait_s": Field("scalar", "s", f"elastic: the books holder's wait for the quorum's seal ({_TIMING})"),
        "transfer_s": Field("scalar", "s", f"elastic: the donor sending the global state to joiners ({_TIMING})"),
    },
    "eval": {
        "outer_step": Field("index", "count", "outer steps taken when evaluated: the axis"),
        "round": Field("index", "count", "rounds done when evaluated"),
        "pass_at_1": Field("scalar", "fraction", "held-out tasks whose greedy answer is correct"),
        "pass_at_k": Field("scalar", "fraction", "held-out tasks with a correct answer among eval.k samples"),
        "sampled_reward": Field("scalar", "fraction", "correct samples among all eval.k samples of all tasks"),
        "size": Field("scalar", "count", "held-out tasks evaluated"),
        "k": Field("scalar", "count", "samples per task (eval.k)"),
        "greedy_correct": Field("per_task", "bool", "each task's greedy outcome (the paired rises)"),
        "sampled_correct": Field("per_task", "count", "each task's correct samples out of k"),
        "student_logp": Field("scalar", "nats", "mean per-token log-prob of correct completions, no hint"),
        "teacher_logp": Field(
            "per_kind",
            "nats",
            "the same with each hint kind in context (the teacher gate; teacher:<name>: that teacher's hints; "
            "under loss.teacher endpoint:<name>, that model's log-probs; null: not scored)",
        ),
    },
    "resume": {
        "outer_step": Field("index", "count", "the checkpoint's outer step the run resumed from"),
        "round": Field("index", "count", "the round it resumed at"),
        "world_size": Field("scalar", "count", "processes of the resumed run"),
        "replica": Field("index", "count", "elastic: the replica that resumed from its own files"),
    },
}
# inner fields summary.json sums over the run when its teachers logged them
TEACHER_TOTALS = (
    "teacher_calls",
    "teacher_cache_hits",
    "teacher_cost_usd",
    "hints_written",
    "hints_leaked",
    "hints_late",
    "teacher_pairs",
    "teacher_pairs_failed",
    "endpoint_scored",
    "endpoint_missing",
)
AXES = {"inner": "step", "outer": "outer_step", "eval": "outer_step", "resume": "outer_step"}
# curves.png's per-inner-step lines (mean over ranks); the sinks carry them as curves/<key>.
CURVE_KEYS = ("reward", "teacher_reward", "grpo", "sdpo", "dpo", "loss", "dpo_reward_margin")


def field_of(event: str, key: str) -> Field | None:
    """The schema's entry for `key` of an `event` record (families `name/*` included), or None."""
    fields = SCHEMA.get(event, {})
    if key in fields:
        return fields[key]
    family, _, member = key.rpartition("/")
    return fields.get(f"{family}/*") if family and member else None


def unnamed_keys(records: list[dict[str, Any]]) -> list[str]:
    """Every `event.key` in `records` that SCHEMA does not name (an unknown event as `event.*`): []
    when the file is fully described."""
    said = set()
    for record in records:
        event = record.get("event")
        if event not in SCHEMA:
            said.add(f"{event}.*")
            continue
        said |= {f"{event}.{key}" for key in record if key != "event" and field_of(event, key) is None}
    return sorted(said)


def schema_text() -> str:
    """SCHEMA as `python -m trainer.metrics schema` prints it: each kind, then its fields' kind,
    unit and meaning."""
    lines = []
    for event, fields in SCHEMA.items():
        lines.append(f"{event}: {EVENTS[event]}")
        lines += [f"  {name:<22} {f.kind:<9} {f.unit:<9} {f.text}" for name, f in fields.items()]
        lines.append("")
    lines.append("curves/<key> (sinks only, against the inner step): the mean over ranks of one inner step's")
    lines.append(f"  {', '.join(CURVE_KEYS)}: curves.png's lines")
    lines.append("outer/utilisation (sinks only): sum of compute_s / sum of (compute_s + communication_s), fraction")
    return "\n".join(lines)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None  # bools are ints: 1.0 / 0.0


def record_scalars(event: str, fields: dict[str, Any]) -> tuple[str, int, dict[str, float]] | None:
    """(axis, step, {name: value}) of one record for the sinks; None for a kind SCHEMA does not know.

    axis is "inner" (the global inner step) or "outer" (the outer step). Names: inner records
    `inner/<field>/rank<rank>`, the others `<event>/<field>`; per_rank fields add `/rank<i>`,
    per_kind fields `/<key>`; index, per_task and text fields are no scalars; null values are left
    out; bools are 1.0 / 0.0; fields SCHEMA does not name pass as scalars when they are numbers. The
    outer record adds outer/utilisation (compute over compute + communication, all ranks).
    """
    if event not in AXES or AXES[event] not in fields:
        return None
    suffix = f"/rank{fields['rank']}" if event == "inner" else ""
    values: dict[str, float] = {}
    for key, value in fields.items():
        kind = (field_of(event, key) or Field("scalar", "", "")).kind
        name = f"{event}/{key}"
        if kind == "scalar" and _number(value) is not None:
            values[name + suffix] = _number(value)
        elif kind == "per_rank" and isinstance(value, list):
            values |= {f"{name}/rank{i}{suffix}": _number(v) for i, v in enumerate(value) if _number(v) is not None}
        elif kind == "per_kind" and isinstance(value, dict):
            values |= {f"{name}/{k}{suffix}": _number(v) for k, v in value.items() if _number(v) is not None}
    if event == "outer" and "compute_s" in fields and "communication_s" in fields:
        compute, wall = sum(fields["compute_s"]), sum(fields["compute_s"]) + sum(fields["communication_s"])
        if wall > 0:
            values["outer/utilisation"] = compute / wall
    return ("inner" if event == "inner" else "outer"), int(fields[AXES[event]]), values


def curve_means(records: list[dict[str, Any]]) -> dict[str, float]:
    """curves.png's values at one inner step: for each of CURVE_KEYS, the mean over `records` (that
    step's, every rank's) of the values that were measured (null and absent left out), as
    `curves/<key>`; a key no record measured is absent."""
    means = {}
    for key in CURVE_KEYS:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            means[f"curves/{key}"] = sum(values) / len(values)
    return means


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


def read_metrics(path: Path, broken: list[str] | None = None) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, in file order. A line that is not a JSON object raises
    ValueError naming the file and line; given a `broken` list, it is skipped and said there instead
    (`line N: reason`), as the report does for a killed run's half-written last line."""
    records = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                reason = None if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
            except json.JSONDecodeError as error:
                reason = f"not JSON (column {error.colno}: {error.msg})"
            if reason is None:
                records.append(record)
            elif broken is None:
                raise ValueError(f"{path}:{number}: {reason}")
            else:
                broken.append(f"line {number}: {reason}")
    return records


def latest_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inner, eval) records with a resumed run's repeats removed: the last line for a position wins.

    A crash between a round's metrics and its checkpoint makes the resumed run log that round
    again; keying inner records by (step, rank) and eval records by outer step keeps one of each.
    """
    inner = {(r["step"], r.get("rank", r.get("replica"))): r for r in records if r.get("event") == "inner"}
    evals = {r["outer_step"]: r for r in records if r.get("event") == "eval"}
    return [inner[k] for k in sorted(inner)], [evals[k] for k in sorted(evals)]


def run_summary(path: Path, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The end-of-run figures, from the whole metrics file (every round, across resumes), or from its
    `records` already read.

    reward_first/last/rise/rise_sigmas (`reward_rise` over the rounds), skipped_steps (inner steps
    at which some replica took no optimizer step; skipped_replica_steps counts each replica),
    eval_* (held-out pass@1 and pass@k at the first and last evaluation, when there were any;
    pass@1's paired rise over the greedy episodes, and sampled_reward's, the pass rate of the k
    sampled episodes per task, with `paired_mean_rise`).
    """
    inner, evals = latest_records(read_metrics(path) if records is None else records)
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
    for key in TEACHER_TOTALS:  # the run's external teachers, all ranks, every step
        if any(key in r for r in inner):
            summary[key] = sum(r.get(key) or 0 for r in inner)
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
    draw_curves(read_metrics(metrics_path), png_path)


def draw_curves(records: list[dict[str, Any]], png_path: Path) -> None:
    """`plot_curves` from records already read; the per-step lines are `curve_means`, the values the
    sinks carry as curves/<key>."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inner, evals = latest_records(records)
    outer = [r for r in records if r["event"] == "outer"]
    margin = any("dpo_reward_margin" in r for r in inner)  # issue 15: the DPO channel's signal
    fig, axes = plt.subplots(1, 5 if margin else 4, figsize=(25 if margin else 20, 4))
    by_step: dict[int, list[dict]] = {}
    for r in inner:
        by_step.setdefault(r["step"], []).append(r)
    steps = sorted(by_step)
    means = [curve_means(by_step[s]) for s in steps]

    def value(r: dict, key: str) -> float:
        """A value written as null for being non-finite (null with a reason) is a gap; other nulls 0."""
        return math.nan if r[key] is None and f"{key}_reason" in r else r[key] or 0.0

    def mean_of(key: str) -> list[float]:
        return [m.get(f"curves/{key}", float("nan")) for m in means]

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
        margins = mean_of("dpo_reward_margin")
        axes[4].plot(steps, margins, alpha=0.4, label="per step")
        window = max(1, len(steps) // 8)
        smooth = []
        for i in range(len(margins)):
            measured = [m for m in margins[max(0, i - window + 1) : i + 1] if not math.isnan(m)]
            smooth.append(sum(measured) / len(measured) if measured else float("nan"))
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
    {
        "tokens_per_s",
        "generation_s",
        "execution_s",
        "loss_s",
        "weight_sync_s",
        "compute_s",
        "communication_s",
        "model_s",
        "tools_s",
    }
)


def metrics_file(path: Path) -> Path:
    """The metrics.jsonl that `path` names: the file itself, or the one in a run directory.

    Raises FileNotFoundError naming the path when there is none.
    """
    found = path / "metrics.jsonl" if path.is_dir() else path
    if not found.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (give a run directory or its metrics.jsonl)")
    return found


def run_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a run computed, once per position: `resume` markers dropped, and a record a resumed run
    logged again (the replayed round after a crash) replacing the earlier one in its place.

    A position is (event, step, outer_step, rank, replica): each inner record per process, each
    outer step's books, each evaluation. So a run interrupted and resumed reads like the same run
    uninterrupted, which is how `trainer.metrics compare` proves a resume bit-exact.
    """
    latest: dict[tuple, dict[str, Any]] = {}
    for record in records:
        if record.get("event") != "resume":
            position = tuple(record.get(k) for k in ("event", "step", "outer_step", "rank", "replica"))
            latest[position] = record
    return list(latest.values())


def compare_metrics(a: Path, b: Path, *, ignore: frozenset[str] = TIMING_KEYS) -> list[str]:
    """Every difference between two runs' metrics.jsonl, timings aside; [] when they computed the same.

    The runs' `run_records` (resumes and their replayed records folded in) are compared in order,
    values exactly (a refactor must not move a float by an ulp). Returns one line per difference,
    naming the record (its number among the compared records) and key. Raises ValueError naming
    the file and line of a line that is not JSON.
    """
    left, right = run_records(read_metrics(a)), run_records(read_metrics(b))
    differences = [f"record count: {a}: {len(left)}, {b}: {len(right)}"] if len(left) != len(right) else []
    for line, (x, y) in enumerate(zip(left, right, strict=False), start=1):
        for key in sorted((set(x) | set(y)) - ignore):
            if x.get(key, "<absent>") != y.get(key, "<absent>"):
                differences.append(
                    f"record {line} ({x.get('event')}): {key}: {x.get(key, '<absent>')!r} != {y.get(key, '<absent>')!r}"
                )
    return differences


# ----------------------------------------------------------------------------- the report


class RunFiles(NamedTuple):
    """What the report reads of one run directory."""

    path: Path
    label: str
    records: list[dict[str, Any]]
    broken: list[str]  # metrics.jsonl lines not read, `line N: reason`
    config: dict[str, Any]  # config.json; {} when absent
    summary: dict[str, Any]  # summary.json; else run_summary's figures with status "unfinished"


def read_run(path: Path, label: str) -> RunFiles:
    """One run directory for the report; ValueError naming the directory when it has no metrics.jsonl.
    A run without summary.json (killed, or still running) is reported as unfinished, its figures
    computed from metrics.jsonl as `finish` would have."""
    if not (path / "metrics.jsonl").is_file():
        raise ValueError(f"{path}: no metrics.jsonl; pass run directories (runs/<name>)")
    broken: list[str] = []
    records = read_metrics(path / "metrics.jsonl", broken)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
    else:
        reason = "no summary.json: the run has not finished"
        summary = {"status": "unfinished", "reason": reason, **run_summary(path, records)}
    return RunFiles(path, label, records, broken, config, summary)


def run_labels(paths: list[Path]) -> list[str]:
    """Short distinct names: each directory's name, with its parent's where two names are the same,
    and a number where even that is the same."""
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted key -> its value as JSON text (`loss.alpha` -> `0.5`), sections flattened."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _table(table_id: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _first_last(summary: dict[str, Any], key: str) -> str | None:
    if f"{key}_first" not in summary:
        return None
    first, last = summary[f"{key}_first"], summary[f"{key}_last"]
    return f"{first:.3f} → {last:.3f}" if first is not None and last is not None else None


def _rise(summary: dict[str, Any], key: str) -> str | None:
    rise, sigmas = summary.get(key), summary.get(f"{key}_sigmas")
    if rise is None:
        return None
    return f"{rise:+.4f} ({sigmas:.1f} σ)" if sigmas is not None and not math.isnan(sigmas) else f"{rise:+.4f}"


def traffic(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's DiLoCo traffic and timing from its outer records (a resumed round counted once):
    outer steps, rounds, bytes sent and received (the counters are cumulative: the last record's),
    the participants seen (min-max), compute and communication seconds summed over ranks and
    rounds, and utilisation = compute / (compute + communication)."""
    outer = sorted({r["outer_step"]: r for r in records if r.get("event") == "outer"}.items())
    outer = [r for _, r in outer]
    compute = sum(sum(r.get("compute_s", [])) for r in outer)
    communication = sum(sum(r.get("communication_s", [])) for r in outer)
    participants = sorted({r["participants"] for r in outer if r.get("participants") is not None})
    return dict(
        outer_steps=outer[-1]["outer_step"] if outer else 0,
        rounds=len(outer),
        bytes_sent=outer[-1].get("bytes_sent", 0) if outer else 0,
        bytes_received=outer[-1].get("bytes_received", 0) if outer else 0,
        participants="–".join(map(str, participants[:: max(1, len(participants) - 1)])) if participants else None,
        compute_s=compute,
        communication_s=communication,
        utilisation=compute / (compute + communication) if compute + communication > 0 else None,
    )


def bytes_per_round(records: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(outer steps, bytes all ranks sent in the round that ended there): the cumulative counter's steps."""
    outer = sorted({r["outer_step"]: r for r in records if r.get("event") == "outer"}.items())
    sent = [r.get("bytes_sent", 0) for _, r in outer]
    return [step for step, _ in outer], [b - a for a, b in zip([0, *sent], sent, strict=False)]


def _plot_runs(runs: list[RunFiles], png_path: Path, panels: list[tuple[str, str, str, Any]]) -> None:
    """One panel per (title, x label, y label, series) where series(run) -> (xs, ys); a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (title, xlabel, ylabel, series) in zip(axes, panels, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
        for run in runs:
            xs, ys = series(run)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=run.label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def _by_step(run: RunFiles, key: str) -> tuple[list[int], list[float]]:
    inner, _ = latest_records(run.records)
    steps: dict[int, list[dict]] = {}
    for r in inner:
        steps.setdefault(r["step"], []).append(r)
    xs = sorted(steps)
    return xs, [curve_means(steps[s]).get(f"curves/{key}", float("nan")) for s in xs]


def _by_outer(run: RunFiles, event: str, value: Any) -> tuple[list[int], list[float]]:
    records = {r["outer_step"]: r for r in run.records if r.get("event") == event}
    xs = sorted(records)
    return xs, [value(records[x]) for x in xs]


def _megabytes(series: tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
    return series[0], [b / 1e6 for b in series[1]]


def _utilisation(record: dict[str, Any]) -> float:
    scalars = record_scalars("outer", record)
    return scalars[2].get("outer/utilisation", float("nan")) if scalars else float("nan")


REPORT_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; text-align: left; } td { font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 8px 0; } .bad { color: #b00020; }
.note { color: #666; }
"""


def write_report(paths: list[Path], out: Path) -> Path:
    """One static page, out/index.html, and its PNGs, for one run or a comparison of several: the
    verdict of each, the curves (each run's curves.png panels, and an overlay of the runs), the
    held-out evaluations, DiLoCo traffic and timing, and the config (for several runs: the keys
    whose values differ). Reads each run's metrics.jsonl, summary.json and config.json only; needs
    no server. Returns the page's path; ValueError names a directory that is not a run's."""
    runs = [read_run(path, label) for path, label in zip(paths, run_labels(paths), strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    title = f"Run {runs[0].label}" if len(runs) == 1 else f"{len(runs)} runs: {', '.join(r.label for r in runs)}"
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts.append(
        "<p class=note>"
        + "<br>".join(f"{html.escape(r.label)}: {html.escape(str(r.path.resolve()))}" for r in runs)
        + "</p>"
    )
    for run in runs:
        if run.broken:
            said = "; ".join(run.broken[:5]) + (f"; and {len(run.broken) - 5} more" if len(run.broken) > 5 else "")
            parts.append(
                f"<p class=bad>{html.escape(run.label)}: metrics.jsonl lines not read: {html.escape(said)}</p>"
            )

    parts.append("<h2>Verdict</h2>")
    rows = []
    for run in runs:
        s = run.summary
        rows.append(
            [run.label, s.get("status"), s.get("reason") or None, s.get("outer_steps"), s.get("replicas")]
            + [_first_last(s, "reward"), _rise(s, "reward_rise"), _first_last(s, "eval_pass_at_1")]
            + [_rise(s, "eval_pass_at_1_rise"), _first_last(s, "eval_pass_at_k"), _first_last(s, "eval_sampled_reward")]
            + [s.get("skipped_steps"), s.get("replicas_agree")]
        )
    header = ["run", "status", "reason", "outer steps", "replicas", "reward first → last", "reward rise"]
    header += ["held-out pass@1", "pass@1 rise (paired)", "pass@k", "sampled pass rate", "skipped steps"]
    parts.append(_table("verdict", [*header, "replicas agree"], rows))

    parts.append("<h2>Curves</h2>")
    if len(runs) > 1:
        _plot_runs(
            runs,
            out / "comparison.png",
            [
                ("sampled reward (mean over ranks)", "inner step", "fraction", lambda r: _by_step(r, "reward")),
                ("loss", "inner step", "", lambda r: _by_step(r, "loss")),
                (
                    "pseudo-gradient norm",
                    "outer step",
                    "",
                    lambda r: _by_outer(r, "outer", lambda x: x["pseudo_grad_norm"]),
                ),
                ("held-out pass@1", "outer step", "fraction", lambda r: _by_outer(r, "eval", lambda x: x["pass_at_1"])),
            ],
        )
        parts.append('<img src="comparison.png" alt="the runs overlaid">')
    for i, run in enumerate(runs, start=1):
        draw_curves(run.records, out / f"curves-{i}.png")
        parts.append(
            f'<h3>{html.escape(run.label)}</h3><img src="curves-{i}.png" alt="curves of {html.escape(run.label)}">'
        )

    parts.append("<h2>Held-out evaluation</h2>")
    rows = []
    for run in runs:
        for r in latest_records(run.records)[1]:
            rows.append([run.label, r["outer_step"], r.get("round"), r["pass_at_1"], r["pass_at_k"]])
            rows[-1] += [r.get("sampled_reward"), r.get("size"), r.get("k")]
    header = ["run", "outer step", "rounds done", "pass@1", "pass@k", "sampled pass rate", "tasks", "k"]
    parts.append(_table("eval", header, rows) if rows else "<p class=note>No held-out evaluation (eval.every 0).</p>")

    parts.append("<h2>DiLoCo traffic and timing</h2>")
    rows = []
    for run in runs:
        t = traffic(run.records)
        per_step = t["bytes_sent"] / t["rounds"] / 1e6 if t["rounds"] else None
        rows.append([run.label, t["outer_steps"], t["bytes_sent"] / 1e6, per_step, t["bytes_received"] / 1e6])
        rows[-1] += [t["participants"], t["compute_s"], t["communication_s"], t["utilisation"]]
    header = ["run", "outer steps", "MB sent", "MB sent / round", "MB received", "participants"]
    parts.append(_table("traffic", [*header, "compute s", "communication s", "utilisation"], rows))
    _plot_runs(
        runs,
        out / "traffic.png",
        [
            (
                "MB sent per round (all ranks)",
                "outer step",
                "MB",
                lambda r: _megabytes(bytes_per_round(r.records)),
            ),
            (
                "utilisation: compute / (compute + communication)",
                "outer step",
                "fraction",
                lambda r: _by_outer(r, "outer", _utilisation),
            ),
        ],
    )
    parts.append('<img src="traffic.png" alt="traffic and utilisation per outer step">')
    parts.append(
        "<p class=note>Seconds are summed over ranks and rounds: compute is a rank's round outside DiLoCo's "
        "exchanges, communication the time it was blocked in them.</p>"
    )

    parts.append("<h2>Config</h2>")
    flats = [flat_config(run.config) for run in runs]
    keys = sorted(set().union(*flats))
    if len(runs) == 1:
        rows = [[key, flats[0][key]] for key in keys]
        table = _table("config", ["key", runs[0].label], rows)
        parts.append(f"<details><summary>all {len(rows)} keys</summary>{table}</details>")
    else:
        differ = [key for key in keys if len({f.get(key, "(absent)") for f in flats}) > 1]
        rows = [[key, *(f.get(key, "(absent)") for f in flats)] for key in differ]
        parts.append(
            f"<p class=note>{len(differ)} keys differ; {len(keys) - len(differ)} are the same in every run.</p>"
        )
        parts.append(_table("config", ["key", *(r.label for r in runs)], rows))

    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{REPORT_STYLE}</style></head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.metrics compare A B` (exit 0 when two runs logged the same numbers),
    `schema` (every record kind and field with its unit), `report RUN_DIR [RUN_DIR ...] --out DIR`
    (a static HTML page of one run or a comparison; exit 2 naming a directory that is not a run's)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.metrics")
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="diff two runs' metrics.jsonl (run dirs or files), timings aside")
    compare.add_argument("a", type=Path)
    compare.add_argument("b", type=Path)
    sub.add_parser("schema", help="every record kind of metrics.jsonl and its fields, with units")
    report = sub.add_parser("report", help="a static HTML page (and PNGs) of one run or a comparison of runs")
    report.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", type=Path, required=True, metavar="DIR", help="where index.html and its PNGs go")
    args = parser.parse_args(argv)
    if args.command == "schema":
        print(schema_text())
        return 0
    if args.command == "report":
        try:
            index = write_report(args.runs, args.out)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"{index} ({len(args.runs)} run{'s' if len(args.runs) > 1 else ''}; open it in a browser)")
        return 0
    try:
        a, b = (metrics_file(path) for path in (args.a, args.b))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        differences = compare_metrics(a, b)
    except ValueError as error:  # a line that is not JSON, named by file and line
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in differences[:50]:
        print(line)
    records = run_records(read_metrics(a))
    keys = len({key for r in records for key in r} - TIMING_KEYS)
    print(
        f"{len(records)} records, {keys} keys compared (ignored: {', '.join(sorted(TIMING_KEYS))}): "
        f"{len(differences)} difference{'' if len(differences) == 1 else 's'}"
    )
    return 1 if differences else 0


if __name__ == "__main__":
    raise SystemExit(main())
