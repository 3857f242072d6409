"""Multi-turn agent episodes: the policy works in a small repository with tools, token-in/token-out.

Why this shape. Composer is rewarded for the end state of a repository after a multi-turn
episode (read files, edit them, run the tests). The most-reported correctness bug of public
agent-RL frameworks is multi-turn tokenization: rendering the conversation again and tokenizing
it does not give back the ids the model sampled (chat templates rewrite earlier turns, BPE merges
differ at boundaries, tool-call JSON is re-serialised), so the trainer would score tokens the
sampler never produced. Here the episode *is* its token ids:

- the first input is the chat template's rendering of the system and user messages;
- each turn appends the ids the model sampled (`loss_mask` 1), untouched;
- the tools' observation is appended as the ids of the text the template adds after the
  assistant's turn (the tool messages and the next generation prompt), found as the difference
  between two renderings of the conversation (so any template that only appends works; one that
  rewrites earlier turns raises `TemplateError`);
- `messages` (OpenAI chat format) is a record for humans and traces, never re-tokenized.

Tools (`TOOLS`): `read_file(path)`, `write_file(path, content)`, `edit_file(path, old, new)` (a
patch: `old` must occur exactly once), `run_tests()`, `finish()`, on a
`Workspace` (the task's files laid out in a fresh temporary directory on the host: only reads
and writes of text happen there). Tests run in the sandbox only (`trainer.sandbox`): the target
file is the candidate program, the task's trusted `Check` the judge (the test file the model can
read and even rewrite in its workspace is never what scores it). Malformed output (unparseable
tool-call JSON, an unknown tool, bad arguments, a path outside the workspace, an unclosed call)
becomes an error observation and a counted metric (`Episode.errors`), never an exception.

The reward is the end state: the target file of the final workspace, run against the check.
Tool calls are parsed in the Hugging Face / Qwen convention `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` (the project's tiny model renders them the same way, `trainer.model`).
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.batching import pad_sequences
from trainer.envs.base import Score, Task
from trainer.envs.code import CodeTask, score_of
from trainer.evaluation import EvalCounts
from trainer.losses import PolicyBatch, group_advantages
from trainer.replay import PreferenceReplay
from trainer.rollout import RolloutStats, sample
from trainer.sandbox import Check, Sandbox, default_sandbox

TOOLS = ("read_file", "write_file", "edit_file", "run_tests", "finish")
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
OPEN_TAG = "<tool_call>"
MAX_FILE_BYTES = 64 * 1024  # a write larger than this is an error observation
OBSERVATION_LIMIT = 2000  # characters of a file or test report shown to the model (the tail is cut)
SYSTEM_PROMPT = (
    "You are a coding agent in a repository. Call tools as <tool_call>{json}</tool_call>: "
    "read_file(path), write_file(path, content), edit_file(path, old, new), run_tests(), finish()."
)
# OpenAI function schemas, passed to chat templates that render tools (Qwen's do; the tiny one ignores them).
TOOL_SPECS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a text file of the repository.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Replace a file of the repository (or create it) with `content`.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                "required": ["path", "content"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "edit_file",
            "description": "Replace the one occurrence of `old` in a file by `new`.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}},
                "required": ["path", "old", "new"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the repository's tests.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "finish",
            "description": "End the episode.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]
TRUNCATED = ("max_turns", "max_tokens")  # Episode.stop values of an episode the budget cut, not the agent
ERROR_KINDS = ("bad_json", "unknown_tool", "bad_arguments", "outside_workspace", "missing_file", "unclosed_call")


class TemplateError(ValueError):
    """The chat template rewrites earlier turns: observations cannot be appended as ids."""


class ToolError(Exception):
    """A tool call the environment refuses; `kind` is one of ERROR_KINDS (the metric it counts under)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------------------------
# Tasks and workspaces
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkspaceTask(Task):
    """A repository (relative path -> text) and the trusted check its `target` file must pass.

    reference: the target file's correct content; hints: weakest first (a partial hint, the reference).
    """

    name: str
    files: tuple[tuple[str, str], ...]
    target: str
    check: Check
    instruction: str
    hints: tuple[str, ...]
    reference: str | None
    timeout_s: float = 3.0
    memory_mb: int = 512

    def prompt(self, hint: str | None = None) -> str:
        listing = ", ".join(path for path, _ in self.files)
        hinted = "" if hint is None else f"\nHint: {hint}"
        return f"{self.instruction}\nFiles: {listing}{hinted}"

    def score(self, completion: str, *, sandbox: Sandbox | None = None) -> Score:
        """`completion` taken as the target file's final content."""
        return self.score_files({self.target: completion}, sandbox=sandbox)

    def score_files(self, files: dict[str, str], *, sandbox: Sandbox | None = None) -> Score:
        """The target file of `files` (falling back to the task's own) run against the check, in the sandbox."""
        source = files.get(self.target, dict(self.files)[self.target])
        result = (sandbox or default_sandbox()).run(
            source, timeout_s=self.timeout_s, memory_mb=self.memory_mb, check=self.check
        )
        return score_of(result)

    def demonstration(self) -> str | None:
        return self.reference


def workspace_task(task: CodeTask, *, target: str, test_file: str, tests: str, instruction: str) -> WorkspaceTask:
    """A single-turn code task in multi-file form: `target` holds the stub, `test_file` the tests to read."""
    reference = task.program(task.demonstration() or "") if task.reference is not None else None
    return WorkspaceTask(
        name=f"{task.name}@workspace",
        files=((target, task.code), (test_file, tests)),
        target=target,
        check=task.check,
        instruction=instruction,
        hints=task.hints,
        reference=reference,
        timeout_s=task.timeout_s,
        memory_mb=task.memory_mb,
    )


class Workspace:
    """The task's files in a fresh temporary directory; paths are relative and stay inside it.

    Only text is read and written here (on the host); nothing in it is executed outside the sandbox.
    """

    def __init__(self, files: Sequence[tuple[str, str]] | dict[str, str]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="composer-workspace-")
        self.root = Path(self._dir.name).resolve()
        for path, text in dict(files).items():
            self.write(path, text)

    def resolve(self, path: Any) -> Path:
        """The absolute path of `path` inside the workspace. Raises ToolError for anything else."""
        if not isinstance(path, str) or not path.strip():
            raise ToolError("bad_arguments", f"`path` must be a non-empty string, got {path!r}")
        if "\x00" in path:
            raise ToolError("bad_arguments", "`path` contains a NUL byte")
        candidate = (self.root / path).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise ToolError("outside_workspace", f"{path!r} is outside the repository")
        return candidate

    def read(self, path: Any) -> str:
        file = self.resolve(path)
        if not file.is_file():
            raise ToolError("missing_file", f"no file {path!r}; files: {', '.join(self.files())}")
        return file.read_text(errors="replace")

    def write(self, path: Any, content: Any) -> int:
        if not isinstance(content, str):
            raise ToolError("bad_arguments", f"`content` must be a string, got {type(content).__name__}")
        if len(content.encode()) > MAX_FILE_BYTES:
            raise ToolError("bad_arguments", f"`content` is over {MAX_FILE_BYTES} bytes")
        file = self.resolve(path)
        if file == self.root or file.is_dir():
            raise ToolError("bad_arguments", f"{path!r} is a directory")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(content)
        return len(content.encode())

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def snapshot(self) -> dict[str, str]:
        return {path: (self.root / path).read_text(errors="replace") for path in self.files()}

    def close(self) -> None:
        self._dir.cleanup()


# --------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------


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


def render_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of template text (special tokens as written in it; no BOS/EOS added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, generation: bool) -> str:
    return tokenizer.apply_chat_template(
        [_template_message(m) for m in messages],
        tools=TOOL_SPECS,
        add_generation_prompt=generation,
        tokenize=False,
    )


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """Templates want tool-call arguments as a dict (OpenAI messages carry a JSON string)."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call["function"])
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            arguments = {"raw": function["arguments"]}
        function["arguments"] = arguments if isinstance(arguments, dict) else {"raw": arguments}
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


def appended_text(
    tokenizer: PreTrainedTokenizerBase,
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    *,
    generation: bool,
) -> str:
    """What the template adds when `before` (already rendered) becomes `after`.

    Raises TemplateError when the rendering of `before` is not a prefix of the rendering of
    `after` (the template rewrites earlier turns, e.g. drops a past turn's reasoning).
    """
    old = _render(tokenizer, before, generation=False)
    new = _render(tokenizer, after, generation=generation)
    if not new.startswith(old):
        raise TemplateError(
            "the chat template renders earlier turns differently once a message is appended; "
            "episodes need a template that only appends"
        )
    return new[len(old) :]


def _turn_closing(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> str:
    """Template text after the assistant's end-of-turn token (e.g. ChatML's newline after <|im_end|>)."""
    rendered = _render(tokenizer, messages, generation=False)
    eos = tokenizer.eos_token
    return rendered[rendered.rindex(eos) + len(eos) :] if eos and eos in rendered else ""


@dataclass
class ParsedCall:
    name: str
    arguments: dict[str, Any] | None  # None: unparseable (error says why)
    raw: str
    error: ToolError | None = None


def parse_tool_calls(text: str) -> tuple[str, list[ParsedCall]]:
    """(the text outside tool calls, the calls in order). Never raises: a malformed call is a
    ParsedCall with `error` set (bad_json, bad_arguments, unclosed_call)."""
    calls = []
    for match in TOOL_CALL.finditer(text):
        raw = match.group(1).strip()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as error:
            calls.append(ParsedCall("invalid", None, raw, ToolError("bad_json", f"tool call is not JSON: {error}")))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append(
                ParsedCall("invalid", None, raw, ToolError("bad_json", 'expected {"name": ..., "arguments": {...}}'))
            )
            continue
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some models write the OpenAI string form
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(arguments, dict):
            error = ToolError("bad_arguments", "`arguments` must be a JSON object")
            calls.append(ParsedCall(value["name"], None, raw, error))
            continue
        calls.append(ParsedCall(value["name"], arguments, raw))
    outside = TOOL_CALL.sub("", text)
    if OPEN_TAG in outside:
        raw = outside[outside.index(OPEN_TAG) + len(OPEN_TAG) :]
        calls.append(ParsedCall("invalid", None, raw.strip(), ToolError("unclosed_call", "<tool_call> is not closed")))
        outside = outside[: outside.index(OPEN_TAG)]
    return outside.strip(), calls


def _arguments_json(call: ParsedCall) -> str:
    return json.dumps(call.arguments if call.arguments is not None else {"raw": call.raw})


def execute_tool(
    call: ParsedCall, task: WorkspaceTask, workspace: Workspace, sandbox: Sandbox, tools: Sequence[str]
) -> tuple[str, bool]:
    """Run one parsed call on `workspace` (run_tests: `task`'s check in `sandbox`).

    Returns (observation text, whether the action failed: failing tests). Raises ToolError (its
    `kind` one of ERROR_KINDS) for a call the environment refuses; run_episode turns that into an
    error observation.
    """
    if call.error is not None:
        raise call.error
    if call.name not in tools:
        raise ToolError("unknown_tool", f"unknown tool {call.name!r}; tools: {', '.join(tools)}")
    arguments = call.arguments or {}
    expected = {
        "read_file": {"path"},
        "write_file": {"path", "content"},
        "edit_file": {"path", "old", "new"},
        "run_tests": set(),
        "finish": set(),
    }
    wanted = expected.get(call.name, set())
    if set(arguments) != wanted:
        raise ToolError("bad_arguments", f"{call.name} takes {sorted(wanted)}, got {sorted(arguments)}")
    if call.name == "read_file":
        text = workspace.read(arguments["path"])
        return (text if len(text) <= OBSERVATION_LIMIT else text[:OBSERVATION_LIMIT] + "\n[...truncated]"), False
    if call.name == "write_file":
        size = workspace.write(arguments["path"], arguments["content"])
        return f"Wrote {size} bytes to {arguments['path']}.", False
    if call.name == "edit_file":
        old, new = arguments["old"], arguments["new"]
        if not isinstance(old, str) or not isinstance(new, str) or not old:
            raise ToolError("bad_arguments", "`old` must be a non-empty string and `new` a string")
        text = workspace.read(arguments["path"])
        if text.count(old) != 1:
            raise ToolError("bad_arguments", f"`old` occurs {text.count(old)} times in {arguments['path']}, not once")
        size = workspace.write(arguments["path"], text.replace(old, new))
        return f"Edited {arguments['path']} ({size} bytes).", False
    if call.name == "run_tests":
        return test_report(task, workspace.snapshot(), sandbox)
    return "Finished.", False


def test_report(task: WorkspaceTask, files: dict[str, str], sandbox: Sandbox | None = None) -> tuple[str, bool]:
    """What `run_tests` shows for a workspace holding `files`: (observation, whether the tests failed);
    the target run against the task's check in the sandbox."""
    score = task.score_files(files, sandbox=sandbox)
    return ("All tests passed." if score.passed else score.feedback[-OBSERVATION_LIMIT:]), not score.passed


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
        sandbox: Sandbox,
        require_finish: bool = False,
    ) -> None:
        self.tokenizer, self.task, self.tools, self.sandbox = tokenizer, task, tools, sandbox
        self.require_finish = require_finish
        self.max_turns, self.max_tokens, self.max_turn_tokens = max_turns, max_tokens, max_turn_tokens
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": task.prompt()},
        ]
        self.token_ids = render_ids(tokenizer, _render(tokenizer, self.messages, generation=False))
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
        """Append one sampled turn (ids up to and including EOS, and their sampler log-probs), run its calls."""
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
                    "function": {"name": call.name, "arguments": _arguments_json(call)},
                }
                for i, call in enumerate(calls)
            ]
        messages.append(turn_message)
        for call in calls:  # what the model emitted, executed or not (a turn cut by max_tokens is not)
            self.calls_by_tool[call.name if call.error is None and call.name in self.tools else "invalid"] += 1
        turn = Turn(header_start=self.header_start, start=start, end=len(self.token_ids), message=len(messages) - 1)
        self.turns.append(turn)
        ended = bool(sampled) and sampled[-1] == tokenizer.eos_token_id
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
        closing = _turn_closing(tokenizer, before)
        observation_text = appended_text(tokenizer, before, messages, generation=False)
        observation_ids = render_ids(tokenizer, closing + observation_text)
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
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: WorkspaceTask,
    *,
    tools: Sequence[str] = TOOLS,
    max_turns: int,
    max_tokens: int,
    temperature: float,
    sandbox: Sandbox | None = None,
    max_turn_tokens: int | None = None,
    greedy: bool = False,
    require_finish: bool = False,
) -> Episode:
    """Run one episode of `task`; see the module docstring (`run_episodes` with one task).

    tools: the tool names offered (a subset of TOOLS). max_turns: assistant turns at most.
    max_tokens: the episode's whole length in tokens (prompt, samples and observations); a turn
    samples at most min(max_turn_tokens, what is left). temperature: pure sampling at it (as
    `trainer.rollout.sample`); greedy: argmax (evaluation). sandbox: where the tests run (default:
    `trainer.sandbox.default_sandbox()`). require_finish: an episode cut by the turn or token budget
    (`stop` in TRUNCATED) gets reward 0 whatever its end state (`passed` still says what the end
    state is): the agent has to end the episode itself, by `finish` or a turn without a tool call.

    Raises TemplateError (the chat template cannot be appended to), ValueError (a tool outside
    TOOLS, or a prompt longer than max_tokens). Malformed model output never raises.
    """
    settings = dict(
        max_turns=max_turns, max_tokens=max_tokens, max_turn_tokens=max_turn_tokens, require_finish=require_finish
    )
    return run_episodes(
        model, tokenizer, [task], tools=tools, temperature=temperature, sandbox=sandbox, greedy=greedy, **settings
    )[0]


def run_episodes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[WorkspaceTask],
    *,
    tools: Sequence[str] = TOOLS,
    max_turns: int,
    max_tokens: int,
    temperature: float,
    sandbox: Sandbox | None = None,
    max_turn_tokens: int | None = None,
    greedy: bool = False,
    require_finish: bool = False,
) -> list[Episode]:
    """One episode per task (a task may repeat), their turns sampled in lockstep: each round, one
    batched `trainer.rollout.sample` call over the episodes still running (each row its own ids,
    left-padded), then each row's sampled ids up to its EOS (and its own turn budget) appended
    untouched and its tool calls run. Same arguments, errors and token-in/token-out contract as
    `run_episode`; an episode's `model_s` is its share of each batched call's seconds.
    """
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise ValueError(f"tools {unknown} are not in {TOOLS}")
    sandbox = sandbox or default_sandbox()
    settings = dict(
        max_turns=max_turns,
        max_tokens=max_tokens,
        max_turn_tokens=max_turn_tokens,
        sandbox=sandbox,
        require_finish=require_finish,
    )
    runs: list[_EpisodeRun] = []
    try:
        for task in tasks:
            runs.append(_EpisodeRun(tokenizer, task, tools=tools, **settings))
        while active := [run for run in runs if run.ready()]:
            budgets = [run.turn_budget() for run in active]
            clock = time.perf_counter()
            drawn = sample(
                model,
                tokenizer,
                [run.token_ids for run in active],
                max_new_tokens=max(budgets),
                temperature=temperature,
                greedy=greedy,
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


# --------------------------------------------------------------------------------------------
# Losses over episodes
# --------------------------------------------------------------------------------------------


def episode_hint(episode: Episode, level: int | str) -> tuple[int, str] | None:
    """(turn index, hint text) for the SDPO teacher, or None for an episode that passed.

    The turn is the first whose action failed (an error observation or failing tests), else the
    first turn. The hint at level "feedback" is what the environment said at that turn (the end
    state's feedback when no action failed); other levels are the task's layered hints
    (`trainer.envs.hint_for`).
    """
    from trainer.envs import hint_for

    if episode.passed or not episode.turns:
        return None
    turn = episode.first_failed_turn()
    index = 0 if turn is None else turn
    if level == "feedback":
        said = episode.feedback if turn is None else episode.turns[turn].feedback
        return index, f"A previous attempt failed here. The environment said:\n{said.strip()}"
    return index, hint_for(episode.task, level, "", Score(episode.reward, episode.passed, episode.feedback))


def teacher_prompt_ids(tokenizer: PreTrainedTokenizerBase, episode: Episode, turn: int, hint: str) -> list[int]:
    """The episode's own ids up to turn `turn`'s generation prompt, then the hint as a user message
    (the ids of what the template adds for it), then that generation prompt's ids again: the
    teacher's context for re-scoring the student's ids of turn `turn` onward."""
    at = episode.turns[turn]
    before = episode.messages[: at.message]
    hinted = appended_text(tokenizer, before, [*before, {"role": "user", "content": hint}], generation=False)
    return (
        episode.token_ids[: at.header_start]
        + render_ids(tokenizer, hinted)
        + episode.token_ids[at.header_start : at.start]
    )


def episode_policy_batch(
    episodes: Sequence[Episode],
    tokenizer: PreTrainedTokenizerBase,
    *,
    group_size: int,
    hint_level: int | str | None = "feedback",
    device: str | Any = "cpu",
) -> PolicyBatch:
    """Episodes as one `PolicyBatch` (B = len(episodes), task-major groups of `group_size`).

    prompt: each episode's ids before its first sampled token (LEFT-padded, (B, P)); completion:
    the rest, observations included (RIGHT-padded, (B, C)), `completion_mask` its attention mask
    and `loss_mask` the episode's loss_mask there (1 on sampled ids only). advantages: Dr.GRPO's
    reward minus the group mean (`group_advantages`, Liu et al. 2025, arXiv 2503.20783), one per
    episode, applied to all its sampled tokens. sampler_logps: the sampler's own log-probs.

    SDPO (hint_level not None): per episode, `episode_hint`'s turn k and hint; the teacher prompt is
    `teacher_prompt_ids(...)` and `teacher_offsets` the column where turn k's sampled ids start, so
    the teacher re-scores the student's ids from turn k on; `sdpo_weight` is 0 for passed episodes
    (nothing to correct). Raises ValueError for an episode without a turn or a count not divisible
    by group_size.
    """
    if len(episodes) % group_size:
        raise ValueError(f"{len(episodes)} episodes are not groups of {group_size}")
    empty = [e.task.name for e in episodes if not e.turns]
    if empty:
        raise ValueError(f"episodes without a sampled turn cannot be trained on: {empty}")
    pad = tokenizer.pad_token_id
    starts = [e.prompt_length for e in episodes]
    prompt_ids, prompt_mask = pad_sequences(
        [e.token_ids[:s] for e, s in zip(episodes, starts, strict=True)], pad, left=True
    )
    completion_ids, completion_mask = pad_sequences(
        [e.token_ids[s:] for e, s in zip(episodes, starts, strict=True)], pad
    )
    loss_mask, _ = pad_sequences([e.loss_mask[s:] for e, s in zip(episodes, starts, strict=True)], 0)
    sampler = torch.zeros(completion_ids.shape, dtype=torch.float32)
    for row, (e, s) in enumerate(zip(episodes, starts, strict=True)):
        sampler[row, : len(e.token_ids) - s] = torch.tensor(e.sampler_logps[s:], dtype=torch.float32)
    rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32)
    batch = PolicyBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=group_advantages(rewards, group_size),
        sampler_logps=sampler,
        loss_mask=loss_mask,
    )
    if hint_level is not None:
        prompts, offsets, weights = [], [], []
        for e, s in zip(episodes, starts, strict=True):
            found = episode_hint(e, hint_level)
            turn, hint = found if found is not None else (0, "")
            prompts.append(teacher_prompt_ids(tokenizer, e, turn, hint) if found else e.token_ids[:s])
            offsets.append(e.turns[turn].start - s)
            weights.append(float(found is not None))
        batch.teacher_prompt_ids, batch.teacher_prompt_mask = pad_sequences(prompts, pad, left=True)
        batch.teacher_offsets = torch.tensor(offsets, dtype=torch.long)
        batch.sdpo_weight = torch.tensor(weights)
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            setattr(batch, name, value.to(device))
    return batch


def episode_pairs(
    episodes: Sequence[Episode], *, group_size: int, id_prefix: str
) -> Iterator[tuple[str, list[int], list[int], list[int], list[int]]]:
    """DPO pairs from each group's episodes with different outcomes (chosen = passed), as whole
    episodes (ids and loss_mask: only sampled ids are scored): (pair_id, chosen ids, chosen mask,
    rejected ids, rejected mask). The i-th passed episode of a group is paired with its i-th failed one."""
    for group in range(0, len(episodes), group_size):
        members = episodes[group : group + group_size]
        passed = [e for e in members if e.passed]
        failed = [e for e in members if not e.passed and any(e.loss_mask)]
        for i, (chosen, rejected) in enumerate(zip(passed, failed, strict=False)):
            pair_id = f"{id_prefix}/{group // group_size}/{i}"
            yield pair_id, chosen.token_ids, chosen.loss_mask, rejected.token_ids, rejected.loss_mask


def add_episode_pairs(replay: PreferenceReplay, episodes: Sequence[Episode], *, group_size: int, id_prefix: str) -> int:
    """`episode_pairs` added to `replay`; returns the number of pairs added."""
    added = 0
    for pair_id, *tokens in episode_pairs(episodes, group_size=group_size, id_prefix=id_prefix):
        replay.add(pair_id, *tokens)
        added += 1
    return added


# --------------------------------------------------------------------------------------------
# A training step's episodes, the warm-up and the held-out evaluation (what the worker calls)
# --------------------------------------------------------------------------------------------


@dataclass
class EpisodeRollout:
    """One step's episodes: N tasks x G episodes (task-major), packed for the loss."""

    policy: PolicyBatch
    episodes: list[Episode]
    stats: RolloutStats
    metrics: dict[str, float]


def agent_rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[WorkspaceTask],
    *,
    group_size: int,
    max_turns: int,
    max_tokens: int,
    max_turn_tokens: int | None,
    temperature: float,
    tools: Sequence[str] = TOOLS,
    hint_level: int | str | None = "feedback",
    sandbox: Sandbox | None = None,
    require_finish: bool = False,
) -> EpisodeRollout:
    """G episodes per task (all N x G in lockstep, `run_episodes`), packed by `episode_policy_batch`
    on the model's device.

    hint_level None: no SDPO teacher context. stats: `trainer.rollout.RolloutStats` (generation_s
    = seconds in the model, execution_s = seconds in tools); metrics: `episode_metrics`.
    """
    episodes = run_episodes(
        model,
        tokenizer,
        [task for task in tasks for _ in range(group_size)],
        tools=tools,
        max_turns=max_turns,
        max_tokens=max_tokens,
        temperature=temperature,
        sandbox=sandbox,
        max_turn_tokens=max_turn_tokens,
        require_finish=require_finish,
    )
    device = next(model.parameters()).device
    policy = episode_policy_batch(episodes, tokenizer, group_size=group_size, hint_level=hint_level, device=device)
    passed = torch.tensor([e.passed for e in episodes]).view(len(tasks), group_size)
    stats = RolloutStats(
        reward=sum(e.reward for e in episodes) / len(episodes),
        teacher_reward=None,
        solved_groups=passed.any(dim=1).float().mean().item(),
        completion_tokens=sum(sum(e.loss_mask) for e in episodes),
        generation_s=sum(e.model_s for e in episodes),
        execution_s=sum(e.tools_s for e in episodes),
    )
    return EpisodeRollout(policy, episodes, stats, episode_metrics(episodes))


def demonstration_ids(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[dict[str, Any]], steps: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a scripted episode laid out as `run_episode` lays out a sampled one: the
    prompt and each generation prompt, then each assistant message's body and end-of-turn token
    (mask 1), then the closing template text and the observations (mask 0)."""
    messages = list(prompt_messages)
    ids = render_ids(tokenizer, _render(tokenizer, messages, generation=False))
    mask = [0] * len(ids)
    for message in steps:
        if message["role"] == "assistant":
            header = appended_text(tokenizer, messages, messages, generation=True)
            turn = appended_text(tokenizer, messages, [*messages, message], generation=False)
            if not turn.startswith(header) or tokenizer.eos_token not in turn:
                raise TemplateError("the chat template's assistant turn does not start with its generation prompt")
            body = turn[len(header) : turn.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]
            closing = turn[len(header) + len(body) :]
            pieces = [(header, 0), (body, 1), (closing, 0)]
        else:
            pieces = [(appended_text(tokenizer, messages, [*messages, message], generation=False), 0)]
        for text, learn in pieces:
            piece = render_ids(tokenizer, text)
            ids += piece
            mask += [learn] * len(piece)
        messages.append(message)
    return ids, mask


def episode_warmup(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[WorkspaceTask],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    rng: random.Random,
    script: Callable[[WorkspaceTask, random.Random], list[dict[str, Any]]] | None = None,
    group: torch.distributed.ProcessGroup | None = None,
    progress: bool = False,
) -> list[float]:
    """Supervised warm-up on scripted episodes: cross-entropy on the assistant tokens only; returns
    the losses. For tiny models, as `trainer.warmup.supervised_warmup` is for single-turn tasks.
    script(task, rng): an episode's messages after the prompt (an environment's `scripted_episode`;
    default `trainer.envs.agentic.scripted_messages`, the reference patched in). Half the episodes
    carry the task's partial hint as a user message before the first turn, where the SDPO teacher's
    hint goes, so the teacher has learnt to read one. group: the processes sharing each step's
    rows (`trainer.warmup.sft_step`; every one passes the same rng state); None: this one alone.
    progress: show a progress bar."""
    from trainer.envs.agentic import scripted_messages
    from trainer.warmup import sft_progress, sft_step

    script = script or (lambda task, _rng: scripted_messages(task))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in sft_progress(steps, losses, progress):
        rows = []
        for task in (rng.choice(tasks) for _ in range(batch_size)):
            prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.prompt()}]
            if task.hints and rng.random() < 0.5:
                prompt.append({"role": "user", "content": task.hints[0]})
            rows.append(demonstration_ids(tokenizer, prompt, script(task, rng)))
        ids, attention = pad_sequences([r[0] for r in rows], tokenizer.pad_token_id)
        learn, _ = pad_sequences([r[1] for r in rows], 0)
        labels = ids.masked_fill(learn == 0, -100)
        losses.append(sft_step(model, optimizer, ids, attention, labels, group))
    return losses


def evaluate_episodes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[WorkspaceTask],
    *,
    k: int,
    max_turns: int,
    max_tokens: int,
    max_turn_tokens: int | None,
    temperature: float,
    tools: Sequence[str] = TOOLS,
    sandbox: Sandbox | None = None,
) -> EvalCounts:
    """Held-out pass@1 (one greedy episode per task) and k sampled episodes, as `trainer.evaluation`
    (each set in lockstep, `run_episodes`)."""
    settings = dict(
        tools=tools, max_turns=max_turns, max_tokens=max_tokens, max_turn_tokens=max_turn_tokens, sandbox=sandbox
    )
    greedy = [e.passed for e in run_episodes(model, tokenizer, tasks, temperature=1.0, greedy=True, **settings)]
    sampled = run_episodes(model, tokenizer, [t for t in tasks for _ in range(k)], temperature=temperature, **settings)
    counts = [sum(e.passed for e in sampled[i * k : (i + 1) * k]) for i in range(len(tasks))]
    return EvalCounts(greedy_correct=greedy, sampled_correct=counts, k=k)
