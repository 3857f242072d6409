"""Multi-turn agent episodes, token-in/token-out: the model's side of the agent loop.

Why this shape. Composer is rewarded for the end state of a repository after a multi-turn
episode (read files, edit them, run the tests: the environment side is `trainer.envs.workspace`).
The most-reported correctness bug of public agent-RL frameworks is multi-turn tokenization:
rendering the conversation again and tokenizing it does not give back the ids the model sampled,
so the trainer would score tokens the sampler never produced. Here the episode *is* its token ids:

- the first input is the chat template's rendering of the system and user messages;
- each turn appends the ids the model sampled (`loss_mask` 1), untouched;
- a turn ends on any of the run's stop ids (`trainer.rollout.templates.stop_token_ids`: the
  tokenizer's EOS, the model's declared EOS ids, the template's end-of-turn token);
- the tools' observation is appended as the ids of the text the template writes after the
  assistant's end-of-turn token (the closing newline, the tool messages and the next generation
  prompt), found by rendering the conversation before and after
  (`trainer.rollout.templates.appended_text`: templates that render the last assistant turn
  differently work; one that rewrites earlier turns raises `TemplateError`);
- `messages` (OpenAI chat format) is a record for humans and traces, never re-tokenized.

The reward is the end state: the target file of the final workspace, run against the task's check
in the sandbox.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.envs.workspace import (
    ERROR_KINDS,
    SYSTEM_PROMPT,
    TOOLS,
    ToolError,
    Workspace,
    WorkspaceTask,
    arguments_json,
    execute_tool,
    parse_tool_calls,
)
from trainer.rollout.sampling import Engine, sample
from trainer.rollout.templates import appended_text, render, render_ids, resolve_stop_ids

TRUNCATED = ("max_turns", "max_tokens")  # Episode.stop values of an episode the budget cut, not the agent


@dataclass
class Turn:
    """Offsets into `Episode.token_ids` (half-open): [header_start, start) is the generation prompt
    the template adds before the model speaks, [start, end) the ids the model sampled (loss_mask 1),
    [end, next header_start) the template tokens closing the turn and the observation.

    message: index of this turn's assistant message in `Episode.messages`; failed: an action of this
    turn failed (an error observation or failing tests); feedback: what the environment said then.
    """

    header_start: int
    start: int
    end: int
    message: int
    failed: bool = False
    feedback: str = ""


@dataclass
class Episode:
    """One multi-turn attempt at a task. Lengths: len(loss_mask) == len(token_ids).

    token_ids: every id fed to and sampled from the model, in order (ints). loss_mask: 1 on the
    model-sampled ids, 0 on the prompt, template tokens and observations. reward/passed/feedback:
    the end state's score (reward 0 for a truncated episode under `require_finish`). tool_calls:
    calls by tool name ("invalid": unparseable or not an offered tool). errors: error observations
    by kind (ERROR_KINDS). stop: why it ended ("finish", "no_tool_call", "max_turns", "max_tokens").
    model_s/tools_s: seconds sampling vs running tools and the final check.
    files: the workspace's final files. sampler_logps: the log-prob (nats, at the sampling
    temperature) each sampled id was drawn with.
    """

    task: WorkspaceTask
    messages: list[dict[str, Any]]
    token_ids: list[int]
    loss_mask: list[int]
    turns: list[Turn]
    tool_calls: Counter[str]
    errors: Counter[str]
    reward: float
    passed: bool
    feedback: str
    stop: str
    model_s: float = 0.0
    tools_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    sampler_logps: list[float] = field(default_factory=list)  # per token_ids entry; 0.0 where loss_mask is 0

    @property
    def prompt_length(self) -> int:
        return self.turns[0].start if self.turns else len(self.token_ids)

    def first_failed_turn(self) -> int | None:
        return next((i for i, turn in enumerate(self.turns) if turn.failed), None)

    def trace_record(self, episode_id: str) -> dict[str, Any]:
        """The episode as one OpenAI-format record `trainer.traces` reads (its outcome included),
        plus what the trainer saw (`token_ids`, `loss_mask`, `turns` as [header_start, start, end,
        message] offsets, `stop`), which trace readers ignore and audits of a run read."""
        return {
            "id": episode_id,
            "task_id": self.task.name,
            "reward": self.reward,
            "resolved": self.passed,
            "messages": self.messages,
            "stop": self.stop,
            "token_ids": self.token_ids,
            "loss_mask": self.loss_mask,
            "turns": [[t.header_start, t.start, t.end, t.message] for t in self.turns],
        }


class _EpisodeRun:
    """One episode's state between turns (what `run_episodes` advances in lockstep with others).

    `ready()` says whether it samples another turn; `take(...)` appends a sampled turn and runs its
    tool calls; `result()` scores the end state and closes the workspace.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        task: WorkspaceTask,
        *,
        tools: Sequence[str],
        max_turns: int,
        max_tokens: int,
        max_turn_tokens: int | None,
        sandbox: Any,
        require_finish: bool = False,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.tokenizer, self.task, self.tools, self.sandbox = tokenizer, task, tools, sandbox
        self.stop_ids = set(resolve_stop_ids(tokenizer, None, stop_token_ids))
        self.require_finish = require_finish
        self.max_turns, self.max_tokens, self.max_turn_tokens = max_turns, max_tokens, max_turn_tokens
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": task.prompt()},
        ]
        self.token_ids = render_ids(tokenizer, render(tokenizer, self.messages, generation=False))
        header = render_ids(tokenizer, appended_text(tokenizer, self.messages, self.messages, generation=True))
        self.header_start = len(self.token_ids)
        self.token_ids += header
        if len(self.token_ids) >= max_tokens:
            raise ValueError(
                f"the prompt of {task.name} is {len(self.token_ids)} tokens, not under max_tokens={max_tokens}"
            )
        self.loss_mask = [0] * len(self.token_ids)
        self.sampler_logps: list[float] = []
        self.turns: list[Turn] = []
        self.calls_by_tool: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.model_s = self.tools_s = 0.0
        self.stop = "max_turns"
        self.over = False
        self.workspace = Workspace(task.files)

    def ready(self) -> bool:
        """Whether another turn is sampled (False once the episode has stopped, for whatever reason)."""
        if not self.over and len(self.turns) >= self.max_turns:
            self.over = True  # stop stays "max_turns"
        if not self.over and self.turn_budget() <= 0:
            self.over, self.stop = True, "max_tokens"
        return not self.over

    def turn_budget(self) -> int:
        """Tokens the next turn may sample: min(max_turn_tokens, what the episode has left)."""
        budget = self.max_tokens - len(self.token_ids)
        return min(budget, self.max_turn_tokens or budget)

    def take(self, sampled: list[int], logps: list[float]) -> None:
        """Append one sampled turn (ids up to and including its stop id, and their sampler
        log-probs), run its calls; a turn that ends on no stop id was cut by the token budget."""
        tokenizer, messages = self.tokenizer, self.messages
        start = len(self.token_ids)
        self.sampler_logps += [0.0] * (start - len(self.sampler_logps)) + logps
        self.token_ids += sampled
        self.loss_mask += [1] * len(sampled)
        text = tokenizer.decode(sampled, skip_special_tokens=True)
        content, calls = parse_tool_calls(text)
        turn_message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            turn_message["tool_calls"] = [
                {
                    "id": f"call_{len(self.turns)}_{i}",
                    "type": "function",
                    "function": {"name": call.name, "arguments": arguments_json(call)},
                }
                for i, call in enumerate(calls)
            ]
        messages.append(turn_message)
        for call in calls:  # what the model emitted, executed or not (a turn cut by max_tokens is not)
            self.calls_by_tool[call.name if call.error is None and call.name in self.tools else "invalid"] += 1
        turn = Turn(header_start=self.header_start, start=start, end=len(self.token_ids), message=len(messages) - 1)
        self.turns.append(turn)
        ended = bool(sampled) and sampled[-1] in self.stop_ids
        if not ended:
            self.over, self.stop = True, "max_tokens"
            return
        if not calls:
            self.over, self.stop = True, "no_tool_call"
            return
        before = list(messages)
        clock = time.perf_counter()
        finished = False
        for call, record in zip(calls, turn_message["tool_calls"], strict=True):
            try:
                observation, failed = execute_tool(call, self.task, self.workspace, self.sandbox, self.tools)
            except ToolError as error:
                self.errors[error.kind] += 1
                observation, failed = f"Error ({error.kind}): {error}", True
            if failed and not turn.failed:
                turn.failed, turn.feedback = True, observation
            finished |= call.name == "finish" and call.error is None and call.name in self.tools
            messages.append({"role": "tool", "tool_call_id": record["id"], "content": observation})
        self.tools_s += time.perf_counter() - clock
        if finished:
            self.over, self.stop = True, "finish"
            return
        observation_ids = render_ids(tokenizer, appended_text(tokenizer, before, messages, generation=False))
        header = render_ids(tokenizer, appended_text(tokenizer, messages, messages, generation=True))
        if len(self.token_ids) + len(observation_ids) + len(header) >= self.max_tokens:
            self.over, self.stop = True, "max_tokens"
            return
        self.token_ids += observation_ids
        self.header_start = len(self.token_ids)
        self.token_ids += header
        self.loss_mask += [0] * (len(observation_ids) + len(header))

    def result(self) -> Episode:
        """The end state scored in the sandbox; closes the workspace."""
        clock = time.perf_counter()
        try:
            files = self.workspace.snapshot()
            score = self.task.score_files(files, sandbox=self.sandbox)
        finally:
            self.workspace.close()
        self.tools_s += time.perf_counter() - clock
        return Episode(
            task=self.task,
            messages=self.messages,
            token_ids=self.token_ids,
            loss_mask=self.loss_mask,
            turns=self.turns,
            tool_calls=self.calls_by_tool,
            errors=self.errors,
            reward=0.0 if self.require_finish and self.stop in TRUNCATED else score.reward,
            passed=score.passed,
            feedback=score.feedback,
            stop=self.stop,
            model_s=self.model_s,
            tools_s=self.tools_s,
            files=files,
            sampler_logps=self.sampler_logps + [0.0] * (len(self.token_ids) - len(self.sampler_logps)),
        )


def run_episode(
    sampler: Engine | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: WorkspaceTask,
    *,
    tools: Sequence[str] = TOOLS,
    max_turns: int,
    max_tokens: int,
    temperature: float,
    sandbox: Any = None,
    max_turn_tokens: int | None = None,
    greedy: bool = False,
    require_finish: bool = False,
    stop_token_ids: Sequence[int] | None = None,
) -> Episode:
    """Run one episode of `task`; see the module docstring (`run_episodes` with one task).

    tools: the tool names offered (a subset of TOOLS). max_turns: assistant turns at most.
    max_tokens: the episode's whole length in tokens (prompt, samples and observations); a turn
    samples at most min(max_turn_tokens, what is left). temperature: pure sampling at it (as
    `trainer.rollout.sampling.sample`); greedy: argmax (evaluation). sandbox: where the tests run (default:
    `trainer.sandbox.default_sandbox()`). require_finish: an episode cut by the turn or token budget
    (`stop` in TRUNCATED) gets reward 0 whatever its end state (`passed` still says what the end
    state is): the agent has to end the episode itself, by `finish` or a turn without a tool call.
    stop_token_ids: the ids that end a turn (None: `trainer.rollout.templates.stop_token_ids(tokenizer,
    sampler)`).

    Raises TemplateError (the chat template cannot be appended to), ValueError (a tool outside
    TOOLS, or a prompt longer than max_tokens). Malformed sampler output never raises.
    """
    settings = dict(
        max_turns=max_turns,
        max_tokens=max_tokens,
        max_turn_tokens=max_turn_tokens,
        require_finish=require_finish,
        stop_token_ids=stop_token_ids,
    )
    return run_episodes(
        sampler, tokenizer, [task], tools=tools, temperature=temperature, sandbox=sandbox, greedy=greedy, **settings
    )[0]


def run_episodes(
    sampler: Engine | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[WorkspaceTask],
    *,
    tools: Sequence[str] = TOOLS,
    max_turns: int,
    max_tokens: int,
    temperature: float,
    sandbox: Any = None,
    max_turn_tokens: int | None = None,
    greedy: bool = False,
    require_finish: bool = False,
    stop_token_ids: Sequence[int] | None = None,
) -> list[Episode]:
    """One episode per task (a task may repeat), their turns sampled in lockstep: each round, one
    batched `trainer.rollout.sampling.sample` call over the episodes still running (each row its own ids,
    left-padded), then each row's sampled ids up to its stop id (and its own turn budget) appended
    untouched and its tool calls run. Same arguments, errors and token-in/token-out contract as
    `run_episode`; an episode's `model_s` is its share of each batched call's seconds.
    """
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise ValueError(f"tools {unknown} are not in {TOOLS}")
    stops = resolve_stop_ids(tokenizer, sampler, stop_token_ids)
    settings = dict(
        max_turns=max_turns,
        max_tokens=max_tokens,
        max_turn_tokens=max_turn_tokens,
        sandbox=sandbox,
        require_finish=require_finish,
        stop_token_ids=stops,
    )
    runs: list[_EpisodeRun] = []
    try:
        for task in tasks:
            runs.append(_EpisodeRun(tokenizer, task, tools=tools, **settings))
        while active := [run for run in runs if run.ready()]:
            budgets = [run.turn_budget() for run in active]
            clock = time.perf_counter()
            drawn = sample(
                sampler,
                tokenizer,
                [run.token_ids for run in active],
                max_new_tokens=max(budgets),
                temperature=temperature,
                greedy=greedy,
                stop_token_ids=stops,
            )
            share = (time.perf_counter() - clock) / len(active)
            for row, (run, budget) in enumerate(zip(active, budgets, strict=True)):
                kept = drawn.completion_mask[row].bool()
                run.model_s += share
                run.take(
                    drawn.completion_ids[row][kept].tolist()[:budget],
                    drawn.sampler_logps[row][kept].tolist()[:budget],
                )
        return [run.result() for run in runs]
    finally:
        for run in runs:
            run.workspace.close()


def write_episodes(episodes: Sequence[Episode], path: str | Path, *, prefix: str = "episode") -> Path:
    """Append `episodes` to the JSONL file `path` (parents made), one OpenAI-format record each
    (`Episode.trace_record`), ids `<prefix>-<n>` numbered from the file's current line count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = sum(1 for _ in path.open()) if path.exists() else 0
    with path.open("a") as handle:
        for n, episode in enumerate(episodes, start=existing):
            handle.write(json.dumps(episode.trace_record(f"{prefix}-{n}")) + "\n")
    return path


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Per-step means and totals: turns, tool calls by tool, error observations by kind, reward,
    pass rate, seconds in the model vs in tools."""
    count = max(len(episodes), 1)
    metrics: dict[str, float] = {
        "episodes": float(len(episodes)),
        "episode_reward": sum(e.reward for e in episodes) / count,
        "episode_passed": sum(e.passed for e in episodes) / count,
        "episode_turns": sum(len(e.turns) for e in episodes) / count,
        "episode_tokens": sum(len(e.token_ids) for e in episodes) / count,
        "model_s": sum(e.model_s for e in episodes),
        "tools_s": sum(e.tools_s for e in episodes),
        "error_observations": float(sum(sum(e.errors.values()) for e in episodes)),
    }
    for name in (*TOOLS, "invalid"):
        metrics[f"tool_calls/{name}"] = float(sum(e.tool_calls[name] for e in episodes))
    for kind in ERROR_KINDS:
        metrics[f"errors/{kind}"] = float(sum(e.errors[kind] for e in episodes))
    return metrics
