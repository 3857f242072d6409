"""The teachers' disk cache: an answer per request, keyed by what was asked.

A resumed run re-asks the requests of the steps it repeats, and a repeated run (a new seed
aside) re-asks all of them; a teacher's answer to the same request at temperature 0 is the same,
so it is paid once. The key is the SHA-256 of the endpoint's base URL, the endpoint and the
request body as canonical JSON (sorted keys): never a header, so never the key. One file per
answer (`<root>/<key[:2]>/<key>.json`), written atomically (`trainer.checkpoint.atomic_write`), so
processes and replicas sharing the folder never read half an answer. An unreadable file is a miss,
counted in `broken`, and is rewritten by the next answer.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from trainer.checkpoint import atomic_write, strict_json


def request_key(base_url: str, endpoint: str, body: dict[str, Any]) -> str:
    """SHA-256 (hex) of the request's content: base URL (trailing slash dropped), endpoint, body."""
    text = json.dumps([base_url.rstrip("/"), endpoint, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class RequestCache:
    """Answers on disk under `root`, by `request_key`. hits, misses, broken: counted since creation.
    read False: every `get` is a miss (answers are still stored: a measurement that must ask again)."""

    def __init__(self, root: str | Path, *, read: bool = True) -> None:
        self.root, self.read = Path(root), read
        self.hits = self.misses = self.broken = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored answer, or None (a miss; a file that does not parse counts as `broken` too)."""
        path = self.path(key)
        if not self.read:
            with self._lock:
                self.misses += 1
            return None
        try:
            answer = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            answer = None
        except (OSError, ValueError):
            answer = None
            with self._lock:
                self.broken += 1
        with self._lock:
            if answer is None:
                self.misses += 1
            else:
                self.hits += 1
        return answer

    def put(self, key: str, answer: dict[str, Any]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:  # atomic_write's temporary name is per process: one writer per process at a time
            atomic_write(path, strict_json(answer))
