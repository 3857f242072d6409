"""How a run turns tasks into training data: one `Collector` per kind of sample, chosen once.

A collector owns the three places where single-turn rollouts and agent episodes differ: the
warm-up (supervised completions, or scripted episodes), one inner step's collection (G samples
per task with their rewards, the SDPO teacher's context and the DPO pairs they offer), and the
held-out evaluation. `make_collector` is the one place that reads `agent.enabled`; everything
else in the run calls the collector it was given (the agent loops of verl are registered
strategies in the same spirit).
"""

from __future__ import annotations

import functools
import itertools
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from trainer.config import Config, ConfigError, teacher_name
from trainer.envs import Environment, HintRequest
from trainer.objective.losses import PreferenceBatch, route_sdpo_on_failures
from trainer.objective.replay import PreferenceFeed
from trainer.rollout.episode_batch import EpisodeRollout, agent_rollout, episode_pairs
from trainer.rollout.episodes import write_episodes
from trainer.rollout.evaluation import EvalCounts, evaluate, evaluate_episodes, teacher_gate
from trainer.rollout.sampling import Engine
from trainer.rollout.single_turn import Rollout, rollout, sibling_pairs
from trainer.rollout.warmup import episode_warmup, supervised_warmup

if TYPE_CHECKING:  # imported where a run has teachers: the openai client is an extra
    from trainer.teachers import Teachers

Samples = Rollout | EpisodeRollout  # both carry .policy (a PolicyBatch), .stats and .metrics


@dataclass
class Policy:
    """The policy as the collectors see it: the trained module (warm-up, scoring), its tokenizer,
    the engine that samples from it (`trainer.rollout.sampling.Engine`) and the ids that end its
    turn (`trainer.rollout.templates.stop_token_ids`)."""

    model: torch.nn.Module
    tokenizer: Any
    engine: Engine
    stop_token_ids: list[int]


class Collector(ABC):
    """Warm-up, collection and evaluation for one kind of sample (see the module docstring).

    config: the run's config (the rollout, task, loss and agent sections are read); env: the
    environment the tasks come from.
    """

    def __init__(self, config: Config, env: Environment) -> None:
        self.config, self.env = config, env
        # The run's external teachers (`trainer.teachers.Teachers`, set by `trainer.run.build` when
        # the config lists some): hint writers, solutions, an endpoint that scores tokens.
        self.teachers: Teachers | None = None

    def hint_writer(self) -> Any:
        """The hint writer of `task.hint_level: teacher:<name>` (None: the level is not a teacher's)."""
        name = teacher_name(self.config.task.hint_level, "teacher")
        return None if name is None or self.teachers is None else self.teachers.hints(name)

    def endpoint(self) -> Any:
        """The token scorer of `loss.teacher: endpoint:<name>` (None: the teacher is the policy or its EMA)."""
        name = teacher_name(self.config.loss.teacher, "endpoint")
        if name is None or self.teachers is None:
            return None
        return self.teachers.endpoint(name, top_k=self.config.loss.sdpo_top_k)

    def teacher_step(self, samples: Samples) -> None:
        """After a collection: the endpoint teacher scores the samples' tokens for the SDPO channel,
        and the step's teacher calls go into its record."""
        endpoint = self.endpoint()
        if endpoint is not None and self.config.loss.alpha > 0:
            endpoint.score_batch(samples.policy)
        if self.teachers is not None:
            samples.metrics.update(self.teachers.take_metrics())

    @property
    @abstractmethod
    def max_completion_length(self) -> int:
        """The longest completion the loss may see, in tokens (Dr.GRPO's constant normaliser)."""

    @property
    @abstractmethod
    def max_sample_length(self) -> int:
        """The longest sample the loss's forward may see, prompt and completion, in tokens."""

    @abstractmethod
    def warm_up(
        self, policy: Policy, *, rng: random.Random, group: dist.ProcessGroup | None, progress: bool
    ) -> list[float]:
        """The supervised warm-up (`optim.sft_steps` steps); returns the per-step losses."""

    @abstractmethod
    def collect(
        self,
        policy: Policy,
        *,
        rng: random.Random,
        teacher: torch.nn.Module | None,
        feed: PreferenceFeed | None,
        id_prefix: str,
        episodes_file: Path,
    ) -> tuple[Samples, PreferenceBatch | None]:
        """One inner step's samples (`rollout.prompts_per_step` tasks x `rollout.group_size`) and
        the DPO batch the feed draws after adding the pairs they offer (None: no DPO channel, or an
        empty store). Samples come from `policy.engine`. teacher: the SDPO teacher's sampler for its
        reward probe (the EMA module, or the policy's engine; None: no SDPO); id_prefix: unique per (replica,
        rank, step), for pair and episode ids; episodes_file: where episodes are appended when the
        run writes them."""

    @abstractmethod
    def evaluate(
        self, policy: Policy, tasks: list, *, teacher: torch.nn.Module | None
    ) -> tuple[EvalCounts, dict[str, list[float]]]:
        """Held-out counts on `tasks` (sampled from `policy.engine`) and the teacher gate per hint
        kind ({}: not measured; `teacher`: the EMA module, None: the policy)."""

    def sft_settings(self, **shared: Any) -> dict[str, Any]:
        """The warm-up's optimiser settings (`optim.sft_*`) with `shared` (rng, group, progress)."""
        o = self.config.optim
        return dict(steps=o.sft_steps, batch_size=o.sft_batch_size, lr=o.sft_lr, **shared)

    def score_many(self) -> Any:
        """The environment's batch scorer with the sandbox's pool size."""
        return functools.partial(self.env.score_many, workers=self.config.sandbox.workers)


class SingleTurnCollector(Collector):
    """One completion per sample (`trainer.rollout.single_turn`); DPO pairs from sibling disagreement."""

    @property
    def max_completion_length(self) -> int:
        return self.config.rollout.max_completion_length

    @property
    def max_sample_length(self) -> int:
        return self.config.rollout.max_prompt_length + self.config.rollout.max_completion_length

    def warm_up(self, policy, *, rng, group, progress):
        c = self.config
        # a teacher's hints never state the answer: the warm-up reads the task's weakest hint instead
        level = "partial" if teacher_name(c.task.hint_level, "teacher") else c.task.hint_level
        return supervised_warmup(
            policy.model,
            policy.tokenizer,
            self.env,
            hint_level=level,
            sibling_hints=c.task.sibling_hints,
            max_prompt_length=c.rollout.max_prompt_length,
            **self.sft_settings(rng=rng, group=group, progress=progress),
        )

    def collect(self, policy, *, rng, teacher, feed, id_prefix, episodes_file):
        c = self.config
        tasks = [self.env.sample(rng) for _ in range(c.rollout.prompts_per_step)]
        samples = rollout(
            policy.engine,
            policy.tokenizer,
            tasks,
            group_size=c.rollout.group_size,
            max_prompt_length=c.rollout.max_prompt_length,
            max_completion_length=c.rollout.max_completion_length,
            temperature=c.rollout.temperature,
            hint_level=c.task.hint_level,
            sibling_hints=c.task.sibling_hints,
            teacher=teacher,
            score_many=self.score_many(),
            stop_token_ids=policy.stop_token_ids,
            hint_writer=self.hint_writer(),
        )
        if c.loss.sdpo_on == "failed" and c.loss.alpha > 0:  # issue 15: each sample to one channel
            p = samples.policy
            p.advantages, p.sdpo_weight = route_sdpo_on_failures(p.advantages, samples.rewards > 0, p.sdpo_weight)
        pairs = sibling_pairs(samples, id_prefix=id_prefix)
        if feed is not None and c.task.teacher_pairs is not None and self.teachers is not None:
            teacher_pairs = self.teachers.solutions(c.task.teacher_pairs).pairs(
                tasks,
                samples.texts,
                samples.scores,
                group_size=c.rollout.group_size,
                tokenizer=policy.tokenizer,
                score_many=self.score_many(),
                id_prefix=id_prefix,
                max_length=c.rollout.max_prompt_length * 4,
            )
            pairs = itertools.chain(pairs, list(teacher_pairs))
        preference = None if feed is None else feed.step(pairs, rng=rng)
        self.teacher_step(samples)
        return samples, preference

    def evaluate(self, policy, tasks, *, teacher):
        c = self.config
        counts = evaluate(
            policy.engine,
            policy.tokenizer,
            tasks,
            k=c.eval.k,
            max_prompt_length=c.rollout.max_prompt_length,
            max_completion_length=c.rollout.max_completion_length,
            temperature=c.rollout.temperature,
            score_many=self.score_many(),
            stop_token_ids=policy.stop_token_ids,
        )
        # Issue 15's teacher gate: the student and the hinted teacher (None: the policy; an endpoint's
        # model when it is the teacher) on correct answers; with a hint writer, its hints too.
        written = {}
        writer = self.hint_writer()
        if writer is not None:  # the writer's hint for each failed greedy attempt; passed ones: the plain prompt
            attempts = counts.greedy_attempts
            failed = [i for i, (_, score) in enumerate(attempts) if not score.passed]
            hints = writer([HintRequest(tasks[i], attempts[i][0], attempts[i][1].feedback) for i in failed])
            by_task = dict(zip(failed, hints, strict=True))
            written[str(c.task.hint_level)] = [by_task.get(i) for i in range(len(tasks))]
        gate = teacher_gate(
            policy.model,
            self.endpoint() or (policy.model if teacher is None else teacher),
            policy.tokenizer,
            tasks,
            counts.greedy_attempts,
            max_prompt_length=c.rollout.max_prompt_length,
            written=written,
        )
        return counts, gate


class EpisodeCollector(Collector):
    """Multi-turn agent episodes (`trainer.rollout.episodes`); DPO pairs from passed vs failed episodes."""

    @property
    def max_completion_length(self) -> int:
        return self.config.agent.max_tokens

    @property
    def max_sample_length(self) -> int:
        return self.config.agent.max_tokens

    def warm_up(self, policy, *, rng, group, progress):
        settings = self.sft_settings(rng=rng, group=group, progress=progress)
        return episode_warmup(
            policy.model, policy.tokenizer, self.env.train, script=self.env.scripted_episode, **settings
        )

    def collect(self, policy, *, rng, teacher, feed, id_prefix, episodes_file):
        c, a = self.config, self.config.agent
        samples = agent_rollout(
            policy.engine,
            policy.tokenizer,
            [self.env.sample(rng) for _ in range(c.rollout.prompts_per_step)],
            group_size=c.rollout.group_size,
            hint_level=c.task.hint_level if c.loss.alpha > 0 else None,
            require_finish=a.require_finish,
            stop_token_ids=policy.stop_token_ids,
            hint_writer=self.hint_writer() if c.loss.alpha > 0 else None,
            **self.episode_settings(),
        )
        if a.write_episodes:
            write_episodes(samples.episodes, episodes_file, prefix=id_prefix)
        preference = None
        if feed is not None:
            pairs = episode_pairs(samples.episodes, group_size=c.rollout.group_size, id_prefix=id_prefix)
            preference = feed.step(pairs, rng=rng)
        self.teacher_step(samples)
        return samples, preference

    def evaluate(self, policy, tasks, *, teacher):
        settings = self.episode_settings()
        counts = evaluate_episodes(
            policy.engine,
            policy.tokenizer,
            tasks,
            k=self.config.eval.k,
            stop_token_ids=policy.stop_token_ids,
            **settings,
        )
        return counts, {}

    def episode_settings(self) -> dict[str, Any]:
        """What training and evaluation episodes share: the turn and token budgets, the sampling
        temperature and the tools offered (`agent.*`, `rollout.temperature`)."""
        a = self.config.agent
        return dict(
            max_turns=a.max_turns,
            max_tokens=a.max_tokens,
            max_turn_tokens=a.max_turn_tokens,
            temperature=self.config.rollout.temperature,
            tools=a.tools,
        )


def collector_type(config: Config) -> type[Collector]:
    """The kind of collector the config asks for: episodes when `agent.enabled` (the one branch
    on it), else single-turn (the memory plan reads its lengths without an environment)."""
    return EpisodeCollector if config.agent.enabled else SingleTurnCollector


def make_collector(config: Config, env: Environment) -> Collector:
    """The run's collector (`collector_type`).

    Raises ConfigError (naming agent.enabled) for episodes on an environment without workspaces.
    """
    kind = collector_type(config)
    if kind is EpisodeCollector and not env.name.startswith("agent_"):  # issue 12: episodes need workspaces
        raise ConfigError(f"agent.enabled: task.source {config.task.source!r} is not an agentic source (agent_*)")
    return kind(config, env)
