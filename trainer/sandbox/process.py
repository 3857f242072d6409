"""The `process` backend: bubblewrap around each program (see the package docstring).

As root each concurrent slot keeps one bubblewrap sandbox whose zygote (the harness in zygote mode)
forks every program into fresh namespaces; otherwise each program gets its own bubblewrap and
interpreter.
"""

from __future__ import annotations

import atexit
import json
import os
import py_compile
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
from concurrent.futures import ThreadPoolExecutor

from trainer.sandbox.base import HARNESS_PATH, Sandbox, SandboxConfig, SandboxUnavailable, SlotPool
from trainer.sandbox.harness import loads


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
        self._slots = SlotPool()
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
