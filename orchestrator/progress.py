"""Following a run from its `metrics.jsonl`: the coordinator and the host orchestrator both read
the file the workers append to, so neither needs a side channel into the trainer."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class MetricsTail:
    """Returns the records appended to a JSONL file since the previous call.

    The file may not exist yet, and its last line may be half-written while a worker appends:
    an unterminated line is kept back until its newline arrives.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._pending = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        records = []
        for line in lines:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.path}: a line is not JSON ({error}): {line[:120]!r}") from None
        return records


@dataclass
class RunProgress:
    """What a person watching a run wants to see, folded from metrics records: the means over
    every replica's inner steps of the latest round, and the latest outer step."""

    round_records: list[dict[str, Any]] = field(default_factory=list)
    last_outer: dict[str, Any] | None = None
    outer_steps: set[int] = field(default_factory=set)
    resumes: int = 0
    first_outer_at: float | None = None
    # Elastic runs (their outer records name the participants): replica -> its membership changes,
    # [{"outer_step": s, "change": "left" | "joined" | "healed"}], in outer-step order.
    elastic: bool = False
    membership: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def update(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Folds records in; returns the outer-step records among them (the events worth a line)."""
        outer = []
        for record in records:
            event = record.get("event")
            if event == "inner":
                if self.round_records and self.round_records[0].get("round") != record.get("round"):
                    self.round_records = []
                self.round_records.append(record)
            elif event == "outer":
                self.last_outer = record
                # One record a round; under Streaming DiLoCo a round holds one outer step per fragment.
                first = int(record.get("first_outer_step", record["outer_step"]))
                self.outer_steps.update(range(first, int(record["outer_step"]) + 1))
                if self.first_outer_at is None:
                    self.first_outer_at = time.time()
                if "participant_ids" in record:
                    self.elastic = True
                    for change in ("left", "healed", "joined"):
                        for replica in record.get(change) or []:
                            events = self.membership.setdefault(int(replica), [])
                            events.append({"outer_step": int(record["outer_step"]), "change": change})
                            events.sort(key=lambda e: e["outer_step"])
                outer.append(record)
            elif event == "resume":
                self.resumes += 1
        return outer

    def mean(self, key: str) -> float | None:
        values = [r[key] for r in self.round_records if _is_number(r.get(key))]
        return sum(values) / len(values) if values else None

    def line(self) -> str:
        parts = []
        if self.round_records:
            parts.append(f"round {self.round_records[0].get('round')}")
            loss = self.mean("loss")
            channels = " ".join(
                f"{name} {self.mean(name):.4f}" for name in ("grpo", "sdpo", "dpo") if self.mean(name) is not None
            )
            if loss is not None:
                parts.append(f"loss {loss:.4f} ({channels})" if channels else f"loss {loss:.4f}")
            if self.mean("reward") is not None:
                parts.append(f"reward {self.mean('reward'):.3f}")
        outer = self.last_outer
        if outer is not None:
            parts.append(f"outer {outer['outer_step']}")
            if _is_number(outer.get("bytes_sent")):
                parts.append(f"sent {human_bytes(outer['bytes_sent'])}")
            if outer.get("replicas") is not None:
                parts.append(f"replicas {outer['replicas']}")
        if self.resumes:
            parts.append(f"resumes {self.resumes}")
        return " | ".join(parts) if parts else "waiting for the first step"


def missing_outer_steps(seen: set[int], expected: int) -> list[int]:
    """Outer steps 1..expected that no record reports (a resume may repeat steps, never skip)."""
    return sorted(set(range(1, expected + 1)) - seen)


def human_bytes(count: float) -> str:
    if abs(count) < 1024:
        return f"{count:.0f} B"
    for unit in ("KB", "MB", "GB"):
        count /= 1024
        if abs(count) < 1024 or unit == "GB":
            break
    return f"{count:.1f} {unit}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
