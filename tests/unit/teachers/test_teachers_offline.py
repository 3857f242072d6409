"""What the teachers package decides without an endpoint: the answer-leak check, the disk cache's
keys and files, Retry-After, redaction, percentiles, and the `teachers:` config section."""

from __future__ import annotations

import email.utils
import time

import pytest

from trainer.config import ConfigError, load_config
from trainer.teachers.cache import RequestCache, request_key
from trainer.teachers.client import percentile, redact, retry_after
from trainer.teachers.hints import leaks_answer


@pytest.mark.parametrize(
    ("hint", "answer", "leaks"),
    [
        ("The answer is 19.", "19", True),
        ("7+12 = 19", "19", True),
        ("It is +19, check the tens.", "19", True),
        ("The answer is between 16 and 22.", "19", False),
        ("Not 119, nor 1.19, nor 190.", "19", False),
        ("Carry the one: 12+7 is not 18.", "19", False),
        ("Add the ones first.", "19", False),
        ("The result is 19.0", "19", True),
        ("return a + b", "return a + b", True),
        ("Use   RETURN A +\n B", "return a + b", True),
        ("Return the sum of both.", "return a + b", False),
        ("anything", None, False),
        ("anything", "  ", False),
    ],
)
def test_a_hint_leaks_when_it_states_the_answer_as_a_number_or_as_its_text(hint, answer, leaks):
    assert leaks_answer(hint, answer) is leaks


def test_the_cache_key_is_the_requests_content_and_an_answer_is_read_back_from_its_file(tmp_path):
    body = {"messages": [{"role": "user", "content": "What is 3+4?"}], "temperature": 0.0, "model": "a"}
    key = request_key("http://127.0.0.1:8000/v1/", "chat.completions", body)
    assert key == request_key("http://127.0.0.1:8000/v1", "chat.completions", dict(reversed(body.items())))
    assert key != request_key("http://127.0.0.1:8000/v1", "chat.completions", {**body, "model": "b"})
    assert key != request_key("http://127.0.0.1:8001/v1", "chat.completions", body)
    cache = RequestCache(tmp_path)
    assert cache.get(key) is None
    cache.put(key, {"choices": [{"message": {"content": "7"}}], "usage": {"prompt_tokens": 9}})
    assert RequestCache(tmp_path).get(key) == {
        "choices": [{"message": {"content": "7"}}],
        "usage": {"prompt_tokens": 9},
    }
    assert (cache.hits, cache.misses) == (0, 1)
    assert cache.path(key).parent.name == key[:2] and not list(tmp_path.rglob("*.tmp-*"))


def test_a_broken_cache_file_is_a_counted_miss_and_an_unread_cache_always_misses(tmp_path):
    cache = RequestCache(tmp_path)
    cache.put("ab" + "0" * 62, {"x": 1})
    cache.path("ab" + "0" * 62).write_text('{"x": ')
    assert cache.get("ab" + "0" * 62) is None and cache.broken == 1
    cache.put("cd" + "0" * 62, {"x": 2})
    fresh = RequestCache(tmp_path, read=False)
    assert fresh.get("cd" + "0" * 62) is None and fresh.misses == 1


def test_retry_after_reads_seconds_milliseconds_and_http_dates():
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27 <= retry_after({"retry-after": later}) <= 30
    assert retry_after({}) is None and retry_after(None) is None


def test_redact_removes_the_key_and_words_quoting_its_ends():
    key = "sk-test-9f8e7d6c5b4a39281706"
    said = f"Incorrect API key provided: sk-test-9f8****1706 or {key}; status 401"
    assert redact(said, key) == "Incorrect API key provided: [redacted] or [redacted]; status 401"
    assert redact("nothing here", key) == "nothing here" and redact("x", None) == "x"


def test_percentile_interpolates_between_ranks_as_numpy_does():
    values = [0.1, 0.2, 0.3, 0.4, 1.0]
    assert percentile(values, 50) == pytest.approx(0.3)
    assert percentile(values, 95) == pytest.approx(0.4 + 0.8 * 0.6)
    assert percentile([], 95) is None and percentile([2.0], 95) == 2.0


TEACHERS = """name: x
loss:
  teacher: {teacher}
task:
  hint_level: {level}
teachers:
  - name: big
    base_url: http://127.0.0.1:8000/v1
    model: a
    api_key_env: {env}
"""


def write(tmp_path, teacher="policy", level="2", env="TEACHER_KEY"):
    path = tmp_path / "c.yaml"
    path.write_text(TEACHERS.format(teacher=teacher, level=level, env=env))
    return path


def test_a_teacher_section_is_read_with_its_defaults_and_used_by_name(tmp_path):
    config = load_config(write(tmp_path, teacher="endpoint:big", level="teacher:big"))
    (big,) = config.teachers
    assert (big.name, big.model, big.api_key_env, big.max_concurrency, big.timeout_s, big.max_retries) == (
        "big",
        "a",
        "TEACHER_KEY",
        4,
        30.0,
        3,
    )
    assert (config.task.hint_level, config.loss.teacher) == ("teacher:big", "endpoint:big")


@pytest.mark.parametrize(
    ("kwargs", "sets", "line", "said"),
    [
        ({"level": "teacher:small"}, [], 5, "task.hint_level: names teacher 'small', which the teachers: list"),
        ({"teacher": "endpoint:small"}, [], 3, "loss.teacher: names teacher 'small'"),
        ({"teacher": "teacher:big"}, [], 3, "loss.teacher: must be 'policy', 'ema' or 'endpoint:<name>'"),
        ({"level": "tutor"}, [], 5, "task.hint_level: must be an index"),
        ({"env": "sk-abc-123"}, [], 10, "teachers[0].api_key_env: must be the NAME of an environment variable"),
        (
            {"teacher": "endpoint:big"},
            ["rollout.temperature=0.7"],
            None,
            "loss.teacher: an endpoint's prompt log-probs",
        ),
        ({}, ["task.teacher_pairs=big", "loss.beta=0"], None, "task.teacher_pairs: teacher solutions are DPO pairs"),
    ],
)
def test_a_teacher_misused_is_one_line_naming_the_key(tmp_path, kwargs, sets, line, said):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, **kwargs), sets)
    assert said in str(error.value)
    if line is not None:
        assert str(error.value).startswith(f"{tmp_path / 'c.yaml'}:{line}: ")
    assert "sk-abc-123" not in str(error.value)  # a key pasted by mistake is never echoed


def test_a_teacher_item_is_checked_key_by_key_and_named_by_its_place(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\nteachers:\n  - name: a\n    base_url: http://h/v1\n    model: m\n"
        "  - name: b\n    base_url: h:80\n    model: m\n"
    )
    with pytest.raises(ConfigError, match=r"c.yaml:7: teachers\[1\].base_url: must be an http\(s\) URL"):
        load_config(path)
    path.write_text(
        "name: x\nteachers:\n  - name: a\n    base_url: http://h/v1\n    model: m\n"
        "  - name: a\n    base_url: http://h/v1\n    model: n\n"
    )
    with pytest.raises(ConfigError, match=r"teachers: names a teacher twice: \['a'\]"):
        load_config(path)
    path.write_text(
        "name: x\nteachers:\n  - name: a\n    base_url: http://h/v1\n    model: m\n    max_concurrency: 0\n"
    )
    with pytest.raises(ConfigError, match=r"c.yaml:6: teachers\[0\].max_concurrency: must be >= 1"):
        load_config(path)
