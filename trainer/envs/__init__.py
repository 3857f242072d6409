"""Environments: verifiable tasks, their checkers, layered hints and environment feedback.

    env = make_env("humaneval")                    # or "addition", "reasoning_gym:gsm_symbolic", ...
    task = env.sample(rng)                         # never a held-out task
    scores = env.score_many(tasks, completions)    # Score(reward, passed, feedback) each

Sources: `addition`, `reasoning_gym:<dataset>`, `humaneval`, `feature_deletion`, `code_arith`, and
the agentic (multi-turn, `trainer.envs.workspace`) `agent_code_arith`, `agent_feature_deletion`.
A worker's hint levels, weakest first: `feedback` (feedback_hint(completion, score) of this very
attempt), then task.hints[0] (partial), task.hints[-1] (reference); a correct sibling's solution
stays the strongest where the config asks for it.
"""

from __future__ import annotations

import importlib
import inspect

from trainer.envs.base import (
    Environment,
    FiniteEnvironment,
    HintRequest,
    HintWriter,
    Score,
    Task,
    UnknownSourceError,
    feedback_hint,
    hint_for,
    sibling_hint,
)

REASONING_GYM = "reasoning_gym:"
# source -> the class that builds it, imported on first use (reasoning-gym alone takes seconds)
SOURCES = {
    "addition": "trainer.envs.addition:Addition",
    "humaneval": "trainer.envs.humaneval:HumanEval",
    "feature_deletion": "trainer.envs.feature_deletion:FeatureDeletion",
    "code_arith": "trainer.envs.code_arith:CodeArith",
    "agent_code_arith": "trainer.envs.agentic:AgentCodeArith",
    "agent_feature_deletion": "trainer.envs.agentic:AgentFeatureDeletion",
}


def known_sources() -> list[str]:
    return [*SOURCES, REASONING_GYM + "<dataset>"]


def check_source(source: str) -> None:
    """Raise UnknownSourceError (naming the known names) unless `source` names an environment.

    A reasoning-gym dataset name is checked against the package's registry (importing it takes a
    few seconds, once).
    """
    if source.startswith(REASONING_GYM):
        from trainer.envs.reasoning_gym import dataset_names

        dataset, known = source[len(REASONING_GYM) :], dataset_names()
        if dataset not in known:
            raise UnknownSourceError("reasoning_gym dataset", dataset, known)
    elif source not in SOURCES:
        raise UnknownSourceError("environment source", source, known_sources())


def make_env(source: str, **options) -> Environment:
    """The environment `source` names, built with `options` (the environment class's keyword
    arguments, e.g. max_operand for addition, size/seed for reasoning_gym).

    Raises UnknownSourceError (a ValueError with .key/.name/.known) for an unknown source or
    reasoning-gym dataset, ValueError for an option the environment does not take.
    """
    if source.startswith(REASONING_GYM):
        from trainer.envs.reasoning_gym import ReasoningGym

        return ReasoningGym(source[len(REASONING_GYM) :], **options)  # the dataset checks its own config keys
    if source not in SOURCES:
        raise UnknownSourceError("environment source", source, known_sources())
    module, name = SOURCES[source].split(":")
    cls = getattr(importlib.import_module(module), name)
    takes = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in options:
        if key not in takes:
            raise ValueError(f"task.options.{key}: {source} takes no option {key!r}; it takes: {', '.join(takes)}")
    return cls(**options)


__all__ = [
    "Environment",
    "FiniteEnvironment",
    "HintRequest",
    "HintWriter",
    "Score",
    "Task",
    "UnknownSourceError",
    "check_source",
    "feedback_hint",
    "hint_for",
    "known_sources",
    "make_env",
    "sibling_hint",
]
