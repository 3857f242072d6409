"""The one loop that follows a run until it ends: progress lines read from metrics.jsonl, the
worker supervisor's events (restarts, give-ups), and the caller's own ending condition.

Three places follow a run and differ only in what ends it and what they add to a line: the host
launcher (`python -m orchestrator up`: until the coordinator container exits), the coordinator
(until every replica has written its done key; a silent host fails the run), and a joining machine
(`python -m orchestrator join`: until its own workers have exited). Each passes its parts here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from orchestrator.progress import MetricsTail, RunProgress
from orchestrator.supervisor import WorkerSupervisor

POLL_S = 1.0


def follow(
    *,
    out: Callable[[str], None],
    done: Callable[[], bool],
    supervisor: WorkerSupervisor | None = None,
    progress: RunProgress | None = None,
    tail: MetricsTail | None = None,
    status: Callable[[], str] = lambda: "",
    failure: Callable[[], str | None] = lambda: None,
    each_poll: Callable[[], None] = lambda: None,
    stopped: Callable[[], bool] = lambda: False,
    progress_every_s: float = 20.0,
    first_line_at_once: bool = True,
    poll_s: float = POLL_S,
) -> tuple[bool, str]:
    """Poll every `poll_s` seconds until the run ends; returns (True, "") when `done()`, else
    (False, the reason).

    Each poll, in order: `failure()` (a reason to stop now, e.g. a host gone silent); with
    `tail` (metrics.jsonl's reader), a line per new outer step in `progress` (and one every `progress_every_s` seconds
    when nothing new came; `status()` is appended to each, e.g. " | alive 2/2"); with
    `supervisor`, `each_poll()`, then its events, and a supervisor that gave up on a worker stops
    all workers and ends the follow ("gave up on workers [...]"); then `done()`. `stopped()`
    ends it early ("stopped before the run finished"). `first_line_at_once`: print the progress
    line on the first poll rather than after `progress_every_s`.
    """
    progress = progress if progress is not None else RunProgress()
    last_line_at = 0.0 if first_line_at_once else time.monotonic()
    while not stopped():
        reason = failure()
        if reason:
            return False, reason
        if tail is not None:
            suffix = status()
            for record in progress.update(tail.read()):
                out(f"outer step {record['outer_step']}: {progress.line()}{suffix}")
                last_line_at = time.monotonic()
            if time.monotonic() - last_line_at > progress_every_s:
                out(f"{progress.line()}{suffix}")
                last_line_at = time.monotonic()
        if supervisor is not None:
            each_poll()
            for event in supervisor.poll():
                out(str(event))
            if supervisor.failed:
                supervisor.stop_all()
                return False, f"gave up on workers {sorted(supervisor.given_up)}"
        if done():
            return True, ""
        time.sleep(poll_s)
    return False, "stopped before the run finished"
