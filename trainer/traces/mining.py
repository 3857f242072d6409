"""Preference pairs (and per-example rewards) from ingested traces.

Three kinds of pairs, all with the same prompt on each side, as DPO needs:
- outcome pairs: two attempts at the same task (`outcome["instance_id"]`/`"task_id"`), one
  resolved and one not; the prompt is what they share up to the first assistant turn. Pairs
  come out as soon as both sides exist; per task (and prompt) at most `max_pairs_per_task`
  attempts of each verdict are held, compressed, and a task's are freed once its pairs are
  made, so memory follows the number of open tasks, never the number of rows.
- fork pairs: two branches of one session that share a prefix and then differ in the
  assistant's turn; the rejected side is the one the user refused a tool call in, interrupted,
  edited or undid; if neither was, the branch the user rewound away from (the older one).
- self-correction pairs inside one trace: an assistant turn whose tool call failed (an error
  result), then, with no user turn between, a turn calling the same tool differently whose
  results all succeed: (corrected turn, failed turn) after the same prefix.
A response runs from the divergence to the next user message (a self-correction pair: the turn).

Signals that do not pair up (a refused call, an interruption, an undone edit, a tool error and
whether a later call of the same tool succeeded) become per-example rewards in [-1, 1].
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import combinations

from .schema import INTERRUPTION, REFUSAL, UNDONE, USER_EDIT, Message, TraceExample

OUTCOME = "outcome"
FORK = "fork"
SELF_CORRECTION = "self_correction"
PAIR_KINDS = (OUTCOME, FORK, SELF_CORRECTION)


@dataclass
class PreferencePair:
    id: str  # content hash of prompt, chosen and rejected: a stable cache key
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str  # OUTCOME, FORK or SELF_CORRECTION
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
        outcomes = _OutcomePairer(self)
        session: list[TraceExample] = []
        for example in examples:
            reward = example_reward(example)
            if reward is not None:
                self.rewards[example.id] = reward
            yield from self._self_correction_pairs(example)
            yield from outcomes.add(example)
            if session and _thread(session[0]) != _thread(example):
                yield from self._fork_pairs(session)
                session = []
            session.append(example)
        yield from self._fork_pairs(session)
        outcomes.finish()

    def _self_correction_pairs(self, example: TraceExample) -> Iterator[PreferencePair]:
        messages = example.messages

        def results_of(index: int) -> list[Message | None]:
            """The results right after the turn at `index`, by call id (ids may repeat across turns)."""
            end = next((k for k in range(index + 1, len(messages)) if messages[k].role != "tool"), len(messages))
            found = {m.tool_call_id: m for m in messages[index + 1 : end] if not m.synthetic}
            return [found.get(c.id) for c in messages[index].tool_calls]

        for i, failed in enumerate(messages):
            if failed.role != "assistant" or not failed.tool_calls:
                continue
            failed_results = results_of(i)
            if not any(r is not None and r.is_error and r.kind != REFUSAL for r in failed_results):
                continue
            j = next((k for k in range(i + 1, len(messages)) if messages[k].role in ("assistant", "user")), None)
            if j is None or messages[j].role != "assistant" or not messages[j].tool_calls:
                self.skipped["error_without_correction"] += 1
                continue
            fixed = messages[j]
            names = {c.name for c in failed.tool_calls}
            fixed_results = results_of(j)
            if not names & {c.name for c in fixed.tool_calls} or not all(
                r is not None and not r.is_error for r in fixed_results
            ):
                self.skipped["error_without_correction"] += 1
                continue
            if [(c.name, c.arguments) for c in fixed.tool_calls] == [(c.name, c.arguments) for c in failed.tool_calls]:
                self.skipped["retry_of_the_same_call"] += 1  # no difference to prefer
                continue
            yield _turn_pair(messages[:i], example, fixed, failed)

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


class _OutcomePairer:
    """Resolved vs unresolved attempts per (task, prompt), paired as soon as both sides exist."""

    def __init__(self, miner: PairMiner) -> None:
        self.miner = miner
        self.held: dict[tuple[str, str], dict[bool, list[bytes]]] = {}  # compressed attempts by verdict
        self.made: Counter[tuple[str, str]] = Counter()
        self.prompts: dict[str, set[str]] = {}  # task -> prompt digests seen
        self.verdicts: dict[str, set[bool]] = {}  # task -> verdicts seen
        self.done: set[tuple[str, str]] = set()

    def add(self, example: TraceExample) -> Iterator[PreferencePair]:
        task, resolved = _task_and_verdict(example)
        if task is None or resolved is None:
            return
        prompt_length = _first_assistant(example.messages)
        if not prompt_length:
            self.miner.skipped["outcome_without_prompt"] += 1
            return
        digest = _digest(example.messages[:prompt_length])
        self.prompts.setdefault(task, set()).add(digest)
        self.verdicts.setdefault(task, set()).add(resolved)
        key = (task, digest)
        cap = self.miner.max_pairs_per_task
        if key in self.done:
            self.miner.skipped["over_max_pairs_per_task"] += 1
            return
        held = self.held.setdefault(key, {True: [], False: []})
        for packed in held[not resolved]:
            if self.made[key] == cap:
                self.miner.skipped["over_max_pairs_per_task"] += 1
                continue
            other = _unpack(packed)
            good, bad = (example, other) if resolved else (other, example)
            self.made[key] += 1
            yield _pair(
                good.messages[:prompt_length],
                good,
                bad,
                prompt_length,
                OUTCOME,
                f"resolved vs unresolved on {task}",
                whole=True,
            )
        if self.made[key] >= cap:
            self.done.add(key)
            self.held[key] = {True: [], False: []}  # no more pairs from this task: free its attempts
        elif len(held[resolved]) < cap:
            held[resolved].append(_pack(example))

    def finish(self) -> None:
        """Count tasks whose two verdicts never met under one prompt."""
        for task, verdicts in self.verdicts.items():
            if len(verdicts) == 2 and not any(self.made[(task, d)] for d in self.prompts[task]):
                self.miner.skipped["outcome_prompt_mismatch"] += 1
        self.held.clear()


def _pack(example: TraceExample) -> bytes:
    return zlib.compress(pickle.dumps(example, protocol=pickle.HIGHEST_PROTOCOL), 1)


def _unpack(packed: bytes) -> TraceExample:
    return pickle.loads(zlib.decompress(packed))  # only what _pack made in this process


def _digest(messages: list[Message]) -> str:
    return hashlib.sha256(
        json.dumps([m.key() for m in messages], ensure_ascii=False).encode("utf-8", "surrogatepass")
    ).hexdigest()


def _thread(example: TraceExample) -> tuple[str, str]:
    """Examples of one conversation tree (a resumed Claude Code session spans several session ids)."""
    return example.format, str(example.metadata.get("tree_id") or example.session_id)


def _turn_pair(prompt: list[Message], example: TraceExample, chosen: Message, rejected: Message) -> PreferencePair:
    digest = hashlib.sha256()
    for part in (prompt, [chosen], [rejected]):
        digest.update(json.dumps([m.key() for m in part], ensure_ascii=False).encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return PreferencePair(
        id=f"pair-{digest.hexdigest()[:20]}",
        prompt=prompt,
        chosen=[chosen],
        rejected=[rejected],
        source=SELF_CORRECTION,
        reason=f"{rejected.tool_calls[0].name} call failed, then corrected",
        chosen_example_id=example.id,
        rejected_example_id=example.id,
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
    answer = messages[end].kind if end < len(messages) else None
    if any(m.role == "tool" and m.kind == REFUSAL for m in messages[start:end]) or answer == REFUSAL:
        return "tool call refused by the user"
    if answer == INTERRUPTION:
        return "interrupted by the user"
    if any(m.role == "tool" and m.kind == USER_EDIT for m in messages[start:end]) or answer == USER_EDIT:
        return "edited by the user"
    if answer == UNDONE:
        return "edit undone by the user"
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
    """Refusals, interruptions, user edits, undone edits and unfixed tool errors count against; errors
    fixed later count for."""
    call_names: dict[str, str] = {}
    signals = Counter()
    open_errors: Counter[str] = Counter()  # tool name -> errors not yet followed by a success
    for message in example.messages:
        for call in message.tool_calls:
            call_names[call.id] = call.name
        if message.role == "user" and message.kind == INTERRUPTION:
            signals["interruptions"] += 1
        if message.role == "user" and message.kind == UNDONE:
            signals["undone_edits"] += 1
        if message.role in ("user", "tool") and message.kind in (REFUSAL, USER_EDIT):
            signals["refusals" if message.kind == REFUSAL else "user_edits"] += 1
            continue
        if message.role != "tool" or message.synthetic:
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
