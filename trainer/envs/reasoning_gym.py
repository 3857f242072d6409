"""`reasoning_gym:<dataset>`: any generator of the reasoning-gym package (Stojanovski et al. 2025,
"REASONING GYM: Reasoning Environments for Reinforcement Learning with Verifiable Rewards"), scored
by the dataset's own `score_answer`. The answer is the text inside <answer>...</answer> when the
completion has such tags (reasoning-gym's convention), else the whole completion, stripped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.envs.base import FiniteEnvironment, Score, Task, UnknownSourceError, split


def dataset_names() -> list[str]:
    """The generators reasoning-gym offers. Raises ImportError (with the install line) without it."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise ImportError(
            "reasoning_gym:<dataset> needs the reasoning-gym package: pip install 'composer-replication[envs]' "
            "(the container image does not carry it)"
        ) from None

    return sorted(DATASETS)


@dataclass(frozen=True, eq=False)
class ReasoningGymTask(Task):
    question: str
    reference: str
    hints: tuple[str, ...]
    entry: dict = field(repr=False)
    dataset: Any = field(repr=False)

    def prompt(self, hint: str | None = None) -> str:
        return self.question if hint is None else f"{self.question}\nHint: {hint}"

    def score(self, completion: str) -> Score:
        from reasoning_gym.utils import extract_answer

        answer = extract_answer(completion) if "<answer>" in completion else completion.strip()
        reward = float(self.dataset.score_answer(answer=answer, entry=self.entry))
        if reward >= 1.0:
            return Score(1.0, True, "The checker accepted the answer.")
        shown = (answer or "")[:200]
        return Score(reward, False, f"The checker scored the answer {shown!r} {reward:.2f} out of 1.")


def partial_hint(entry: dict) -> str:
    """The first step of the worked solution when the dataset ships one, else the answer's shape."""
    cot = entry.get("metadata", {}).get("answer_cot")
    if isinstance(cot, str) and cot.strip():
        steps = [line for line in cot.strip().splitlines() if line.strip()]
        return "\n".join(steps[: max(1, len(steps) // 3)])
    answer = str(entry["answer"])
    return f"The answer is {len(answer)} characters long and starts with {answer[:1]!r}."


class ReasoningGym(FiniteEnvironment):
    """`size` entries generated with `seed`; every `held_out_every`-th is held out. Other options go
    to the dataset's own config (e.g. min_terms for chain_sum)."""

    def __init__(self, dataset: str, *, size: int = 1000, seed: int = 0, held_out_every: int = 10, **config) -> None:
        known = dataset_names()
        if dataset not in known:
            raise UnknownSourceError("reasoning_gym dataset", dataset, known)
        import reasoning_gym

        self.name = f"reasoning_gym:{dataset}"
        data = reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config)
        self.tasks = []
        for entry in data:
            answer = str(entry["answer"])
            hints = (partial_hint(entry), f"The answer is {answer}.")
            self.tasks.append(ReasoningGymTask(entry["question"], answer, hints, entry, data))
        self.train, self.held_out = split(self.tasks, held_out_every)
