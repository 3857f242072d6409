"""Keeping worker containers alive: Docker's restart policy does not bring back a container
stopped by `docker kill`, so the orchestrator restarts dead workers itself, a bounded number of
times each. Runs on the host (`python -m orchestrator up`) or in the coordinator (Compose)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import docker
from docker.models.containers import Container


@dataclass(frozen=True)
class WorkerEvent:
    kind: str  # "restarted" or "gave_up"
    name: str
    exit_code: int
    restarts: int

    def __str__(self) -> str:
        if self.kind == "restarted":
            return f"worker {self.name} died (exit {self.exit_code}); restarted ({self.restarts} so far)"
        return f"worker {self.name} died (exit {self.exit_code}) after {self.restarts} restarts; giving up"


class WorkerSupervisor:
    """Restarts worker containers that exited non-zero, except those stopped on purpose.

    A container that `docker stop` (or `compose down`, or Ctrl-C on `compose up`) stopped gets a
    `stop` event; one that crashed or was killed does not. Docker emits the event just after the
    exit, so a dead container is only restarted once a later poll still finds no stop event.
    """

    def __init__(self, client: docker.DockerClient, labels: dict[str, str], max_restarts: int) -> None:
        self.client = client
        self.filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        self.max_restarts = max_restarts
        self.restarts: Counter[str] = Counter()
        self.given_up: set[str] = set()
        self._stopped_on_purpose: set[str] = set()
        self._dead_seen: set[str] = set()
        self._events_since = time.time()

    def workers(self) -> list[Container]:
        return sorted(self.client.containers.list(all=True, filters=self.filters), key=lambda c: c.name)

    @property
    def failed(self) -> bool:
        return bool(self.given_up)

    def poll(self) -> list[WorkerEvent]:
        self._read_stop_events()
        events = []
        dead_now = set()
        for container in self.workers():
            state = container.attrs["State"]
            if state["Status"] not in ("exited", "dead") or state["ExitCode"] == 0:
                continue
            name = container.name
            if name in self._stopped_on_purpose or name in self.given_up:
                continue
            dead_now.add(name)
            if name not in self._dead_seen:
                continue
            if self.restarts[name] >= self.max_restarts:
                self.given_up.add(name)
                events.append(WorkerEvent("gave_up", name, state["ExitCode"], self.restarts[name]))
                continue
            container.start()
            self.restarts[name] += 1
            dead_now.discard(name)
            events.append(WorkerEvent("restarted", name, state["ExitCode"], self.restarts[name]))
        self._dead_seen = dead_now
        return events

    def stop_all(self, timeout_s: int = 10) -> None:
        for container in self.workers():
            if container.status == "running":
                container.stop(timeout=timeout_s)

    def _read_stop_events(self) -> None:
        # Fractional seconds: a whole-second `until` would hide the latest second's events.
        until = time.time()
        for event in self.client.events(
            since=f"{self._events_since:.6f}",
            until=f"{until:.6f}",
            filters=self.filters | {"event": ["stop"]},
            decode=True,
        ):
            self._stopped_on_purpose.add(event["Actor"]["Attributes"]["name"])
        self._events_since = until
