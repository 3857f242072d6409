"""Teacher solutions as DPO pairs: for each group of samples with failures, the teacher solves the
task; when the environment's checker passes its solution (in the sandbox, for code), that
solution is the chosen side and the group's first failed sample the rejected one.

A solution the checker fails is counted and never used: a pair whose chosen side is wrong would
teach the policy to prefer one wrong answer to another. Pairs are rendered with the policy's own
tokenizer and chat template by `trainer.traces.render.render_pair`, the rule trace pairs follow:
the loss masks are 1 on what the assistant wrote, through its end-of-turn token. The teacher is
asked at temperature 0, so the same task's solution is one cached answer for the whole run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from trainer.envs import Score, Task
from trainer.teachers.client import Batch, TeacherClient
from trainer.traces.mining import PreferencePair
from trainer.traces.render import render_pair
from trainer.traces.schema import Message

Pair = tuple[str, list[int], list[int], list[int], list[int]]  # PreferenceFeed.step's items
ScoreMany = Callable[[Sequence[Task], Sequence[str]], list[Score]]


def solution_messages(task: Task) -> list[dict[str, str]]:
    """What the teacher is asked: the task's prompt, as the student is asked it."""
    return [{"role": "user", "content": task.prompt()}]


@dataclass
class PairCounts:
    """pairs: used (the solution passed); failed: solutions the checker failed (never used); late:
    no solution by the deadline; errors: requests that failed, or solutions that could not be rendered."""

    pairs: int = 0
    failed: int = 0
    late: int = 0
    errors: int = 0

    def as_metrics(self) -> dict[str, int]:
        return {
            "teacher_pairs": self.pairs,
            "teacher_pairs_failed": self.failed,
            "teacher_pairs_late": self.late,
            "teacher_pairs_errors": self.errors,
        }


class TeacherSolutions:
    """One teacher's solutions turned into DPO pairs (`pairs`); `counts` accumulates `PairCounts`."""

    def __init__(self, client: TeacherClient) -> None:
        self.client = client
        self.batch = Batch(client)
        self.counts = PairCounts()

    def solve(self, tasks: list[Task]) -> list[str | None]:
        """The teacher's solution of each task (None: late or failed), within its timeout_s."""
        outcomes = self.batch.run(self.ask, tasks)
        for outcome in outcomes:
            if outcome.status == "late":
                self.counts.late += 1
            elif outcome.status != "ok":
                self.counts.errors += 1
        return [outcome.value if outcome.status == "ok" else None for outcome in outcomes]

    def ask(self, task: Task, deadline: float | None = None) -> str:
        """The teacher's solution of one task, unchecked (temperature 0: cached after the first).
        Raises TeacherError."""
        text, _ = self.client.chat(
            solution_messages(task),
            purpose="solution",
            deadline=deadline,
            max_tokens=self.client.config.max_tokens,
            temperature=0.0,
            seed=0,
        )
        return text

    def pairs(
        self,
        tasks: Sequence[Task],
        texts: Sequence[str],
        scores: Sequence[Score],
        *,
        group_size: int,
        tokenizer: Any,
        score_many: ScoreMany,
        id_prefix: str,
        max_length: int | None = None,
    ) -> Iterator[Pair]:
        """DPO pairs (pair_id `{id_prefix}-teacher-{group}`, chosen ids and mask, rejected ids and
        mask) for the groups of `group_size` samples (rows task-major: row = n * G + g, `texts` and
        `scores` per row) with a failure: the teacher's solution, checked by `score_many`, against
        the group's first failed sample. max_length: `render_pair`'s."""
        groups = [
            n for n in range(len(tasks)) if not all(s.passed for s in scores[n * group_size : (n + 1) * group_size])
        ]
        solved = [(n, text) for n, text in zip(groups, self.solve([tasks[n] for n in groups]), strict=True) if text]
        checked = score_many([tasks[n] for n, _ in solved], [text for _, text in solved]) if solved else []
        for (n, solution), score in zip(solved, checked, strict=True):
            if not score.passed:
                self.counts.failed += 1
                continue
            row = next(n * group_size + g for g in range(group_size) if not scores[n * group_size + g].passed)
            pair = PreferencePair(
                id=f"{id_prefix}-teacher-{n}",
                prompt=[Message("user", tasks[n].prompt())],
                chosen=[Message("assistant", solution.strip())],
                rejected=[Message("assistant", texts[row].strip())],
                source="teacher",
                reason=f"teacher {self.client.config.name}'s solution passed the checker; sample {row} did not",
                chosen_example_id=f"teacher:{self.client.config.name}",
                rejected_example_id=f"{id_prefix}/{row}",
            )
            try:
                rendered = render_pair(pair, tokenizer, max_length=max_length)
            except ValueError:  # e.g. a side the template renders to no assistant token
                self.counts.errors += 1
                continue
            self.counts.pairs += 1
            yield (
                rendered.pair_id,
                rendered.chosen_ids,
                rendered.chosen_loss_mask,
                rendered.rejected_ids,
                rendered.rejected_loss_mask,
            )

    def take_counts(self) -> PairCounts:
        counts, self.counts = self.counts, PairCounts()
        return counts

    def close(self) -> None:
        self.batch.close()
