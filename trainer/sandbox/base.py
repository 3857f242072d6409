"""What every sandbox backend shares: the program's result, the trusted check, the config (the
run config's `sandbox:` section is this `SandboxConfig`), the request framing and the `Sandbox`
base class that turns a harness report into an `ExecutionResult`.

The harness (`harness.py`, beside this file) is the program that runs inside the sandbox: it ships
as source, so it stays one stdlib-only file.
"""

from __future__ import annotations

import math
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.sandbox.harness import dumps as _dumps
from trainer.sandbox.harness import loads

Status = Literal["passed", "failed", "error", "timeout", "memory", "killed"]
STATUSES: tuple[str, ...] = ("passed", "failed", "error", "timeout", "memory", "killed")
HARNESS_PATH = Path(__file__).with_name("harness.py")
HARNESS_SOURCE = HARNESS_PATH.read_text()
BACKENDS = ("process", "docker")
# Time the harness needs to start (bwrap, interpreter, fork) on top of the program's own limit.
STARTUP_GRACE_S = 5.0


class SandboxUnavailable(RuntimeError):
    """The configured backend cannot run on this machine; the message says what is missing."""


@dataclass(frozen=True)
class ExecutionResult:
    """How one program ended.

    status: "passed" (exit 0, or every test of its check passed), "failed" (an AssertionError),
    "error" (any other exception or a non-zero exit), "timeout" (wall or CPU time limit),
    "memory" (MemoryError under the address-space limit), "killed" (a signal: file size, crash).
    returncode: the program's exit status, -N for signal N, None when it did not end by itself.
    stdout/stderr: UTF-8 text, head and tail kept within the sandbox's `output_limit` bytes each.
    feedback: what a learner should read: the failing test's lines and exception, the program's
    traceback, or the limit it hit; truncated to `feedback_limit` characters.
    duration_s: wall seconds from the program's start to its verdict (sandbox start-up excluded).
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    feedback: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Check:
    """Trusted tests run against a candidate's function, after the candidate has loaded.

    The judge executes `setup` (e.g. a HumanEval prompt: helpers the tests use), binds
    `entry_point` to a bridge into the candidate's process, executes `tests`, then `call` (e.g.
    `check(candidate)`). Only plain data crosses the bridge. None of these strings may come from
    the model: they run outside the candidate's process (still inside the sandbox).
    """

    entry_point: str
    tests: str
    setup: str = ""
    call: str = ""


@dataclass(frozen=True)
class SandboxConfig:
    """Knobs of the sandbox; limits are per program. Units in the names.

    This is also the run config's `sandbox:` section (`trainer.config.Config.sandbox`): one
    definition, so a knob added here is a config key at once. Raises ValueError naming the key
    (`sandbox.<key>: ...`) for a value out of range.
    """

    backend: Literal["process", "docker"] = "process"
    workers: int = 2  # programs checked at once (`run_many`'s pool, as environments score a batch)
    allow_network: bool = False  # only where a network namespace cannot be made; never by default
    output_limit_bytes: int = 16384  # kept of each of stdout and stderr
    feedback_limit_chars: int = 2000
    file_size_mb: int = 16  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 64  # RLIMIT_NPROC, threads included
    tmpfs_mb: int = 64  # size of each of /work and /tmp
    # Standard-library modules imported once before the judge forks the candidate: most HumanEval
    # prompts import typing, and importing it in both processes doubled a check's cost.
    preload_modules: tuple[str, ...] = ("typing", "math")
    uid_base: int = 61000  # as root: slot i runs as uid/gid uid_base + i
    # As root: one long-lived bubblewrap sandbox per slot whose zygote forks each program into
    # fresh mount, pid and IPC namespaces (no interpreter start per program). False: a new
    # bubblewrap and interpreter per program (always the case when not root).
    zygote: bool = True
    docker_image: str = "composer-replication:latest"
    docker_python: str = "python3"
    docker_cpus: float = 1.0
    docker_pool: int = 4  # containers, one program at a time in each
    docker_memory_mb: int = 1024  # per container (the program's own limit is RLIMIT_AS inside)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"sandbox.backend: {self.backend!r} is unknown; known: {', '.join(BACKENDS)}")
        positive = ("workers", "output_limit_bytes", "feedback_limit_chars", "file_size_mb", "open_files", "tmpfs_mb")
        for name in (*positive, "docker_pool", "docker_memory_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"sandbox.{name}: must be >= 1, got {getattr(self, name)}")
        if not 8 <= self.processes <= 64:
            raise ValueError(f"sandbox.processes: must be in [8, 64] (a check needs a handful), got {self.processes}")
        if self.docker_cpus <= 0:
            raise ValueError(f"sandbox.docker_cpus: must be > 0, got {self.docker_cpus}")


class Sandbox:
    """A backend. Thread-safe: `run_many` calls `run` from several threads."""

    config: SandboxConfig
    # The judge may kill(-1) at the end: every backend runs it in its own pid namespace (bwrap's, or
    # the container's), where its uid owns nothing but the program's processes.
    kill_all_of_uid = True

    def run(self, source: str, *, timeout_s: float, memory_mb: int, check: Check | None = None) -> ExecutionResult:
        if timeout_s <= 0 or memory_mb < 32:
            raise ValueError(f"need timeout_s > 0 and memory_mb >= 32, got {timeout_s} and {memory_mb}")
        nonce = secrets.token_hex(16)
        job = {
            "kill_all_of_uid": self.kill_all_of_uid,
            "mode": "run" if check is None else "check",
            "source": source,
            "filename": "solution.py",
            "module_name": "__main__" if check is None else "__candidate__",
            "timeout_s": float(timeout_s),
            "output_limit": self.config.output_limit_bytes,
            "preload": list(self.config.preload_modules),
            "limits": {
                "cpu_s": max(1, math.ceil(timeout_s)),
                "memory_mb": int(memory_mb),
                "file_size_mb": self.config.file_size_mb,
                "open_files": self.config.open_files,
                "processes": self.config.processes,
            },
        }
        judge_only = {"nonce": nonce, "check": None if check is None else check.__dict__}
        request = b"".join(_frame(part) for part in (job, judge_only))
        started = time.monotonic()
        out, err, wall_limit_hit = self._execute(request, timeout_s + STARTUP_GRACE_S)
        return self._result(out, err, nonce, wall_limit_hit, time.monotonic() - started)

    def _execute(self, request: bytes, wall_s: float) -> tuple[bytes, bytes, bool]:
        raise NotImplementedError

    def _result(self, out: bytes, err: bytes, nonce: str, wall_limit_hit: bool, elapsed: float) -> ExecutionResult:
        limit = self.config.feedback_limit_chars
        if wall_limit_hit:
            return ExecutionResult("timeout", None, "", "", elapsed, "time limit exceeded")
        try:
            (length,) = struct.unpack(">Q", out[:8])
            report = loads(out[8 : 8 + length])
            if not isinstance(report, dict) or report.get("nonce") != nonce or report.get("status") not in STATUSES:
                raise ValueError("the report does not carry this run's nonce")
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            detail = err.decode("utf-8", "replace")[-limit:]
            return ExecutionResult("error", None, "", detail, elapsed, f"sandbox harness gave no verdict ({exc})")
        return ExecutionResult(
            status=report["status"],
            returncode=report["returncode"],
            stdout=report["stdout"],
            stderr=report["stderr"],
            duration_s=float(report["duration_s"]),
            feedback=_truncate(report["feedback"], limit),
        )

    def close(self) -> None:
        pass


def _frame(obj: dict) -> bytes:
    data = _dumps(obj)
    return struct.pack(">Q", len(data)) + data


def _truncate(text: str, limit: int) -> str:
    """Keep the tail (a traceback's exception line is at the end) within `limit` characters."""
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


class SlotPool:
    """Small integers handed out to concurrent runs (slot i -> uid_base + i as root)."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._next += 1
            return self._next - 1

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)
