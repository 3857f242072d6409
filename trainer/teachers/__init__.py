"""External teachers behind OpenAI-compatible endpoints (a `vllm serve` on your GPUs, a hosted
router, a provider's API): hints written for the student's mistake, teacher solutions as DPO pairs,
on-policy distillation from a larger model, and the cost-floor report.

Every teacher the policy runs with today is the policy itself (or its EMA) reading a static hint,
the environment's feedback or a sibling's answer; on small models that teacher cannot read
feedback, and only the answer opens its gate. A stronger model outside the run can write the hint
that a weak one cannot read for itself. The parts:

- `client`: one endpoint through the `openai` library, with retries (429, 5xx, timeouts, dropped
  connections; backoff with jitter, Retry-After honoured), at most `max_concurrency` requests in
  flight, a deadline per batch (`timeout_s`) and every call's latency, tokens, cost, retries and
  errors recorded (`CallBook`);
- `cache`: answers on disk keyed by the request's content;
- `hints`: `task.hint_level: teacher:<name>`; `pairs`: `task.teacher_pairs: <name>`;
  `endpoint`: `loss.teacher: endpoint:<name>`;
- `cost_floor` (`python -m trainer.teachers cost-floor`): N real states x each teacher.

`Teachers` is what a run holds: every configured teacher, probed at start (a dead or wrong
endpoint is one line naming `teachers[i].base_url`), and the per-step metrics of their calls.
The layer sits between rollout and run: it reads envs' tasks and checkers (through the run's
`score_many`), renders with rollout's templates and traces' `render_pair`, fills objective's
`PolicyBatch`, and only the run layer calls it, so rollout and objective never import HTTP code.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainer.config import TeacherConfig
from trainer.teachers.cache import RequestCache
from trainer.teachers.client import CallBook, TeacherClient, TeacherError, TeacherUnavailable
from trainer.teachers.endpoint import DEFAULT_TOP_K, EndpointEngine, EndpointTeacher
from trainer.teachers.hints import TeacherHints, leaks_answer
from trainer.teachers.pairs import TeacherSolutions

__all__ = [
    "Teachers",
    "TeacherClient",
    "TeacherError",
    "TeacherUnavailable",
    "EndpointTeacher",
    "EndpointEngine",
    "TeacherHints",
    "TeacherSolutions",
    "CallBook",
    "RequestCache",
    "leaks_answer",
    "probe",
    "shown_url",
]


def shown_url(url: str) -> str:
    """`url` without a user or password in it (https://user:pass@host/v1 -> https://host/v1)."""
    parts = urlparse(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()


def probe(client: TeacherClient) -> None:
    """The start check of one teacher: `/models` answers within its timeout_s (retries included)
    and lists its model. Raises TeacherUnavailable, one line naming `teachers[i].base_url` (or
    `.model`, `.api_key_env`) and what was tried."""
    c, url = client.config, shown_url(client.config.base_url)
    start = time.monotonic()
    try:
        served = client.list_models()
    except TeacherError as error:
        took = time.monotonic() - start
        tried = f"GET {url.rstrip('/')}/models, {took:.1f} s, max_retries {c.max_retries}"
        if error.kind == "auth":
            raise TeacherUnavailable(
                f"{client.where('api_key_env')}: {url} refused the key in ${c.api_key_env} ({tried}): {error}"
            ) from None
        if error.kind in ("not_found", "bad_request") or error.kind.startswith("http_"):
            raise TeacherUnavailable(
                f"{client.where()}: {url} is not an OpenAI-compatible API root ({tried}: {error}); "
                "vLLM serves one at http://HOST:PORT/v1"
            ) from None
        raise TeacherUnavailable(
            f"{client.where()}: {url} did not answer ({tried}: {error.kind}); is the server up and the URL right?"
        ) from None
    if c.model not in served:
        listed = ", ".join(served[:10]) + (", ..." if len(served) > 10 else "")
        raise TeacherUnavailable(f"{client.where('model')}: {c.model!r} is not served at {url} (it serves: {listed})")


class Teachers:
    """The run's teachers by name: clients (probed at start), their hint writers, solution makers,
    endpoint scorers and samplers, made on first use; `take_metrics()` per step.

    configs: the `teachers:` list; cache_root: where a teacher without `cache_dir` caches;
    log_path: the call log (one JSON line per call; None: none); check: probe every teacher now;
    read_cache: False asks every request again (the answers are still stored).

    Raises:
        TeacherUnavailable: a key variable not set, or (`check`) a teacher that fails `probe`.
    """

    def __init__(
        self,
        configs: list[TeacherConfig],
        *,
        cache_root: Path,
        log_path: Path | None = None,
        check: bool = True,
        read_cache: bool = True,
    ) -> None:
        self.book = CallBook(log_path)
        self.clients: dict[str, TeacherClient] = {}
        for index, config in enumerate(configs):
            cache = RequestCache(Path(config.cache_dir) if config.cache_dir else cache_root, read=read_cache)
            self.clients[config.name] = TeacherClient(config, index, book=self.book, cache=cache)
        if check:
            for client in self.clients.values():
                probe(client)
        self._parts: dict[tuple[str, str], Any] = {}
        self._mark = len(self.book)

    def hints(self, name: str) -> TeacherHints:
        return self._part("hints", name, lambda c: TeacherHints(c))

    def solutions(self, name: str) -> TeacherSolutions:
        return self._part("solutions", name, lambda c: TeacherSolutions(c))

    def endpoint(self, name: str, *, top_k: int | None = None) -> EndpointTeacher:
        return self._part("endpoint", name, lambda c: EndpointTeacher(c, top_k=top_k or DEFAULT_TOP_K))

    def engine(self, name: str, *, pad_token_id: int) -> EndpointEngine:
        return self._part("engine", name, lambda c: EndpointEngine(c, pad_token_id=pad_token_id))

    def _part(self, kind: str, name: str, make: Any) -> Any:
        if (kind, name) not in self._parts:
            self._parts[kind, name] = make(self.clients[name])
        return self._parts[kind, name]

    def take_metrics(self) -> dict[str, Any]:
        """The calls since the last take, as inner-record fields: teacher_calls, cache hits and
        misses, tokens, cost (USD), latency p50 / max, `teacher_retries/<kind>` and
        `teacher_errors/<kind>`, teacher_wait_s (seconds the step waited on teachers), and each part's
        counts (hints_*, teacher_pairs*, endpoint_*)."""
        summary = self.book.summary(self._mark)
        self._mark = len(self.book)
        retries, errors = summary.pop("teacher_retries"), summary.pop("teacher_errors")
        summary |= {f"teacher_retries/{k}": v for k, v in sorted(retries.items())}
        summary |= {f"teacher_errors/{k}": v for k, v in sorted(errors.items())}
        summary["teacher_wait_s"] = sum(part.batch.wait_s for part in self._parts.values())
        for part in self._parts.values():
            part.batch.wait_s = 0.0
            if hasattr(part, "take_counts"):
                summary |= part.take_counts().as_metrics()
        return summary

    def close(self) -> None:
        for part in self._parts.values():
            part.close()
        for client in self.clients.values():
            client.close()
        self.book.close()
