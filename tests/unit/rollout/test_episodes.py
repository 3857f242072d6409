"""trainer.agent: multi-turn episodes, token-in/token-out, malformed output as error observations,
the loss mask on model-sampled tokens only, and episodes written as replayable traces.

Most episodes here are driven by `ScriptedPolicy`: the project's tiny Qwen2 whose next-token
logits are overridden to emit given token ids, run through the real `generate`, tokenizer, chat
template, workspace and sandbox. A random tiny model does not write tool calls, and these tests
need exact ones (a malformed call of each kind, a non-canonical tokenization); the loss-mask test
also runs the plain tiny model.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from tests.support.chat_templates import Forced, chat_tokenizer, declared_eos, tiny_chat_model
from tests.support.paths import REPO
from trainer.config import AgentConfig, Config, ConfigError, TaskConfig
from trainer.envs import make_env
from trainer.envs.agentic import scripted_messages
from trainer.envs.workspace import SYSTEM_PROMPT, TOOLS, parse_tool_calls
from trainer.metrics import unnamed_keys
from trainer.model import tiny_model_and_tokenizer
from trainer.objective.batching import pad_sequences
from trainer.objective.losses import ComposerBatch, completion_logits, composer_total_loss, token_logps
from trainer.objective.replay import PreferenceReplay
from trainer.rollout.episode_batch import add_episode_pairs, episode_policy_batch
from trainer.rollout.episodes import Episode, episode_metrics, run_episode, run_episodes, write_episodes
from trainer.rollout.templates import TemplateError, demonstration_ids, end_of_turn, render_ids
from trainer.rollout.warmup import warmup_probe
from trainer.run.build import build_env
from trainer.run.collectors import make_collector


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Token-by-token decoding of a tiny model: one thread is ~10x faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env():
    return make_env("agent_code_arith")


@pytest.fixture(scope="module")
def tiny(env):
    return tiny_model_and_tokenizer(env.corpus()[:400])


class ScriptedPolicy(Qwen2ForCausalLM):
    """The tiny Qwen2, made to emit `turns[i]` (token ids) on its i-th `generate` call, and to sample
    from its own logits once the script is over; records the ids each call was given."""

    def script(self, turns: list[list[int]]) -> ScriptedPolicy:
        self.turns, self.inputs, self._target = [list(t) for t in turns], [], []
        return self

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        length = (cache.get_seq_length() if cache is not None else 0) + input_ids.shape[1]
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids.shape[1] > 1:  # the first forward of a generate call sees the whole input
            self.inputs.append(input_ids[0].tolist())
            self._target, self._offset = (self.turns.pop(0) if self.turns else None), length
        if self._target is None:  # past the script: the tiny model's own distribution
            return out
        step = length - self._offset
        token = self._target[step] if step < len(self._target) else self.config.eos_token_id
        forced = torch.full_like(out.logits[:, -1], -1e9)
        forced[:, token] = 0.0
        out.logits = out.logits.clone()
        out.logits[:, -1] = forced
        return out


def scripted(tiny, texts_or_ids: list[str | list[int]]) -> ScriptedPolicy:
    model, tokenizer = tiny
    policy = ScriptedPolicy(model.config)
    policy.load_state_dict(model.state_dict())
    policy.generation_config = model.generation_config
    turns = [t if isinstance(t, list) else render_ids(tokenizer, t) for t in texts_or_ids]
    return policy.script([ids + [tokenizer.eos_token_id] for ids in turns])


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def episode(tiny, sandbox, task, turns, **options) -> tuple[Episode, ScriptedPolicy]:
    policy = scripted(tiny, turns)
    settings = dict(max_turns=len(turns), max_tokens=2048, temperature=1.0, sandbox=sandbox) | options
    return run_episode(policy, tiny[1], task, **settings), policy


def test_a_correct_edit_passes_and_the_next_input_is_the_previous_ids_plus_the_observation(tiny, sandbox, env):
    task = env.train[0]
    turns = [
        "Let me look. " + call("read_file", path="test_calc.py"),
        call("write_file", path="calc.py", content=task.reference),
        call("run_tests"),
        call("finish"),
    ]
    result, policy = episode(tiny, sandbox, task, turns)
    assert (result.stop, result.reward, result.passed, result.feedback) == ("finish", 1.0, True, "All tests passed.")
    assert [len(result.turns), dict(result.tool_calls), dict(result.errors)] == [
        4,
        {"read_file": 1, "write_file": 1, "run_tests": 1, "finish": 1},
        {},
    ]
    # token-in/token-out: each generate call was fed exactly the episode's ids up to that turn
    assert [len(ids) for ids in policy.inputs] == [turn.start for turn in result.turns]
    for ids, turn in zip(policy.inputs, result.turns, strict=True):
        assert ids == result.token_ids[: turn.start]
    roles = [m["role"] for m in result.messages]
    assert roles == ["system", "user"] + ["assistant", "tool"] * 4  # finish is answered too (OpenAI pairing)
    assert result.messages[2]["content"] == "Let me look."
    assert result.messages[3]["content"] == dict(task.files)["test_calc.py"]
    assert result.messages[7]["content"] == "All tests passed."
    assert result.files["calc.py"] == task.reference
    assert not any(turn.failed for turn in result.turns)


def test_the_episode_keeps_the_sampled_ids_where_retokenizing_the_conversation_differs(tiny, sandbox, env):
    _, tokenizer = tiny
    task = env.train[1]
    # The model spells its call one character per token (a valid, non-canonical tokenization) with
    # JSON spacing the chat template's `tojson` does not reproduce.
    text = '<tool_call>{"name":"read_file",   "arguments":{"path":"calc.py"}}</tool_call>'
    spelled = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(ch))[0] for ch in text]
    assert spelled != render_ids(tokenizer, text)
    result, _ = episode(tiny, sandbox, task, [spelled, call("finish")])
    first = result.turns[0]
    assert result.token_ids[first.start : first.end] == [*spelled, tokenizer.eos_token_id]
    assert result.tool_calls["read_file"] == 1 and result.messages[3]["content"] == dict(task.files)["calc.py"]
    retokenized = tokenizer.apply_chat_template(result.messages, tokenize=True)
    retokenized = list(retokenized["input_ids"] if hasattr(retokenized, "keys") else retokenized)
    assert retokenized != result.token_ids[: len(retokenized)]
    assert tokenizer.decode(result.token_ids[first.start : first.end], skip_special_tokens=True) == text


@pytest.mark.parametrize(
    ("output", "kind"),
    [
        ('<tool_call>{"name": "read_file", "arguments": {"path": "calc.py"</tool_call>', "bad_json"),
        ("<tool_call>[1, 2]</tool_call>", "bad_json"),
        (call("bash", command="ls"), "unknown_tool"),
        (call("read_file", file="calc.py"), "bad_arguments"),
        (call("write_file", path="calc.py", content=7), "bad_arguments"),
        ('<tool_call>{"name": "read_file", "arguments": "path"}</tool_call>', "bad_arguments"),
        (call("edit_file", path="calc.py", old="nothing like this", new="x"), "bad_arguments"),
        (call("read_file", path="../../../etc/passwd"), "outside_workspace"),
        (call("write_file", path="/tmp/escape.py", content="x = 1"), "outside_workspace"),
        (call("read_file", path="missing.py"), "missing_file"),
        ('<tool_call>{"name": "run_tests", "arguments": {}}', "unclosed_call"),
    ],
)
def test_malformed_output_is_an_error_observation_and_a_counted_metric(tiny, sandbox, env, output, kind):
    task = env.train[2]
    result, _ = episode(tiny, sandbox, task, [output, call("finish")])
    assert result.stop == "finish" and len(result.turns) == 2  # the episode went on after the error
    assert dict(result.errors) == {kind: 1}
    assert result.turns[0].failed and result.first_failed_turn() == 0
    observation = result.messages[3]
    assert observation["role"] == "tool" and observation["content"].startswith(f"Error ({kind}):")
    assert observation["tool_call_id"] == result.messages[2]["tool_calls"][0]["id"]
    assert not Path("/tmp/escape.py").exists()
    assert episode_metrics([result])[f"errors/{kind}"] == 1.0


def test_failing_tests_mark_the_turn_failed_and_the_reward_is_the_end_state(tiny, sandbox, env):
    task = env.train[3]
    wrong = task.reference.replace("return ", "return 1 + ")
    turns = [
        call("write_file", path="calc.py", content=wrong),
        call("run_tests"),
        call("edit_file", path="calc.py", old="return 1 + ", new="return "),
    ]
    result, _ = episode(tiny, sandbox, task, turns)
    assert [t.failed for t in result.turns] == [False, True, False] and result.first_failed_turn() == 1
    assert result.turns[1].feedback.startswith("failed:") and "AssertionError" in result.turns[1].feedback
    assert result.messages[5]["content"] == result.turns[1].feedback
    # the last edit repaired the file: the end state passes although the episode ran out of turns
    assert (result.stop, result.files["calc.py"], result.reward, result.passed) == (
        "max_turns",
        task.reference,
        1.0,
        True,
    )


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny, sandbox, env):
    model, tokenizer = tiny
    rewriting = copy.deepcopy(tokenizer)
    # Like templates that drop past reasoning: only the last message keeps its content.
    rewriting.chat_template = (
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{%- if loop.last %}{{ m['content'] }}{%- endif %}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    )
    policy = scripted((model, rewriting), ["Reading. " + call("read_file", path="calc.py")])
    with pytest.raises(TemplateError, match="renders earlier turns differently"):
        run_episode(policy, rewriting, env.train[0], max_turns=2, max_tokens=1024, temperature=1.0, sandbox=sandbox)


def assert_loss_only_on_assistant_text(result: Episode, tokenizer) -> None:
    """Every loss_mask=1 id lies in a turn's sampled span and those spans decode to their assistant
    message (text outside calls + the calls); every other id decodes to no assistant text."""
    sampled = {i for turn in result.turns for i in range(turn.start, turn.end)}
    assert {i for i, m in enumerate(result.loss_mask) if m} == sampled
    assert len(result.loss_mask) == len(result.token_ids)
    for turn in result.turns:
        text = tokenizer.decode(result.token_ids[turn.start : turn.end], skip_special_tokens=True)
        message = result.messages[turn.message]
        content, calls = parse_tool_calls(text)
        assert message["role"] == "assistant" and message["content"] == content
        assert [c["function"]["name"] for c in message.get("tool_calls", [])] == [c.name for c in calls]
    unmasked = tokenizer.decode([t for t, m in zip(result.token_ids, result.loss_mask, strict=True) if not m])
    for message in result.messages[: result.turns[-1].message]:  # what the model was shown
        if message["role"] == "tool" and message["content"]:
            assert message["content"] in unmasked  # observations are all in the unmasked ids


def test_loss_mask_covers_only_model_sampled_tokens_over_real_tiny_model_episodes(tiny, sandbox, env):
    model, tokenizer = tiny
    torch.manual_seed(0)
    episodes = [
        run_episode(
            model, tokenizer, task, max_turns=3, max_tokens=300, temperature=1.0, max_turn_tokens=48, sandbox=sandbox
        )
        for task in env.train[:3]
    ]
    task = env.train[4]
    episodes.append(
        episode(tiny, sandbox, task, [call("read_file", path="calc.py"), "Done. " + call("run_tests"), "bye"])[0]
    )
    assert sum(len(e.turns) for e in episodes) >= 6
    assert sum(e.loss_mask.count(1) for e in episodes) > 100
    for result in episodes:
        assert_loss_only_on_assistant_text(result, tokenizer)


def ingest_strictly(directory: Path) -> list[str]:
    """`python -m trainer.traces ingest DIR --strict` must exit 0; returns its `total` row's cells."""
    done = subprocess.run(
        [sys.executable, "-m", "trainer.traces", "ingest", str(directory), "--strict"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return next(line.split() for line in done.stdout.splitlines() if line.startswith("total"))


def test_episodes_written_as_traces_ingest_strictly_with_their_counts(tiny, sandbox, env, tmp_path):
    task = env.train[5]
    episodes = [
        episode(tiny, sandbox, task, [call("write_file", path="calc.py", content=task.reference), call("finish")])[0],
        episode(tiny, sandbox, task, ["<tool_call>{oops</tool_call>", call("run_tests"), "I give up."])[0],
    ]
    directory = tmp_path / "runs" / "agent" / "episodes"
    write_episodes(episodes[:1], directory / "step-0.jsonl")
    write_episodes(episodes[1:], directory / "step-0.jsonl")
    records = [json.loads(line) for line in (directory / "step-0.jsonl").read_text().splitlines()]
    assert [(r["id"], r["resolved"], r["reward"]) for r in records] == [
        ("episode-0", True, 1.0),
        ("episode-1", False, 0.0),
    ]
    total = ingest_strictly(directory)
    messages = sum(len(r["messages"]) for r in records)
    calls = sum(len(m.get("tool_calls", [])) for r in records for m in r["messages"])
    assert (messages, calls) == (6 + 7, 2 + 2)
    assert total == ["total", "1", "2", "2", str(messages), str(calls), "0"]


@pytest.fixture(scope="module")
def graded_group(tiny, sandbox, env):
    """One task's group of two scripted episodes: the first passes; the second fails its first
    run_tests (turn 1) and ends with a wrong file."""
    task = env.train[6]
    wrong = task.reference.replace("return ", "return 1 + ")
    right, _ = episode(
        tiny, sandbox, task, [call("write_file", path="calc.py", content=task.reference), call("finish")]
    )
    failing, _ = episode(
        tiny,
        sandbox,
        task,
        ["I will edit. " + call("write_file", path="calc.py", content=wrong), call("run_tests"), call("finish")],
    )
    assert (right.passed, failing.passed, failing.first_failed_turn()) == (True, False, 1)
    return [right, failing]


def test_episode_batch_trains_on_sampled_tokens_only_with_one_advantage_per_episode(tiny, graded_group):
    model, tokenizer = tiny
    batch = episode_policy_batch(graded_group, tokenizer, group_size=2, hint_level=None)
    assert batch.advantages.tolist() == [0.5, -0.5]  # Dr.GRPO: reward minus the group mean, no std
    for row, result in enumerate(graded_group):
        start, length = result.prompt_length, len(result.token_ids)
        assert batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist() == result.token_ids[:start]
        completion = batch.completion_ids[row][batch.completion_mask[row].bool()].tolist()
        assert completion == result.token_ids[start:]
        assert batch.loss_mask[row, : length - start].tolist() == result.loss_mask[start:]
        assert batch.loss_mask[row].sum() < batch.completion_mask[row].sum()  # observations are not in it
    out = composer_total_loss(model, ComposerBatch(batch), alpha=0.0, beta=0.0)
    # on-policy Dr.GRPO: per-token loss -A on each sampled token, over B * C
    sampled = batch.loss_mask.sum(dim=1).float()
    expected = -(batch.advantages * sampled).sum() / batch.loss_mask.numel()
    assert out.grpo.item() == pytest.approx(expected.item(), abs=1e-6)
    # the same batch without its loss mask would train on the observations too: a different loss
    batch.loss_mask = None
    unmasked = composer_total_loss(model, ComposerBatch(batch), alpha=0.0, beta=0.0).grpo.item()
    assert unmasked != pytest.approx(expected.item(), abs=1e-4)


def test_the_trainer_scores_episode_tokens_as_the_sampler_drew_them(tiny, sandbox, env):
    model, tokenizer = tiny
    torch.manual_seed(1)
    # turn 0 is scripted (a read_file call); the turns after the observation are the tiny model's own samples
    options = dict(max_turns=3, max_tokens=400, temperature=0.7, max_turn_tokens=40)
    episodes = [
        episode(tiny, sandbox, task, [call("read_file", path="calc.py")], **options)[0] for task in env.train[7:9]
    ]
    batch = episode_policy_batch(episodes, tokenizer, group_size=2, hint_level=None)
    logits = completion_logits(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    with torch.no_grad():
        logp = token_logps(logits / 0.7, batch.completion_ids)
    free = torch.zeros_like(batch.loss_mask, dtype=torch.bool)
    for row, result in enumerate(episodes):
        assert len(result.turns) >= 2 and result.messages[3]["content"] == dict(result.task.files)["calc.py"]
        for turn in result.turns[1:]:
            free[row, turn.start - result.prompt_length : turn.end - result.prompt_length] = True
    assert int(free.sum()) >= 40
    gap = (logp - batch.sampler_logps).abs()[free]
    assert gap.max().item() < 1e-4  # the ids after the observation are scored exactly as they were drawn


def test_episodes_run_in_lockstep_are_the_episodes_run_one_at_a_time(tiny, sandbox, env):
    model, tokenizer = tiny
    options = dict(max_turns=3, max_tokens=300, temperature=1.0, max_turn_tokens=48, sandbox=sandbox, greedy=True)
    # prompts of different lengths, so the rows are left-padded together; turn 0 is scripted (a
    # read_file call), the turn after its observation the tiny model's own (greedy)
    tasks = [replace(task, instruction=task.instruction + " Quickly." * i) for i, task in enumerate(env.train[:4])]
    batched = run_episodes(scripted(tiny, [call("read_file", path="calc.py")]), tokenizer, tasks, **options)
    alone = [run_episode(scripted(tiny, [call("read_file", path="calc.py")]), tokenizer, t, **options) for t in tasks]
    assert len({e.prompt_length for e in batched}) == 4 and all(len(e.turns) == 2 for e in batched)
    for together, single in zip(batched, alone, strict=True):
        assert together.token_ids == single.token_ids and together.loss_mask == single.loss_mask
        assert together.messages == single.messages and together.stop == single.stop
        assert [(t.start, t.end) for t in together.turns] == [(t.start, t.end) for t in single.turns]
        assert together.sampler_logps == pytest.approx(single.sampler_logps, abs=1e-4)
        assert_loss_only_on_assistant_text(together, tokenizer)
    # sampled in lockstep: the trainer scores each row's ids as the batched sampler drew them
    torch.manual_seed(2)
    sampled = run_episodes(model, tokenizer, tasks, **(options | dict(greedy=False)))
    batch = episode_policy_batch(sampled, tokenizer, group_size=2, hint_level=None)
    logits = completion_logits(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    with torch.no_grad():
        gap = (token_logps(logits, batch.completion_ids) - batch.sampler_logps).abs()[batch.loss_mask.bool()]
    assert gap.numel() > 40 and gap.max().item() < 1e-4


def test_the_sdpo_teacher_gets_the_hint_at_the_first_failed_turn_and_scores_from_there(tiny, graded_group):
    model, tokenizer = tiny
    right, failing = graded_group
    batch = episode_policy_batch(graded_group, tokenizer, group_size=2, hint_level="feedback")
    assert batch.sdpo_weight.tolist() == [0.0, 1.0]  # a passed episode has nothing to correct
    turn = failing.turns[1]
    offset = int(batch.teacher_offsets[1])
    assert offset == turn.start - failing.prompt_length
    hint = render_ids(
        tokenizer, f"<|im_start|>user\nA previous attempt failed here. The environment said:\n{turn.feedback}"
    )
    teacher = batch.teacher_prompt_ids[1][batch.teacher_prompt_mask[1].bool()].tolist()
    header = failing.token_ids[turn.header_start : turn.start]
    assert teacher[: turn.header_start] == failing.token_ids[: turn.header_start]
    assert teacher[turn.header_start : turn.header_start + len(hint)] == hint
    assert teacher[-len(header) :] == header and len(teacher) == turn.header_start + len(hint) + 2 + len(header)
    hinted = composer_total_loss(model, ComposerBatch(batch), alpha=1.0, beta=0.0).sdpo.item()
    # The same alignment with the student's own context as the teacher's: identical logits, no loss.
    own, mask = pad_sequences([right.token_ids[: right.prompt_length], failing.token_ids[: turn.start]], 0, left=True)
    batch.teacher_prompt_ids, batch.teacher_prompt_mask = own, mask
    unhinted = composer_total_loss(model, ComposerBatch(batch), alpha=1.0, beta=0.0).sdpo.item()
    # (a random tiny model barely reacts to the hint: ~4e-5 here, vs ~5e-10 of float noise)
    assert unhinted < 1e-8 and hinted > 1000 * unhinted


def test_dpo_pairs_come_from_episodes_of_one_task_with_different_outcomes(tiny, graded_group):
    model, tokenizer = tiny
    replay = PreferenceReplay(model, pad_token_id=tokenizer.pad_token_id)
    assert add_episode_pairs(replay, graded_group, group_size=2, id_prefix="step-0") == 1
    assert add_episode_pairs(replay, graded_group[:1] * 2, group_size=2, id_prefix="step-1") == 0  # same outcome
    pairs = replay.sample(1)
    right, failing = graded_group
    assert pairs.chosen_ids[0, : len(right.token_ids)].tolist() == right.token_ids
    assert pairs.chosen_loss_mask[0, : len(right.loss_mask)].tolist() == right.loss_mask
    assert pairs.rejected_loss_mask[0, : len(failing.loss_mask)].tolist() == failing.loss_mask
    batch = episode_policy_batch(graded_group, tokenizer, group_size=2, hint_level=None)
    out = composer_total_loss(model, ComposerBatch(batch, pairs), alpha=0.0, beta=1.0)
    assert out.dpo.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: -log sigmoid(0)


def test_the_loss_generalisation_leaves_single_turn_batches_unchanged(tiny, graded_group):
    """loss_mask = completion_mask and teacher_offsets = 0 give what the single-turn fields (None) give."""
    model, tokenizer = tiny
    batch = episode_policy_batch(graded_group, tokenizer, group_size=2, hint_level="feedback")
    batch.sdpo_weight = None
    explicit = replace(batch, loss_mask=batch.completion_mask.clone(), teacher_offsets=torch.zeros(2, dtype=torch.long))
    implicit = replace(batch, loss_mask=None, teacher_offsets=None)
    first = composer_total_loss(model, ComposerBatch(explicit), alpha=1.0, beta=0.0, temperature=0.7)
    second = composer_total_loss(model, ComposerBatch(implicit), alpha=1.0, beta=0.0, temperature=0.7)
    assert first.metrics == second.metrics and first.metrics["sdpo"] > 0
    with pytest.raises(ValueError, match=r"teacher_offsets must be in \[0, "):
        composer_total_loss(
            model,
            ComposerBatch(replace(batch, teacher_offsets=torch.tensor([0, 10_000]))),
            alpha=1.0,
            beta=0.0,
        )


# What each rollout engine adds to configs/agent-smoke.yaml. vLLM's CPU attention refuses the
# config's head_dim 16 (128 wide, 8 heads): 2 heads of 64 is the shape it runs; every push is
# checked by hash (debug.check_engine_sync).
AGENT_ENGINES = {
    "hf": [],
    "vllm": [
        "rollout.engine=vllm",
        "model.num_heads=2",
        "rollout.engine_kv_cache_mb=64",
        "debug.check_engine_sync=true",
    ],
}
NO_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make venv)")


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=NO_VLLM)])
def agent_run(request, tmp_path_factory, sandbox):
    """configs/agent-smoke.yaml cut to one round under torchrun, on each rollout engine: 2 replicas x
    2 steps x 4 episodes. Episodes sample turn by turn through the engine (the ids so far in, the
    turn's ids and log-probs out)."""
    run_dir = tmp_path_factory.mktemp(f"agent-smoke-{request.param}")
    overrides = [
        "rounds=1",
        "optim.sft_steps=150",
        "optim.sft_batch_size=4",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        *AGENT_ENGINES[request.param],
    ]
    overrides += ["eval.size=2", "eval.k=1"]
    done = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2"]
        + ["-m", "trainer.worker", "--config", str(REPO / "configs" / "agent-smoke.yaml")]
        + [arg for key in overrides for arg in ("--set", key)],
        cwd=REPO,
        env={**os.environ, "COMPOSER_RUN_DIR": str(run_dir)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_a_runs_episodes_ingest_strictly_with_the_counts_it_logged(agent_run):
    records = [json.loads(line) for path in sorted((agent_run / "episodes").glob("*.jsonl")) for line in path.open()]
    inner = [json.loads(line) for line in (agent_run / "metrics.jsonl").open()]
    inner = [r for r in inner if r["event"] == "inner"]
    assert len(records) == sum(r["episodes"] for r in inner) == 2 * 2 * 4
    calls = sum(len(m.get("tool_calls", [])) for r in records for m in r["messages"])
    logged_calls = sum(v for r in inner for k, v in r.items() if k.startswith("tool_calls/"))
    assert calls == logged_calls > 0
    total = ingest_strictly(agent_run / "episodes")
    messages = sum(len(r["messages"]) for r in records)
    assert total == ["total", "2", str(len(records)), str(len(records)), str(messages), str(calls), "0"]
    assert all(r["sampler_logp_diff"] < 1e-4 for r in inner)  # the trainer scored what the sampler drew


def test_an_agent_run_samples_from_the_trainers_weights_with_the_trainers_log_probs(agent_run):
    """Whichever engine samples the episodes, the trainer scores their tokens with the log-probs the
    sampler drew them with (fp32 both); on vllm every push leaves exactly the trainer's weights in
    the engine (sha256 per tensor) and is timed."""
    engine = json.loads((agent_run / "config.json").read_text())["rollout"]["engine"]
    inner = [r for r in map(json.loads, (agent_run / "metrics.jsonl").open()) if r["event"] == "inner"]
    assert len(inner) == 4 and all(r["episodes"] == 4 for r in inner)
    assert max(r["sampler_logp_diff"] for r in inner) <= 1e-4
    # fp32 both: ~1e-8 nats at most (6.3e-9 measured on vllm); a bf16 engine's is over 1e-7 (test_vllm_worker)
    assert max(r["mismatch_kl"] for r in inner) <= 1e-7
    if engine == "vllm":
        assert all(r["engine_weights_equal"] for r in inner)
        assert all(r["weight_sync_s"] > 0 for r in inner)


def test_an_agent_run_writes_no_metrics_key_the_schema_does_not_name(agent_run):
    records = [json.loads(line) for line in (agent_run / "metrics.jsonl").open()]
    assert any(key.startswith("tool_calls/") for r in records for key in r)  # the episode families are there
    assert unnamed_keys(records) == []


def test_a_runs_loss_tokens_decode_only_to_assistant_text(agent_run):
    (tokenizer_dir,) = agent_run.glob("tokenizer-*")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    records = [json.loads(line) for path in sorted((agent_run / "episodes").glob("*.jsonl")) for line in path.open()]
    assert sum(len(r["turns"]) for r in records) >= len(records)
    for record in records:
        ids, mask, messages = record["token_ids"], record["loss_mask"], record["messages"]
        assert {i for i, m in enumerate(mask) if m} == {i for _, s, e, _ in record["turns"] for i in range(s, e)}
        for _, start, end, index in record["turns"]:
            content, calls = parse_tool_calls(tokenizer.decode(ids[start:end], skip_special_tokens=True))
            assert messages[index]["role"] == "assistant" and messages[index]["content"] == content
            assert [c["function"]["name"] for c in messages[index].get("tool_calls", [])] == [c.name for c in calls]
        unmasked = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        # every message the model was shown (all before its last turn) is in the unmasked ids
        shown = messages[: record["turns"][-1][3]] if record["turns"] else messages
        assert all(m["content"] in unmasked for m in shown if m["role"] in ("system", "user", "tool"))


def test_the_agent_config_knows_the_tools_and_refuses_a_single_turn_source():
    assert AgentConfig().tools == list(TOOLS)  # one definition of the tools: the workspace's
    with pytest.raises(ConfigError, match=r"agent.tools: unknown \['bash'\]"):
        AgentConfig(tools=["read_file", "bash"])
    config = Config(task=TaskConfig(source="addition"), agent=AgentConfig(enabled=True))
    with pytest.raises(ConfigError, match="agent.enabled: task.source 'addition' is not an agentic source"):
        make_collector(config, build_env(config))


def test_feature_deletion_in_multi_file_form_is_restored_by_a_patch(tiny, sandbox):
    env = make_env("agent_feature_deletion", modules=("mathutils",))
    task = env.tasks[0]
    files = dict(task.files)
    assert task.target.startswith("boltons/mathutils.py") and len(files) == 2
    assert not task.score_files(files, sandbox=sandbox).passed  # the module as given fails its doctests
    original = task.hints[-1].removeprefix("The original function:\n")  # signature, docstring, body
    head = original[: original.index('"""', original.index('"""') + 3) + 4]
    assert files[task.target].count(head) == 1 and original.startswith(head)
    turns = [call("edit_file", path=task.target, old=head, new=original), call("run_tests"), call("finish")]
    result, _ = episode(tiny, sandbox, task, turns, max_tokens=30000)
    assert (result.passed, result.errors, result.messages[5]["content"]) == (True, Counter(), "All tests passed.")


def test_arith_warm_up_scripts_teach_the_tools_and_the_operator_only_as_weakly_as_asked(tiny, sandbox, env):
    task = env.train[0]
    files = dict(task.files)
    stub = files[task.target]
    assert stub.count(" ? ") == 1 and not task.score_files(files, sandbox=sandbox).passed
    assert env.retry_rate == 0.45
    rng = random.Random(0)
    scripts = [env.scripted_episode(task, rng) for _ in range(300)]
    first, failures, retries = Counter(), 0, 0
    for messages in scripts:
        names = [m["tool_calls"][0]["function"]["name"] for m in messages[::2]]
        attempts = (len(names) + 1) // 3
        # edit, run the tests; each retry reads the file first (what its `old` quotes is then in view)
        assert names == ["edit_file", "run_tests"] + ["read_file", "edit_file", "run_tests"] * (attempts - 1) + [
            "finish"
        ]
        current, tried = stub, []
        for attempt in range(attempts):
            at = 0 if attempt == 0 else 4 + 6 * (attempt - 1) + 2  # the attempt's edit_file message
            if attempt:
                assert messages[at - 1]["content"] == current  # read_file showed the file as it is
            edit, report = messages[at]["tool_calls"][0]["function"], messages[at + 3]["content"]
            arguments = json.loads(edit["arguments"])
            # each patch replaces the operator the file holds now (the placeholder, then the last try)
            assert (edit["name"], arguments["path"], arguments["old"]) == (
                "edit_file",
                "calc.py",
                tried[-1] if tried else "?",
            )
            current = current.replace(f" {arguments['old']} ", f" {arguments['new']} ", 1)
            tried.append(arguments["new"])
            # the scripted run_tests observation is what the sandbox says of that very file
            passed = task.score_files({"calc.py": current}, sandbox=sandbox).passed
            assert (report == "All tests passed.") == passed
            if attempt < attempts - 1:
                assert not passed  # a retry follows a failure only
            elif not passed:
                failures += 1  # gave up after a failure (or ran out of operators)
        assert len(set(tried)) == len(tried)  # a retry tries an operator not yet tried
        first[tried[0]] += 1
        retries += attempts - 1
    assert set(first) == {"+", "-", "*"} and min(first.values()) >= 80  # drawn, not the reference's
    # after a failure, another try with probability retry_rate (0.45): between 0.35 and 0.55 here
    assert 0.35 < retries / (retries + failures) < 0.55
    never, always = make_env("agent_code_arith", retry_rate=0.0), make_env("agent_code_arith", retry_rate=1.0)
    assert all(len(never.scripted_episode(task, rng)) == 5 for _ in range(30))
    assert all(m[-2]["content"] == "All tests passed." for m in (always.scripted_episode(task, rng) for _ in range(30)))
    with pytest.raises(ValueError, match=r"task.options.retry_rate: 1.5 is not a probability"):
        make_env("agent_code_arith", retry_rate=1.5)
    # correct_rate: each attempt takes the operator the word names with that probability (else a
    # uniform draw, which is right a third of the time on the first attempt)
    right = task.reference.split("\n")[-2].split()[-2]
    for rate, low, high in ((1.0, 1.0, 1.0), (0.5, 0.58, 0.75)):
        weak = make_env("agent_code_arith", correct_rate=rate)
        firsts = [
            json.loads(weak.scripted_episode(task, rng)[0]["tool_calls"][0]["function"]["arguments"])
            for _ in range(300)
        ]
        assert low <= sum(f["new"] == right for f in firsts) / 300 <= high
    with pytest.raises(ValueError, match=r"task.options.correct_rate: -0.1 is not a probability"):
        make_env("agent_code_arith", correct_rate=-0.1)
    # the right patch, played through a real episode, passes
    result, _ = episode(tiny, sandbox, task, [call("edit_file", path="calc.py", old="?", new=right), call("finish")])
    assert result.passed and result.files["calc.py"] == task.reference


class Favouring(torch.nn.Module):
    """A causal LM whose logit of one token is raised by `by` everywhere: it patches in that token."""

    def __init__(self, inner: torch.nn.Module, token: int, by: float = 40.0) -> None:
        super().__init__()
        self.inner, self.token, self.by = inner, token, by

    def forward(self, input_ids=None, attention_mask=None):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits.clone()
        logits[..., self.token] += self.by
        return type("Out", (), {"logits": logits})()


def test_the_warmup_probe_is_chance_for_a_blind_model_and_the_plus_share_for_one_that_always_patches_plus(tiny, env):
    model, tokenizer = tiny
    model.train()
    probe = env.probe_candidates(size=24)
    blind = warmup_probe(model, tokenizer, probe)
    assert "held-out" in probe.what and len(probe.items) == 24 and model.training  # the mode is left as it came
    assert abs(blind - 1 / 3) < 0.02  # a random model does not tell the words apart
    # the token the "+" patch has where the "-" patch differs (the template merges `"+"}}</` here)
    task = env.held_out[0]
    prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.prompt()}]
    stub = dict(task.files)[task.target]
    plus, minus = (
        demonstration_ids(tokenizer, prompt, scripted_messages(task, [(stub.replace(" ? ", f" {op} "), "")])[:1])[0]
        for op in "+-"
    )
    token = next(a for a, b in zip(plus, minus, strict=True) if a != b)
    favoured = warmup_probe(Favouring(model, token).eval(), tokenizer, probe)
    share = sum(" plus " in task.instruction for task in env.held_out[:24]) / 24
    assert 0 < share < 1 and abs(favoured - share) < 0.01


def test_under_require_finish_an_episode_the_budget_cuts_earns_nothing_though_its_tests_pass(tiny, sandbox, env):
    task = env.train[0]
    right = task.reference.split("\n")[-2].split()[-2]
    fixed = [call("edit_file", path="calc.py", old="?", new=right), call("run_tests")]
    # the budget ends it after the passing run_tests: the end state passes, the agent never finished
    cut, _ = episode(tiny, sandbox, task, fixed)
    cut_strict, _ = episode(tiny, sandbox, task, fixed, require_finish=True)
    assert (cut.stop, cut.passed, cut.reward) == ("max_turns", True, 1.0)
    assert (cut_strict.stop, cut_strict.passed, cut_strict.reward) == ("max_turns", True, 0.0)
    # the same repair, ended by the agent, keeps its reward
    ended, _ = episode(tiny, sandbox, task, [*fixed, call("finish")], require_finish=True)
    assert (ended.stop, ended.passed, ended.reward) == ("finish", True, 1.0)


# ---------------------------------------------------------------------------- other chat families


def forced_episode(style: str, turns: list[str], task, sandbox, **options) -> tuple[Episode, Forced, object]:
    """An episode of a tiny model over `style`'s tokenizer and template (tests/support/chat_templates.py)
    made to write each text of `turns`, then its template's end-of-turn token."""
    tokenizer = chat_tokenizer(style)
    model = tiny_chat_model(tokenizer, declared_eos(style, tokenizer) or None)
    end = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    forced = Forced(model, [[render_ids(tokenizer, text) + [end]] for text in turns])
    settings = dict(max_turns=len(turns), max_tokens=4096, temperature=1.0, sandbox=sandbox) | options
    return run_episode(model, tokenizer, task, **settings), forced, tokenizer


def test_a_gemma_turn_ends_on_end_of_turn_although_the_tokenizers_eos_is_another_token(sandbox, env):
    task = env.train[0]
    turns = [call("read_file", path="calc.py"), call("finish")]
    result, forced, tokenizer = forced_episode("gemma", turns, task, sandbox)
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert tokenizer.eos_token_id != eot
    assert (result.stop, len(result.turns), dict(result.tool_calls)) == ("finish", 2, {"read_file": 1, "finish": 1})
    first, second = result.turns
    assert result.token_ids[first.end - 1] == eot and result.token_ids[second.end - 1] == eot
    observation = tokenizer.decode(result.token_ids[first.end : second.header_start], skip_special_tokens=False)
    calc = dict(task.files)["calc.py"]
    assert observation == f"\n<start_of_turn>user\n<tool_response>\n{calc}\n</tool_response><end_of_turn>\n"
    assert [len(ids[0]) for ids in forced.inputs] == [turn.start for turn in result.turns]  # token-in/token-out


def test_a_turn_goes_on_past_an_id_outside_the_stop_list_it_was_given(sandbox, env):
    # the tokenizer's EOS alone (what episodes used to stop on): <end_of_turn> ends nothing, the
    # turn runs to its budget and the episode stops as cut
    result, _, tokenizer = forced_episode(
        "gemma", [call("read_file", path="calc.py")], env.train[0], sandbox, max_turn_tokens=64, stop_token_ids=[1]
    )
    assert (result.stop, len(result.turns), dict(result.tool_calls)) == ("max_tokens", 1, {"read_file": 1})
    assert result.turns[0].end - result.turns[0].start == 64


def test_a_qwen3_episode_runs_turns_without_reasoning_with_an_empty_think_and_with_reasoning(sandbox, env):
    task = env.train[0]
    turns = [
        call("read_file", path="calc.py"),  # non-thinking mode: the template adds an empty think when last
        "<think>\n\n</think>\n\n" + call("read_file", path="test_calc.py"),
        "<think>\nThe test says plus.\n</think>\n\n" + call("run_tests"),
        call("finish"),
    ]
    result, forced, tokenizer = forced_episode("qwen3", turns, task, sandbox)
    assert (result.stop, len(result.turns)) == ("finish", 4)
    assert dict(result.tool_calls) == {"read_file": 2, "run_tests": 1, "finish": 1}
    for ids, turn in zip(forced.inputs, result.turns, strict=True):
        assert ids[0] == result.token_ids[: turn.start]  # each turn was fed exactly the episode's ids
    calc = dict(task.files)["calc.py"]
    observation = tokenizer.decode(result.token_ids[result.turns[0].end : result.turns[1].start])
    assert (
        observation
        == f"\n<|im_start|>user\n<tool_response>\n{calc}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert result.messages[6]["content"] == "<think>\nThe test says plus.\n</think>"  # reasoning kept in the record


def test_a_tool_call_drafted_inside_reasoning_is_not_made(sandbox, env):
    task = env.train[0]
    draft = "<think>\nMaybe " + call("write_file", path="calc.py", content="oops") + " first? No.\n</think>\n\n"
    result, _, _ = forced_episode("qwen3", [draft + call("read_file", path="calc.py"), call("finish")], task, sandbox)
    assert dict(result.tool_calls) == {"read_file": 1, "finish": 1} and not result.errors
    assert result.files["calc.py"] == dict(task.files)["calc.py"]  # the draft wrote nothing
    assert result.messages[2]["content"] == draft.strip()
