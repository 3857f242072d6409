"""One teacher's endpoint: the `openai` client with the reliability a training step needs around it.

Why not the client's own retries: it retries 429 and 5xx with backoff too, but says nothing about
what it did, and a run must account for every call (latency, tokens, cost, retries and errors by
kind) and never wait past the teacher's `timeout_s`. So the client is built with `max_retries=0`
and this module retries: 429, 5xx, timeouts and dropped connections, with exponential backoff and
jitter ("equal jitter", Brooker 2015, AWS Architecture Blog "Exponential Backoff And Jitter"),
waiting what a `Retry-After` header asks (RFC 9110 §10.2.3, seconds or an HTTP date, and the
`retry-after-ms` OpenAI's API sends) whenever it is given, and never past the caller's deadline.
At most `max_concurrency` requests are in flight (a semaphore around each attempt, backoff sleeps
outside it); identical requests in flight at once are sent once. Answers land in the disk cache
(`trainer.teachers.cache`) keyed by the request's content, so a repeated request is never paid twice.

The key is read from the environment variable the config names and is kept only inside the
client object; every message this module writes (errors, the call log) is passed through
`redact`, since some providers quote part of a rejected key back.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.checkpoint import strict_json
from trainer.config import TeacherConfig
from trainer.teachers.cache import RequestCache, request_key

RETRIED = ("rate_limit", "server_error", "timeout", "connection")  # error kinds worth another try
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0


class TeacherUnavailable(RuntimeError):
    """A teacher that cannot be used as configured (dead or wrong endpoint, key missing or refused,
    no prompt log-probs where they are needed); the message is one line naming `teachers[i].<key>`."""


class TeacherError(RuntimeError):
    """One request that failed for good: `kind` is the error kind (RETRIED, auth, bad_request,
    not_found, http_<status>, deadline), the message says what happened (redacted)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class CallRecord:
    """One request as the books see it. latency_s: seconds from the first attempt to the answer
    (None: answered from the cache, or no answer); cost_usd: what this call paid (0 for a cache
    hit; tokens x the teacher's prices otherwise); retries: attempts after the first, by the kind of
    error that caused them; error: the kind of the final error (None: answered)."""

    teacher: str
    purpose: str  # probe, hint, solution, score, sample, cost_floor
    cached: bool
    latency_s: float | None
    input_tokens: int
    output_tokens: int
    cost_usd: float
    retries: dict[str, int] = field(default_factory=dict)
    error: str | None = None


class CallBook:
    """Every call's record, thread-safe, optionally appended to a JSONL file (one line per call,
    flushed). `summary(start)` is what the metrics log for the calls since index `start`."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.records: list[CallRecord] = []
        self._lock = threading.Lock()
        self._file = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = log_path.open("a", encoding="utf-8")

    def add(self, record: CallRecord) -> None:
        with self._lock:
            self.records.append(record)
            if self._file is not None:
                self._file.write(strict_json({"time": time.time(), **asdict(record)}) + "\n")
                self._file.flush()

    def __len__(self) -> int:
        return len(self.records)

    def summary(self, start: int = 0) -> dict[str, Any]:
        """Totals over records[start:]: calls, cache hits and misses, tokens, cost (USD), latency
        p50 and max of the answered live calls (None: none), retries and errors by kind."""
        with self._lock:
            calls = self.records[start:]
        live = sorted(r.latency_s for r in calls if r.latency_s is not None)
        retries: Counter[str] = Counter()
        for r in calls:
            retries.update(r.retries)
        return {
            "teacher_calls": len(calls),
            "teacher_cache_hits": sum(r.cached for r in calls),
            "teacher_cache_misses": sum(not r.cached for r in calls),
            "teacher_input_tokens": sum(r.input_tokens for r in calls),
            "teacher_output_tokens": sum(r.output_tokens for r in calls),
            "teacher_cost_usd": sum(r.cost_usd for r in calls),
            "teacher_latency_p50_s": percentile(live, 50),
            "teacher_latency_max_s": live[-1] if live else None,
            "teacher_retries": dict(retries),
            "teacher_errors": dict(Counter(r.error for r in calls if r.error)),
        }

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation between closest ranks, numpy's default) of
    already sorted values; None for none."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def redact(text: str, secret: str | None) -> str:
    """`text` with the secret, and any word sharing its first or last 6 characters (a provider
    quoting part of a rejected key back: `sk-proj-****abcd`), replaced by `[redacted]`."""
    if not secret:
        return text
    text = text.replace(secret, "[redacted]")
    if len(secret) < 12:
        return text
    head, tail = secret[:6], secret[-6:]
    words = text.split(" ")
    return " ".join("[redacted]" if head in w or tail in w else w for w in words)


def retry_after(headers: Any) -> float | None:
    """Seconds a response's `retry-after-ms` or `Retry-After` (seconds or an HTTP date) asks to wait."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return None if when is None else max(0.0, when.timestamp() - time.time())


def error_kind(error: BaseException) -> str:
    """The kind of an `openai` exception: rate_limit (429), server_error (5xx), timeout, connection
    (refused, reset, dropped), auth (401, 403), not_found (404), bad_request (400, 422), http_<code>."""
    import openai

    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "connection"
    if isinstance(error, openai.APIStatusError):
        code = error.status_code
        if code == 429:
            return "rate_limit"
        if code >= 500:
            return "server_error"
        return {401: "auth", 403: "auth", 404: "not_found", 400: "bad_request", 422: "bad_request"}.get(
            code, f"http_{code}"
        )
    return type(error).__name__


class TeacherClient:
    """Requests to one teacher (`TeacherConfig`), retried, bounded, cached and accounted.

    index: the teacher's place in the `teachers:` list (errors name `teachers[index].<key>`);
    book: where each call's `CallRecord` goes; cache: the disk cache (None: none).

    Raises:
        TeacherUnavailable: `api_key_env` names a variable that is not set.
    """

    def __init__(self, config: TeacherConfig, index: int, *, book: CallBook, cache: RequestCache | None = None) -> None:
        import openai

        self.config, self.index, self.book, self.cache = config, index, book, cache
        self._secret = None
        if config.api_key_env is not None:
            self._secret = os.environ.get(config.api_key_env) or None
            if self._secret is None:
                raise TeacherUnavailable(
                    f"teachers[{index}].api_key_env: the environment variable {config.api_key_env} is not set "
                    f"(teacher {config.name!r} reads its key from it)"
                )
        # No key: a local server that takes none; the client library insists on one.
        self._client = openai.OpenAI(
            base_url=config.base_url, api_key=self._secret or "none", max_retries=0, timeout=config.timeout_s
        )
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._lock = threading.Lock()
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self.in_flight = 0
        self.peak_in_flight = 0  # the most requests this client had open at once
        self._rng = random.Random()

    def __repr__(self) -> str:  # never the client object's own repr: it holds the key
        return f"TeacherClient({self.config.name!r}, {self.config.base_url!r}, {self.config.model!r})"

    def where(self, key: str = "base_url") -> str:
        """`teachers[i].<key>`, how errors name this teacher's settings."""
        return f"teachers[{self.index}].{key}"

    def redact(self, text: str) -> str:
        return redact(text, self._secret)

    # ---------------------------------------------------------------------------------- requests

    def chat(self, messages: list[dict[str, Any]], *, purpose: str, deadline: float | None = None, **params: Any):
        """`/chat/completions` for `messages`: (the reply's text, the response as JSON data).
        params: the request's other fields (max_tokens, temperature, seed, ...). Raises TeacherError."""
        body = {"model": self.config.model, "messages": messages, **params}
        response = self.request("chat.completions", body, purpose=purpose, deadline=deadline)
        choice = response["choices"][0]
        return (choice.get("message") or {}).get("content") or "", response

    def completions(self, body: dict[str, Any], *, purpose: str, deadline: float | None = None) -> dict[str, Any]:
        """`/completions` with `body` (the model is added; vLLM's fields such as prompt_logprobs
        pass as they are). Raises TeacherError."""
        return self.request("completions", {"model": self.config.model, **body}, purpose=purpose, deadline=deadline)

    def list_models(self, *, deadline: float | None = None) -> list[str]:
        """The names `/models` lists (the start probe). Raises TeacherError."""
        response = self.request("models", {}, purpose="probe", deadline=deadline, cacheable=False)
        return [item.get("id", "") for item in response.get("data", [])]

    def request(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        purpose: str,
        deadline: float | None = None,
        cacheable: bool = True,
    ) -> dict[str, Any]:
        """One request (`chat.completions`, `completions` or `models`) as JSON data: from the cache
        when it holds the same request, else sent (retried up to `max_retries` times, each attempt
        and each backoff within `deadline`, a `time.monotonic()` value; None: now + timeout_s).
        Every call is recorded in the book. Raises TeacherError (the final error's kind)."""
        deadline = time.monotonic() + self.config.timeout_s if deadline is None else deadline
        key = request_key(self.config.base_url, endpoint, body) if cacheable else None
        if key is not None and self.cache is not None:
            stored = self.cache.get(key)
            if stored is not None:
                self._record(purpose, stored, cached=True, latency=None)
                return stored
        if key is None:
            return self._send(endpoint, body, purpose, deadline, None)
        with self._lock:  # the same request already on its way: wait for that one
            running = self._inflight.get(key)
            mine = running is None
            if mine:
                running = self._inflight[key] = concurrent.futures.Future()
        if not mine:
            try:
                stored = running.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                raise TeacherError(
                    "timeout", f"{self.config.name}: the same request, in flight, did not finish"
                ) from None
            self._record(purpose, stored, cached=True, latency=None)
            return stored
        try:
            response = self._send(endpoint, body, purpose, deadline, key)
        except BaseException as error:
            running.set_exception(error)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
        running.set_result(response)
        return response

    def _send(
        self, endpoint: str, body: dict[str, Any], purpose: str, deadline: float, key: str | None
    ) -> dict[str, Any]:
        start = time.monotonic()
        retries: Counter[str] = Counter()
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                last = next(reversed(retries), None)
                self._record(purpose, None, cached=False, latency=None, retries=retries, error="deadline")
                raise TeacherError(
                    "deadline",
                    f"{self.config.name}: no answer within the deadline ({attempt} attempts"
                    + (f", last error {last}" if last else "")
                    + ")",
                )
            try:
                with self._slots:
                    self._enter()
                    try:
                        response = self._call(endpoint, body, timeout=remaining)
                    finally:
                        self._leave()
            except Exception as error:  # noqa: BLE001 (classified: the openai client's errors)
                kind = error_kind(error)
                message = self.redact(f"{self.config.name}: {kind}: {error}")
                wait = self._backoff(attempt, error)
                retryable = kind in RETRIED and attempt < self.config.max_retries
                if not retryable or time.monotonic() + wait >= deadline:
                    self._record(purpose, None, cached=False, latency=None, retries=retries, error=kind)
                    # out of time with tries left: the answer is late (the book keeps the error's kind)
                    raise TeacherError("deadline" if retryable else kind, message) from None
                retries[kind] += 1
                attempt += 1
                time.sleep(wait)
                continue
            if key is not None and self.cache is not None:
                self.cache.put(key, response)
            self._record(purpose, response, cached=False, latency=time.monotonic() - start, retries=retries)
            return response

    def _call(self, endpoint: str, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        if endpoint == "models":
            return {"data": [model.model_dump() for model in self._client.models.list(timeout=timeout)]}
        fields = dict(body)
        model = fields.pop("model")
        if endpoint == "chat.completions":
            messages = fields.pop("messages")
            reply = self._client.chat.completions.create(
                model=model, messages=messages, extra_body=fields, timeout=timeout
            )
        elif endpoint == "completions":
            prompt = fields.pop("prompt")
            reply = self._client.completions.create(model=model, prompt=prompt, extra_body=fields, timeout=timeout)
        else:
            raise ValueError(f"unknown endpoint {endpoint!r}")
        return json.loads(reply.model_dump_json())

    def _backoff(self, attempt: int, error: BaseException) -> float:
        """Seconds before the next attempt: what Retry-After asks, else base * 2^attempt (capped),
        half of it fixed and half drawn uniformly (equal jitter)."""
        asked = retry_after(getattr(getattr(error, "response", None), "headers", None))
        if asked is not None:
            return asked
        step = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
        return step / 2 + self._rng.uniform(0, step / 2)

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _record(
        self,
        purpose: str,
        response: dict[str, Any] | None,
        *,
        cached: bool,
        latency: float | None,
        retries: Counter[str] | None = None,
        error: str | None = None,
    ) -> None:
        usage = (response or {}).get("usage") or {}
        tokens_in, tokens_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        cost = 0.0 if cached else self.cost(tokens_in, tokens_out)
        self.book.add(
            CallRecord(
                self.config.name, purpose, cached, latency, tokens_in, tokens_out, cost, dict(retries or {}), error
            )
        )

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for a call of these token counts at the teacher's prices (per million tokens)."""
        c = self.config
        return (input_tokens * c.price_in_per_mtok + output_tokens * c.price_out_per_mtok) / 1e6

    def close(self) -> None:
        self._client.close()


@dataclass
class Outcome:
    """One item of a `Batch`: value (None unless status is "ok"), status: ok, late (no answer by
    the batch's deadline, or not sent because it had passed) or the final error's kind."""

    value: Any
    status: str


class Batch:
    """One batch of a teacher's requests, run on up to `max_concurrency` threads and given the
    teacher's `timeout_s` in all, retries included: what has not come by then is `late`, and the
    caller goes on (a request still running finishes in the background and fills the cache)."""

    def __init__(self, client: TeacherClient) -> None:
        self.client = client
        self.wait_s = 0.0  # seconds the last batch took
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=client.config.max_concurrency, thread_name_prefix=f"teacher-{client.config.name}"
        )

    def run(self, ask: Any, items: list[Any]) -> list[Outcome]:
        """`ask(item, deadline)` for each item (it raises TeacherError on failure), one `Outcome` each."""
        start = time.monotonic()
        deadline = start + self.client.config.timeout_s
        futures = [self._pool.submit(self._one, ask, item, deadline) for item in items]
        concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        outcomes = []
        for future in futures:
            if not future.done():
                future.cancel()  # still queued: never sent
                outcomes.append(Outcome(None, "late"))
                continue
            error = future.exception()
            if error is None:
                outcomes.append(Outcome(future.result(), "ok"))
            else:
                kind = getattr(error, "kind", type(error).__name__)
                outcomes.append(Outcome(None, "late" if kind == "deadline" else kind))
        self.wait_s = time.monotonic() - start
        return outcomes

    @staticmethod
    def _one(ask: Any, item: Any, deadline: float) -> Any:
        if time.monotonic() >= deadline:
            raise TeacherError("deadline", "not sent: the batch's deadline had passed")
        return ask(item, deadline)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
