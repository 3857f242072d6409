"""What every environment shares: the Task and Environment contracts, Score, and the errors.

An environment hands out tasks; a task turns a completion into a Score whose `feedback` is what
the environment said about that very attempt (the failing test and its traceback, the checker's
verdict). The SDPO paper's strongest teacher context is exactly that feedback ("rich feedback"),
so it is the weakest of the layered hints a worker can choose (`hint_level: feedback`), followed
by each task's static `hints` (a partial hint, then the reference).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

FEEDBACK_LIMIT = 1500  # characters of feedback kept (the tail: an exception's line is last)


@dataclass(frozen=True)
class Score:
    """reward in [0, 1]; passed: the attempt is fully correct; feedback: at most FEEDBACK_LIMIT chars."""

    reward: float
    passed: bool
    feedback: str

    def __post_init__(self) -> None:
        if len(self.feedback) > FEEDBACK_LIMIT:
            object.__setattr__(self, "feedback", truncate(self.feedback))


def truncate(text: str, limit: int = FEEDBACK_LIMIT) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


class UnknownSourceError(ValueError):
    """An environment source or dataset name that does not exist. `key` is the option that named
    it ("task.source"), `known` the valid names, so a config layer can add file and line."""

    def __init__(self, what: str, name: str, known: Sequence[str], key: str = "task.source") -> None:
        self.name, self.known, self.key = name, tuple(known), key
        super().__init__(f"{key}: unknown {what} {name!r}; known: {', '.join(self.known)}")


class Task(ABC):
    """One verifiable problem.

    hints: static hints, weakest first (a partial hint, then the reference); the per-attempt
    `Score.feedback` comes before them all. reference: the answer or a correct solution.
    """

    hints: tuple[str, ...]
    reference: str | None

    @abstractmethod
    def prompt(self, hint: str | None = None) -> str:
        """The user message; with `hint`, the SDPO teacher's context for the same task."""

    @abstractmethod
    def score(self, completion: str) -> Score:
        """Check `completion` (the model's text after the prompt)."""

    def reward(self, completion: str) -> float:
        return self.score(completion).reward

    def demonstration(self) -> str | None:
        """The completion a supervised warm-up trains on (what a correct answer to `prompt()` looks like)."""
        return self.reference


@dataclass(frozen=True)
class ProbeItem:
    """One probe question: the conversation before the first assistant turn (OpenAI messages), the
    candidate first assistant turns (each a list of messages), and the index of the right one."""

    prompt: list[dict[str, Any]]
    candidates: list[list[dict[str, Any]]]
    right: int


@dataclass(frozen=True)
class ProbeCandidates:
    """What a warm-up should have taught, as teacher-forced multiple choice (scored by
    `trainer.rollout.warmup.warmup_probe`): `what` says in words what the probability measures."""

    what: str
    items: tuple[ProbeItem, ...]


class Environment(ABC):
    """Hands out tasks. `sample` never returns a held-out task.

    Optional capabilities are declared here, with what their absence means, so a trainer asks the
    environment rather than probing it: `held_out` (the evaluation split; empty: no held-out
    evaluation), `scripted_episode` (a warm-up episode for agentic environments; None: none) and
    `probe_candidates` (a probe of what the warm-up taught; None: none).
    """

    name: str
    executes_code: bool = False  # its checker runs model-written code: a worker starts the sandbox first
    held_out: Sequence[Task] = ()

    @abstractmethod
    def sample(self, rng: random.Random) -> Task: ...

    def scripted_episode(self, task: Task, rng: random.Random) -> list[dict[str, Any]] | None:
        """The assistant and tool messages (OpenAI format) after the prompt of a scripted episode of
        `task`, for a supervised warm-up of agent episodes; None: this environment has none."""
        return None

    def probe_candidates(self, size: int = 48) -> ProbeCandidates | None:
        """Multiple-choice items (at most `size`) that show whether the warm-up has taught what RL
        builds on; None: this environment has no probe."""
        return None

    def corpus(self) -> list[str]:
        """Text a tiny tokenizer is trained on: prompts, hints and answers of many tasks."""
        rng = random.Random(0)
        lines: list[str] = []
        for _ in range(500):
            task = self.sample(rng)
            lines += [task.prompt(), *task.hints, task.reference or ""]
        return lines

    def score_many(self, tasks: Sequence[Task], completions: Sequence[str], *, workers: int = 2) -> list[Score]:
        """Scores of completions[i] against tasks[i]; code environments run them on a worker pool."""
        return [task.score(text) for task, text in zip(tasks, completions, strict=True)]


class FiniteEnvironment(Environment):
    """A dataset: `tasks` holds every task, `held_out` the evaluation split; `train` the rest."""

    tasks: Sequence[Task]
    train: Sequence[Task]
    held_out: Sequence[Task]

    def sample(self, rng: random.Random) -> Task:
        return self.train[rng.randrange(len(self.train))]


def split(tasks: Sequence[Task], held_out_every: int) -> tuple[list[Task], list[Task]]:
    """Deterministic split: every `held_out_every`-th task (by position) is held out."""
    if held_out_every < 2:
        raise ValueError(f"held_out_every must be >= 2, got {held_out_every}")
    train = [t for i, t in enumerate(tasks) if i % held_out_every != held_out_every - 1]
    held = [t for i, t in enumerate(tasks) if i % held_out_every == held_out_every - 1]
    return train, held


def sibling_hint(completion: str) -> str:
    """Turn a successful sibling's completion into a hint for the teacher (the SDPO paper's strongest)."""
    return f"A correct answer is {completion.strip()}."


def hint_for(task: Task, level: int | str, completion: str, score: Score) -> str:
    """The teacher's hint at `level` ("feedback", "partial", "reference", or an index into task.hints).

    Raises:
        ValueError: an index the task has no hint for (naming task.hint_level).
    """
    if level == "feedback":
        return feedback_hint(completion, score)
    if level == "partial":
        return task.hints[0]
    if level == "reference":
        return task.hints[-1]
    if level == "sibling":
        raise ValueError("task.hint_level: 'sibling' is a correct sibling's answer; it needs a rollout group")
    if not 0 <= int(level) < len(task.hints):
        raise ValueError(
            f"task.hint_level: {level} is past this task's {len(task.hints)} hints; use 0..{len(task.hints) - 1}"
        )
    return task.hints[int(level)]


def feedback_hint(completion: str, score: Score) -> str:
    """The teacher's context at `hint_level: feedback`: the attempt and what the environment said."""
    verdict = "passed" if score.passed else "did not pass"
    return f"A previous attempt {verdict}. The attempt:\n{completion.strip()}\nFeedback:\n{score.feedback.strip()}"


@dataclass(frozen=True)
class HintRequest:
    """What a hint writer reads about one failed attempt: the task, the student's attempt (a
    completion, or an episode's turns up to the one whose action failed) and what the environment
    said about it. The writer's hint becomes the SDPO teacher's context."""

    task: Task
    attempt: str
    feedback: str


# A hint writer (an external teacher, `trainer.teachers.hints`): one hint per request, None where
# none came (late, refused, failed): those samples get no distillation that step.
HintWriter = Callable[[Sequence[HintRequest]], list[str | None]]
