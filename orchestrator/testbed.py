"""Several emulated machines on one: the test bed for runs across machines (issue 16).

Each emulated host is a network namespace with its own address on a shared bridge and its own
Docker engine (a `dockerd` started inside the namespace with its own data and exec roots and
socket), so a container with host networking sits in that host's namespace, exactly as on a real
machine: `python -m orchestrator serve/join` run inside the namespace (`nsenter --net`) with
DOCKER_HOST at that engine are the commands a user types on each machine. The image travels into
each engine with `docker save` and `docker load`, no registry; it is loaded only when the engine
does not hold that image id yet (the engines' data roots are kept between runs under ROOT for that).

Links: host `hN`'s end in the root namespace is the veth `<prefix>-hN`; `tc` on it shapes what
the host receives, as bench/bench_wan.py shapes container veths; `unplug` / `plug` take the link
down and up (a machine that drops off the network and comes back, its processes alive).

Without engines (`TestBed(n, engines=False)`) a host is its namespace alone: the run's processes
(`python -m orchestrator.coordinator`, `python -m orchestrator.node`) are started in it directly,
each host with its own disk (`EmulatedHost.command(..., disk=(folder, mount point))` bind-mounts a
folder of its own over the shared path in a private mount namespace). That needs no Docker, so the
elastic run across machines is tested wherever root and network namespaces are.

    python -m orchestrator.testbed up --hosts 3      # prints each host's address and DOCKER_HOST
    python -m orchestrator.testbed down

Needs root, `ip`, `nsenter` and (with engines) `dockerd`. Everything it makes is named with PREFIX.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PREFIX = "xtb"
ROOT = Path("/var/tmp/composer-testbed")
SUBNET = "10.213.0"  # hosts at .1, .2, ...; /24
INTERFACE = "eth1"  # each host's side of its link
ENGINE_START_S = 60.0


class TestBedError(RuntimeError):
    """The test bed cannot run here; the message says what is missing."""

    __test__ = False  # not a pytest test class


def _run(*command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if check and result.returncode:
        raise TestBedError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


@dataclass(frozen=True)
class EmulatedHost:
    name: str  # h1, h2, ...
    index: int
    prefix: str = PREFIX
    subnet: str = SUBNET

    @property
    def netns(self) -> str:
        return f"{self.prefix}-{self.name}"

    @property
    def address(self) -> str:
        return f"{self.subnet}.{self.index}"

    @property
    def link(self) -> str:
        """The root-namespace end of the host's veth: shape it with tc."""
        return f"{self.prefix}-{self.name}"

    @property
    def home(self) -> Path:
        return ROOT / self.name if self.prefix == PREFIX else ROOT / f"{self.prefix}-{self.name}"

    @property
    def socket(self) -> Path:
        return self.home / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose `docker` (CLI or SDK) talks to this host's engine."""
        return dict(os.environ if base is None else base) | {"DOCKER_HOST": self.docker_host}

    def command(self, *argv: str, disk: tuple[Path, Path] | None = None) -> list[str]:
        """`argv` run inside this host's network namespace (same files, same processes otherwise).
        `disk` = (folder, mount point): in a private mount namespace, this host sees its own
        `folder` at `mount point`, as a machine sees its own disk under a path all machines use."""
        if disk is None:
            return ["nsenter", f"--net=/var/run/netns/{self.netns}", *argv]
        folder, mount_point = disk
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        return [
            "nsenter",
            f"--net=/var/run/netns/{self.netns}",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(folder),
            str(mount_point),
            *argv,
        ]

    def engine_answers(self) -> bool:
        return _run("docker", "info", check=False, env=self.env()).returncode == 0


class TestBed:
    __test__ = False  # not a pytest test class

    def __init__(self, hosts: int, *, engines: bool = True, prefix: str = PREFIX, subnet: str = SUBNET) -> None:
        """`engines`: a dockerd per host (False: namespaces and links only). `prefix` / `subnet`:
        another bed's names and addresses, so that two beds can exist side by side."""
        self.hosts = [EmulatedHost(f"h{i}", i, prefix, subnet) for i in range(1, hosts + 1)]
        self.engines = engines
        self.prefix = prefix
        self.bridge = f"{prefix}-br"

    @property
    def _forward_rule(self) -> list[str]:
        return [
            "FORWARD", "-i", self.bridge, "-o", self.bridge, "-m", "comment", "--comment", self.prefix, "-j", "ACCEPT"
        ]  # fmt: skip

    @staticmethod
    def check(engines: bool = True) -> None:
        """Raises TestBedError naming what this machine lacks (`engines` False: no Docker needed)."""
        if os.geteuid() != 0:
            raise TestBedError("the multi-host test bed needs root (network namespaces, dockerd)")
        tools = ("ip", "nsenter", "dockerd", "docker", "tc") if engines else ("ip", "nsenter", "unshare", "mount")
        for tool in tools:
            if shutil.which(tool) is None:
                raise TestBedError(f"the multi-host test bed needs {tool!r} on PATH")

    def up(self) -> TestBed:
        self.check(self.engines)
        if _run("ip", "link", "show", self.bridge, check=False).returncode:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        if shutil.which("iptables") and _run("iptables", "-C", *self._forward_rule, check=False).returncode:
            # Docker's FORWARD policy is DROP and bridged frames pass iptables (br_netfilter).
            _run("iptables", "-I", *self._forward_rule[:1], "1", *self._forward_rule[1:])
        for host in self.hosts:
            self._network(host)
            if self.engines:
                self._engine(host)
        return self

    def unplug(self, host: EmulatedHost) -> None:
        """The host drops off the network (its link down); its processes run on."""
        _run("ip", "link", "set", host.link, "down")

    def plug(self, host: EmulatedHost) -> None:
        """Its link up again, on the bridge."""
        _run("ip", "link", "set", host.link, "master", self.bridge, "up")

    def _network(self, host: EmulatedHost) -> None:
        if _run("ip", "netns", "exec", host.netns, "true", check=False).returncode:
            _run("ip", "netns", "add", host.netns)
        if _run("ip", "link", "show", host.link, check=False).returncode:
            _run("ip", "link", "add", host.link, "type", "veth", "peer", "name", INTERFACE, "netns", host.netns)
        _run("ip", "link", "set", host.link, "master", self.bridge, "up")
        inside = ["ip", "netns", "exec", host.netns]
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "link", "set", INTERFACE, "up")
        addresses = _run(*inside, "ip", "-4", "-o", "addr", "show", "dev", INTERFACE).stdout
        if f"{host.address}/24" not in addresses:
            _run(*inside, "ip", "addr", "add", f"{host.address}/24", "dev", INTERFACE)

    def _engine(self, host: EmulatedHost) -> None:
        if host.engine_answers():
            return
        host.home.mkdir(parents=True, exist_ok=True)
        log = (host.home / "dockerd.log").open("ab")
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mounts dockerd needs.
        subprocess.Popen(
            host.command(
                "dockerd",
                f"--data-root={host.home / 'data'}",
                f"--exec-root={host.home / 'exec'}",
                f"--host={host.docker_host}",
                f"--pidfile={host.home / 'dockerd.pid'}",
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
            ),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + ENGINE_START_S
        while not host.engine_answers():
            if time.monotonic() > deadline:
                tail = (host.home / "dockerd.log").read_text(errors="replace").splitlines()[-5:]
                raise TestBedError(f"dockerd of {host.name} did not answer in {ENGINE_START_S:.0f} s: {tail}")
            time.sleep(0.5)

    def load_image(self, image: str, source_env: dict[str, str] | None = None) -> dict[str, float]:
        """`docker save` once, `docker load` into every host whose engine lacks this image id (in
        parallel); returns the seconds each host's load took (0.0: it held the image already)."""
        wanted = _run("docker", "image", "inspect", "--format", "{{.Id}}", image, env=source_env).stdout.strip()
        missing = [
            host
            for host in self.hosts
            if _run(
                "docker", "image", "inspect", "--format", "{{.Id}}", image, check=False, env=host.env()
            ).stdout.strip()
            != wanted
        ]
        seconds = {host.name: 0.0 for host in self.hosts}
        if not missing:
            return seconds
        ROOT.mkdir(parents=True, exist_ok=True)
        archive = ROOT / "image.tar"
        started = time.monotonic()
        _run("docker", "save", "--output", str(archive), image, env=source_env)
        saved = time.monotonic() - started

        def load(host: EmulatedHost) -> None:
            began = time.monotonic()
            _run("docker", "load", "--input", str(archive), env=host.env())
            seconds[host.name] = round(saved + time.monotonic() - began, 1)

        try:
            with ThreadPoolExecutor(len(missing)) as pool:
                list(pool.map(load, missing))
        finally:
            archive.unlink(missing_ok=True)
        return seconds

    def down(self, purge: bool = False) -> None:
        """Stop the engines (their containers die with them) and remove the namespaces and links;
        `purge` also deletes the engines' data roots (the loaded images)."""
        for host in self.hosts:
            pidfile = host.home / "dockerd.pid"
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
                deadline = time.monotonic() + 30
                while pidfile.exists() and time.monotonic() < deadline:
                    time.sleep(0.5)
            _run("ip", "link", "del", host.link, check=False)
            _run("ip", "netns", "del", host.netns, check=False)
            if purge:
                shutil.rmtree(host.home, ignore_errors=True)
        _run("ip", "link", "del", self.bridge, check=False)
        if shutil.which("iptables"):
            _run("iptables", "-D", *self._forward_rule, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.testbed", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--image", help="load this image into every host (docker save | docker load)")
    parser.add_argument("--purge", action="store_true", help="down: delete the engines' data roots too")
    args = parser.parse_args(argv)
    bed = TestBed(args.hosts)
    try:
        if args.action == "down":
            bed.down(purge=args.purge)
            return 0
        bed.up()
        if args.image:
            print(f"loaded {args.image}: {bed.load_image(args.image)} s")
    except TestBedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for host in bed.hosts:
        print(
            f"{host.name}: {host.address} on {INTERFACE}, DOCKER_HOST={host.docker_host}, "
            f"nsenter --net=/var/run/netns/{host.netns}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
