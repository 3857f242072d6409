"""Preference pairs (and per-example rewards) from ingested traces.

Two kinds of pairs, both with the same prompt on each side, as DPO needs:
- outcome pairs: two attempts at the same task (`outcome["instance_id"]`/`"task_id"`), one
  resolved and one not; the prompt is what they share up to the first assistant turn.
- fork pairs: two branches of one session that share a prefix and then differ in the
  assistant's turn; the rejected side is the one the user refused a tool call in or
  interrupted; if neither was, the branch the user rewound away from (the older one).
A response runs from the divergence to the next user message.

Signals that do not pair up (a refused call, an interruption, a tool error and whether a later
call of the same tool succeeded) become per-example rewards in [-1, 1].
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import combinations

from .schema import INTERRUPTION, REFUSAL, Message, TraceExample

OUTCOME = "outcome"
FORK = "fork"


@dataclass
class PreferencePair:
    id: str  # content hash of prompt, chosen and rejected: a stable cache key
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str  # OUTCOME or FORK
    reason: str
    chosen_example_id: str
    rejected_example_id: str


@dataclass
class ExampleReward:
    example_id: str
    reward: float  # (good - bad) / (good + bad) over the signals below
    signals: dict[str, int] = field(default_factory=dict)


def mine_pairs(examples: Iterable[TraceExample], *, max_pairs_per_task: int = 16) -> PairMiner:
    """Pairs from a stream of examples; `.rewards` and `.skipped` are complete once it is exhausted.

    Fork pairs come out as soon as a session's examples have gone by (the ingester emits a
    session's branches together); outcome pairs come at the end, when every attempt is known.
    """
    return PairMiner(examples, max_pairs_per_task=max_pairs_per_task)


class PairMiner:
    """The iterator `mine_pairs` returns; also counts pairs by source, rewards and why pairs were not made."""

    def __init__(self, examples: Iterable[TraceExample], *, max_pairs_per_task: int) -> None:
        if max_pairs_per_task < 1:
            raise ValueError(f"max_pairs_per_task={max_pairs_per_task} must be >= 1")
        self.max_pairs_per_task = max_pairs_per_task
        self.rewards: dict[str, ExampleReward] = {}
        self.skipped: Counter[str] = Counter()
        self.by_source: Counter[str] = Counter()
        self._pairs = self._mine(examples)

    def __iter__(self) -> PairMiner:
        return self

    def __next__(self) -> PreferencePair:
        pair = next(self._pairs)
        self.by_source[pair.source] += 1
        return pair

    def _mine(self, examples: Iterable[TraceExample]) -> Iterator[PreferencePair]:
        attempts: dict[str, list[TraceExample]] = {}
        session: list[TraceExample] = []
        for example in examples:
            reward = example_reward(example)
            if reward is not None:
                self.rewards[example.id] = reward
            task, resolved = _task_and_verdict(example)
            if task is not None and resolved is not None:
                attempts.setdefault(task, []).append(example)
            if session and (session[0].format, session[0].session_id) != (example.format, example.session_id):
                yield from self._fork_pairs(session)
                session = []
            session.append(example)
        yield from self._fork_pairs(session)
        for task, group in attempts.items():
            yield from self._outcome_pairs(task, group)

    def _fork_pairs(self, session: list[TraceExample]) -> Iterator[PreferencePair]:
        seen: set[str] = set()
        keys = {id(e): [m.key() for m in e.messages] for e in session} if len(session) > 1 else {}
        for first, second in combinations(session, 2):
            shared = _shared_prefix(keys[id(first)], keys[id(second)])
            if shared in (0, len(first.messages), len(second.messages)):
                continue  # separate threads, or one contains the other: no fork between them
            if first.messages[shared].role != "assistant" or second.messages[shared].role != "assistant":
                self.skipped["fork_at_user_turn"] += 1  # the prompts differ: not a preference
                continue
            verdict = _fork_verdict(first, second, shared)
            if verdict is None:
                self.skipped["fork_without_verdict"] += 1
                continue
            chosen, rejected, reason = verdict
            pair = _pair(first.messages[:shared], chosen, rejected, shared, FORK, reason)
            if pair.id not in seen:  # deeper forks repeat the same divergence for every leaf below
                seen.add(pair.id)
                yield pair

    def _outcome_pairs(self, task: str, attempts: list[TraceExample]) -> Iterator[PreferencePair]:
        resolved = [e for e in attempts if _task_and_verdict(e)[1]]
        failed = [e for e in attempts if not _task_and_verdict(e)[1]]
        keys = {id(e): [m.key() for m in e.messages[: _first_assistant(e.messages) or 0]] for e in attempts}
        made = 0
        for good in resolved:
            for bad in failed:
                if made == self.max_pairs_per_task:
                    self.skipped["over_max_pairs_per_task"] += 1
                    continue
                prompt_length = _first_assistant(good.messages)
                if (
                    prompt_length in (None, 0)
                    or prompt_length != _first_assistant(bad.messages)
                    or keys[id(good)] != keys[id(bad)]
                ):
                    self.skipped["outcome_prompt_mismatch"] += 1
                    continue
                made += 1
                yield _pair(
                    good.messages[:prompt_length],
                    good,
                    bad,
                    prompt_length,
                    OUTCOME,
                    f"resolved vs unresolved on {task}",
                    whole=True,
                )


def _task_and_verdict(example: TraceExample) -> tuple[str | None, bool | None]:
    outcome = example.outcome or {}
    task = outcome.get("instance_id") or outcome.get("task_id")
    resolved = outcome.get("resolved")
    return (str(task) if task is not None else None), (resolved if isinstance(resolved, bool) else None)


def _first_assistant(messages: list[Message]) -> int | None:
    return next((i for i, m in enumerate(messages) if m.role == "assistant"), None)


def _shared_prefix(a: list[tuple], b: list[tuple]) -> int:
    """How many leading messages (by `Message.key`) two conversations share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _response_end(messages: list[Message], start: int) -> int:
    """The assistant's turn from `start`: up to (not including) the next user message."""
    return next((i for i in range(start, len(messages)) if messages[i].role == "user"), len(messages))


def _turn_rejection(messages: list[Message], start: int) -> str | None:
    end = _response_end(messages, start)
    if any(m.kind == REFUSAL for m in messages[start:end]):
        return "tool call refused by the user"
    if end < len(messages) and messages[end].kind == INTERRUPTION:
        return "interrupted by the user"
    return None


def _fork_verdict(
    first: TraceExample, second: TraceExample, shared: int
) -> tuple[TraceExample, TraceExample, str] | None:
    first_no = _turn_rejection(first.messages, shared)
    second_no = _turn_rejection(second.messages, shared)
    if first_no and not second_no:
        return second, first, first_no
    if second_no and not first_no:
        return first, second, second_no
    if first_no or second_no:
        return None  # both rejected: no preference between them
    first_at, second_at = first.messages[shared].timestamp, second.messages[shared].timestamp
    if first_at is None or second_at is None or first_at == second_at:
        return None
    older, newer = (first, second) if first_at < second_at else (second, first)
    return newer, older, "rewound by the user and answered again"


def _pair(
    prompt: list[Message],
    chosen: TraceExample,
    rejected: TraceExample,
    shared: int,
    source: str,
    reason: str,
    *,
    whole: bool = False,
) -> PreferencePair:
    def response(example: TraceExample) -> list[Message]:
        end = len(example.messages) if whole else _response_end(example.messages, shared)
        return example.messages[shared:end]

    chosen_messages, rejected_messages = response(chosen), response(rejected)
    digest = hashlib.sha256()
    for part in (prompt, chosen_messages, rejected_messages):
        digest.update(json.dumps([m.key() for m in part], ensure_ascii=False).encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return PreferencePair(
        id=f"pair-{digest.hexdigest()[:20]}",
        prompt=prompt,
        chosen=chosen_messages,
        rejected=rejected_messages,
        source=source,
        reason=reason,
        chosen_example_id=chosen.id,
        rejected_example_id=rejected.id,
    )


def example_reward(example: TraceExample) -> ExampleReward | None:
    """Refusals, interruptions and unfixed tool errors count against; errors fixed later count for."""
    call_names: dict[str, str] = {}
    signals = Counter()
    open_errors: Counter[str] = Counter()  # tool name -> errors not yet followed by a success
    for message in example.messages:
        for call in message.tool_calls:
            call_names[call.id] = call.name
        if message.role == "user" and message.kind == INTERRUPTION:
            signals["interruptions"] += 1
        if message.role != "tool" or message.synthetic:
            continue
        if message.kind == REFUSAL:
            signals["refusals"] += 1
            continue
        name = call_names.get(message.tool_call_id or "", "")
        if message.is_error:
            open_errors[name] += 1
        elif open_errors[name]:
            signals["errors_fixed"] += open_errors.pop(name)
    signals["errors_unfixed"] = sum(open_errors.values())
    signals = Counter({k: v for k, v in signals.items() if v})
    total = sum(signals.values())
    if not total:
        return None
    good = signals["errors_fixed"]
    return ExampleReward(example.id, (2 * good - total) / total, dict(signals))
