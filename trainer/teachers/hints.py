"""Hints written for the mistake: an external teacher reads the task, the student's failed attempt
and the environment's feedback, and writes a short corrective hint that must not state the answer.

Composer 2.5's hint distillation places such a hint where the student went wrong; the SDPO
teacher reads it (`trainer.rollout.single_turn`, `trainer.rollout.episode_batch`). A hint that
contains the task's answer (`leaks_answer`) is refused and counted: distilling from a teacher that
was told the answer teaches the student to copy answers it will not have. One batch of requests
(one step's failed samples) gets the teacher's `timeout_s`, retries included; the samples whose
hint has not come by then get none that step, and the step goes on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.envs import HintRequest
from trainer.teachers.client import Batch, Outcome, TeacherClient

SYSTEM = (
    "You are a teacher. A student attempted a task and failed. Write one short hint, at most two "
    "sentences, that points at the student's mistake so that the student can fix it. Never state the "
    "final answer or the solution itself."
)
ATTEMPT_LIMIT = 2000  # characters of the attempt and of the feedback sent (their ends: errors come last)


def hint_messages(request: HintRequest) -> list[dict[str, str]]:
    """The chat the teacher answers with its hint: the instruction, then the task, the attempt and
    the feedback (each cut to its last ATTEMPT_LIMIT characters)."""
    attempt = _tail(request.attempt.strip()) or "(empty)"
    feedback = _tail(request.feedback.strip()) or "(none)"
    user = (
        f"Task:\n{request.task.prompt()}\n\nThe student's attempt:\n{attempt}\n\n"
        f"What the checker said:\n{feedback}\n\nWrite the hint."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _tail(text: str) -> str:
    return text if len(text) <= ATTEMPT_LIMIT else "..." + text[-(ATTEMPT_LIMIT - 3) :]


NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def leaks_answer(hint: str, answer: str | None) -> bool:
    """Whether `hint` states `answer` (the task's reference): a number answer as a number of its own
    in the hint (19 leaks in "it is 19." but not in "119" or "1.19"); any other answer as its
    text, whitespace runs collapsed and case ignored. An empty or missing answer never leaks.

    A paraphrase ("nineteen", a solution rewritten) is not caught: the check refuses the plain
    leak a teacher is most likely to write."""
    if not answer or not answer.strip():
        return False
    wanted = " ".join(answer.split())
    if NUMBER.fullmatch(wanted):
        return any(_same_number(found.group(), wanted) for found in NUMBER.finditer(hint))
    return wanted.lower() in " ".join(hint.split()).lower()


def _same_number(found: str, wanted: str) -> bool:
    try:
        return float(found) == float(wanted)
    except ValueError:
        return False


@dataclass
class HintCounts:
    """What became of the hint requests: written (used), leaked (refused: stated the answer), late
    (not answered by the deadline), failed (an error after the retries, or a blank reply)."""

    written: int = 0
    leaked: int = 0
    late: int = 0
    failed: int = 0

    def as_metrics(self) -> dict[str, int]:
        return {
            "hints_written": self.written,
            "hints_leaked": self.leaked,
            "hints_late": self.late,
            "hints_failed": self.failed,
        }


class TeacherHints:
    """A `trainer.envs.HintWriter` over one teacher: `writer(requests)` returns one hint (or None)
    per request, within the teacher's timeout_s (a `Batch`). `counts` accumulates `HintCounts`
    (the run layer takes them per step, `take_counts`); `wait_s` is the seconds the last batch took."""

    def __init__(self, client: TeacherClient) -> None:
        self.client = client
        self.counts = HintCounts()
        self.batch = Batch(client)

    @property
    def wait_s(self) -> float:
        return self.batch.wait_s

    def __call__(self, requests: Sequence[HintRequest]) -> list[str | None]:
        outcomes = self.batch.run(self.ask, list(requests))
        return [self._keep(request, outcome) for request, outcome in zip(requests, outcomes, strict=True)]

    def ask(self, request: HintRequest, deadline: float | None = None) -> str:
        """The teacher's reply to one request, stripped, before any check (at temperature 0: the same
        reply every time, from the cache after the first). Raises TeacherError."""
        text, _ = self.client.chat(
            hint_messages(request),
            purpose="hint",
            deadline=deadline,
            max_tokens=self.client.config.max_tokens,
            temperature=0.0,
            seed=0,
        )
        return text.strip()

    def _keep(self, request: HintRequest, outcome: Outcome) -> str | None:
        counts = self.counts
        if outcome.status == "late":
            counts.late += 1
        elif outcome.status != "ok" or not outcome.value:
            counts.failed += 1
        elif leaks_answer(outcome.value, request.task.reference):
            counts.leaked += 1
        else:
            counts.written += 1
            return outcome.value
        return None

    def take_counts(self) -> HintCounts:
        """The counts since the last call, reset."""
        counts, self.counts = self.counts, HintCounts()
        return counts

    def close(self) -> None:
        self.batch.close()
