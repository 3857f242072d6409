"""The `docker` backend: a pool of long-lived, locked-down containers (see the package docstring).

It talks to Docker through its CLI, not the SDK: trainer/ does not depend on the docker package.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import threading
import uuid

from trainer.sandbox.base import HARNESS_SOURCE, Sandbox, SandboxConfig, SandboxUnavailable

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
