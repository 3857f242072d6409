"""The in-cluster side of the orchestrator (`python -m orchestrator.coordinator`).

It hosts the rendezvous store on port 29400 for the whole run, so that the death of any worker,
the one holding rank 0 included, leaves the survivors a live store to re-rendezvous on (upstream
pytorch issue 135712). It publishes the world size, follows `metrics.jsonl`, waits until every
replica has finished, writes `cluster.json`, and exits with the run's status.

World size: COMPOSER_WORKERS when the host orchestrator set it; otherwise (Compose) the number of
worker containers of this Compose project, counted through the Docker socket. In that case it
also restarts dead workers, since no host process is there to do it.

Across machines (`python -m orchestrator serve`, issue 16; a run secret in COMPOSER_SECRET_FILE)
the store listens on loopback only and the port faces the network through an
`orchestrator.gate.Gate`: only holders of the secret reach the store, and a machine joins with a
`hello` that the coordinator answers with its replica indices (the same ones again when a host
comes back under its name) or refuses in one line naming what differs (image, config, a full
world). Heartbeats tell it which host is gone: one silent for COMPOSER_HOST_TIMEOUT_S fails the
run by name, and cluster.json lists every host with its replicas and when it was last heard.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import docker
from torch.distributed import TCPStore

from orchestrator import gate
from orchestrator.cluster import (
    COMPOSE_PROJECT,
    COMPOSE_SERVICE,
    KEY_NNODES,
    KEY_RDZV_ID,
    KEY_RUN_DIR,
    TRAINER_USER,
    ClusterError,
    RunSettings,
    compose_replica_index,
    int_env,
    key_beat,
    key_done,
    key_replica_of,
    key_starts,
)
from orchestrator.follow import follow
from orchestrator.progress import MetricsTail, RunProgress, missing_outer_steps
from orchestrator.supervisor import WorkerSupervisor
from trainer.config import ConfigError, dump_config, load_config
from trainer.run.placement import choose_run_dir, config_differences, write_json

PROGRESS_EVERY_S = 20.0


def log(message: str) -> None:
    print(f"[coordinator] {message}", flush=True)


def compose_worker_labels(client: docker.DockerClient) -> dict[str, str]:
    """The labels that select this Compose project's worker containers."""
    own = client.containers.get(socket.gethostname())
    project = own.labels.get(COMPOSE_PROJECT)
    if not project:
        raise ClusterError("COMPOSER_WORKERS is unset and this container was not started by Compose")
    return {COMPOSE_PROJECT: project, COMPOSE_SERVICE: "worker"}


def count_workers(
    client: docker.DockerClient, labels: dict[str, str], settle_s: float = 3.0, timeout_s: float = 120.0
) -> int:
    """Worker containers of the project, once their number has held still for `settle_s`.

    Compose creates every container of `up --scale worker=N` before it starts the first, so the
    count is exact almost at once; the settling only guards against a slow daemon.
    """
    filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
    deadline = time.monotonic() + timeout_s
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(client.containers.list(all=True, filters=filters))
        if now != count:
            count, since = now, time.monotonic()
        elif count > 0 and time.monotonic() - since >= settle_s:
            return count
        time.sleep(0.5)
    raise ClusterError(f"no stable set of worker containers with labels {labels} after {timeout_s:.0f} s")


def hand_over(path: Path, uid: int, gid: int) -> None:
    """chown -R: the trainer writes the run as a non-root user; the host user gets it back."""
    for directory, _, files in os.walk(path):
        os.chown(directory, uid, gid)
        for name in files:
            os.chown(os.path.join(directory, name), uid, gid)


def trainer_account() -> pwd.struct_passwd | None:
    """The image's non-root trainer user, when this process (root in the image) must hand the
    run directory to it; None outside the image or when not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(TRAINER_USER)
    except KeyError:
        return None


def cluster_summary(run_dir: Path, progress: RunProgress, *, finished: bool, reason: str) -> dict[str, Any]:
    """The run as the coordinator saw it, with the trainer's own verdict read from summary.json.

    The worker decides whether the run is ok (its `status`, and whether its replicas were expected
    to agree and did: Streaming DiLoCo's legitimately differ); this adds only what the coordinator
    alone can see: outer steps missing from metrics.jsonl and workers it gave up on. A summary
    written before the verdict fields existed is read as "replicas expected to agree".
    """
    summary_path = run_dir / "summary.json"
    trainer_summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    expected = int(trainer_summary.get("outer_steps", 0))
    missing = missing_outer_steps(progress.outer_steps, expected)
    hashes = trainer_summary.get("replica_hashes") or []
    expected_to_agree = bool(trainer_summary.get("replicas_expected_to_agree", True))
    agree = bool(trainer_summary.get("replicas_agree", len(hashes) > 0 and len(set(hashes)) == 1))
    status = trainer_summary.get("status")
    ok = finished and status == "ok" and not missing and (agree or not expected_to_agree)
    if finished and not ok:
        if status != "ok":
            why = trainer_summary.get("reason")
            reason = f"{summary_path} says status {status!r}" + (f": {why}" if why else "")
        elif missing:
            reason = f"outer steps {missing} missing from metrics.jsonl"
        else:
            reason = f"replica hashes differ: {hashes}"
    return {
        "status": "ok" if ok else "failed",
        "reason": "" if ok else reason,
        "outer_steps": expected,
        "outer_steps_seen": len(progress.outer_steps),
        "missing_outer_steps": missing,
        "resumes": progress.resumes,
        "replicas_expected_to_agree": expected_to_agree,
        "replicas_agree": agree,
        "final_param_hash": trainer_summary.get("final_param_hash"),
    }


def same_image(ours: str, theirs: str) -> bool:
    """Images as `orchestrator.images.image_identity` writes them ("<id> source <hash>"): the same
    image id (`docker save | docker load` keeps it), or the same source hash (a build of the same
    tree elsewhere: every file the Dockerfile copies, the wheel names, the base image)."""
    our_id, _, our_source = ours.partition(" source ")
    their_id, _, their_source = theirs.partition(" source ")
    return our_id == their_id or bool(our_source) and our_source == their_source


def _machine(address: str) -> str:
    """The machine part of an address: "10.0.0.1:5000" -> "10.0.0.1" (a peer's port changes per
    connection); an address without a port as it is."""
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def _shown(value: Any) -> str:
    return "<absent>" if value is None else json.dumps(value)


def _flat(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


class Membership:
    """Which machine holds which replicas, and whether a machine may join (issue 16).

    A host is known by the name it joins with; it gets the lowest free replica indices, and the
    same ones again when it comes back (so it resumes its own checkpoints). A host whose image or
    config differs from the coordinator's is refused with one line naming the difference.
    """

    def __init__(self, world: int, image: str, config: dict[str, Any], own: tuple[str, int, str] | None = None) -> None:
        """`own`: the coordinator's machine (name, workers, address); it holds replicas 0.. from the
        start, so replica 0, whose first process writes the books, is on the machine that keeps them."""
        self.world, self.image, self.config = world, image, config
        self.run_dir = ""  # the coordinator's choice, told to every host
        self.hosts: dict[str, dict[str, Any]] = {}
        if own is not None:
            name, workers, address = own
            self.hosts[name] = {"replicas": list(range(workers)), "address": address, "joins": 0}
        self.lock = threading.Lock()

    def admit(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        if request.get("kind") == "ping":
            return {"ok": True}
        name, workers = str(request.get("host", "")), int(request.get("workers", 0))
        if not same_image(request.get("image", ""), self.image):
            return {
                "ok": False,
                "error": f"image differs: this host runs {request.get('image')}, the coordinator {self.image}",
            }
        differing = config_differences(self.config, request.get("config") or {})
        if differing:
            ours, theirs = self.config, request["config"]
            shown = "; ".join(
                f"{key} (coordinator {_shown(_flat(ours, key))}, this host {_shown(_flat(theirs, key))})"
                for key in differing[:5]
            )
            more = f" and {len(differing) - 5} more" if len(differing) > 5 else ""
            return {"ok": False, "error": f"config differs from the coordinator's at {shown}{more}"}
        with self.lock:
            known = self.hosts.get(name)
            address = request.get("address") or peer
            if known is not None and _machine(address) != _machine(known["address"]):
                # Two machines with one hostname (cloud images named `ubuntu`) would otherwise share
                # replicas as if one had rejoined, and a replica would have no host.
                return {
                    "ok": False,
                    "error": f"host name {name} is already in this run at {_machine(known['address'])}; give this "
                    f"machine ({_machine(address)}) its own --name (a host that comes back rejoins from its address)",
                }
            if known is not None:
                if len(known["replicas"]) != workers:
                    return {
                        "ok": False,
                        "error": f"host {name} joined before with {len(known['replicas'])} workers; join with as many",
                    }
                known["address"], known["joins"] = address, known["joins"] + 1
                rejoined = known["joins"] > 1
                return {"ok": True, "replicas": known["replicas"], "rejoined": rejoined, "run_dir": self.run_dir}
            taken = {r for host in self.hosts.values() for r in host["replicas"]}
            free = [r for r in range(self.world) if r not in taken]
            if workers < 1 or workers > len(free):
                return {
                    "ok": False,
                    "error": f"the run has {self.world} replicas and {len(free)} are free "
                    f"({', '.join(sorted(self.hosts)) or 'no host'} joined); this host asked for {workers}",
                }
            self.hosts[name] = {
                "replicas": free[:workers],
                "address": address,
                "joins": 1,
            }
            return {"ok": True, "replicas": free[:workers], "rejoined": False, "run_dir": self.run_dir}


class Coordinator:
    def __init__(self, settings: RunSettings, env: dict[str, str]) -> None:
        self.settings = settings
        self.run_dir = choose_run_dir(Path(settings.run_dir))
        if self.run_dir != Path(settings.run_dir):
            log(f"{settings.run_dir} holds a finished run; this run writes to {self.run_dir}")
        self.started = time.time()
        self.started_monotonic = time.monotonic()
        self.stop_requested = False
        self.supervisor: WorkerSupervisor | None = None
        self.fixed_workers = int_env(env, "COMPOSER_WORKERS", 0) or None
        self.worker_restarts = int_env(env, "COMPOSER_WORKER_RESTARTS", 3)
        self.docker: docker.DockerClient | None = None
        self.secret = gate.load_secret(env) if env.get(gate.SECRET_FILE_ENV) or env.get(gate.SECRET_ENV) else None
        self.membership: Membership | None = None
        self.host_timeout_s = int_env(env, "COMPOSER_HOST_TIMEOUT_S", 600)
        if self.secret is not None:
            if self.fixed_workers is None:
                raise ClusterError("COMPOSER_WORKERS (the run's replicas over all hosts) must be set across machines")
            try:
                config = dump_config(load_config(settings.config, list(settings.overrides)))
            except ConfigError as error:
                raise ClusterError(str(error)) from None
            own = None
            if env.get("COMPOSER_HOST_NAME"):
                workers = int_env(env, "COMPOSER_HOST_WORKERS", 1)
                own = (env["COMPOSER_HOST_NAME"], workers, env.get("COMPOSER_GATE_BIND", ""))
            self.membership = Membership(self.fixed_workers, env.get("COMPOSER_IMAGE_ID", ""), config, own)
            self.membership.run_dir = str(self.run_dir)
        if self.fixed_workers is None:
            try:
                self.docker = docker.from_env()
                self.docker.ping()
            except docker.errors.DockerException as error:
                raise ClusterError(
                    f"COMPOSER_WORKERS is unset and the Docker socket does not answer ({error}): "
                    "mount /var/run/docker.sock into the coordinator or set COMPOSER_WORKERS"
                ) from error

    def open_store(self) -> TCPStore:
        """The rendezvous store: on the run's port, or, behind a gate, on a loopback-only port."""
        if self.membership is None:
            port = self.settings.port
            store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
            log(f"rendezvous store on port {self.settings.port}")
            return store
        store = gate.loopback_store()
        port = store.port
        bind = os.environ.get("COMPOSER_GATE_BIND", "0.0.0.0")
        self.gate = gate.Gate(self.secret, (bind, self.settings.port), port, self.membership.admit, log=log).start()
        log(
            f"rendezvous store on 127.0.0.1:{port}, reachable only through the gate on {bind}:{self.settings.port} "
            f"(secret {gate.fingerprint(self.secret)}; {self.fixed_workers} replicas over all hosts)"
        )
        return store

    def run(self) -> int:
        store = self.open_store()
        if self.fixed_workers is not None:
            nnodes = self.fixed_workers
        else:
            labels = compose_worker_labels(self.docker)
            nnodes = count_workers(self.docker, labels)
            self.supervisor = WorkerSupervisor(self.docker, labels, self.worker_restarts)
        if nnodes < 1:
            raise ClusterError(f"a run needs at least one worker, got {nnodes}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        trainer = trainer_account()
        if trainer is not None:
            hand_over(self.run_dir, trainer.pw_uid, trainer.pw_gid)
        rdzv_id = f"{self.settings.run}-{uuid.uuid4().hex[:8]}"
        store.set(KEY_RDZV_ID, rdzv_id)
        store.set(KEY_RUN_DIR, str(self.run_dir))
        store.set(KEY_NNODES, str(nnodes))
        log(f"run {self.settings.run}: {nnodes} workers, config {self.settings.config}, rendezvous id {rdzv_id}")
        try:
            finished, reason = self._follow(store, nnodes)
            return self._finish(store, nnodes, rdzv_id, finished, reason)
        finally:
            if trainer is not None:
                owner = self.run_dir.parent.stat()
                hand_over(self.run_dir, owner.st_uid, owner.st_gid)

    def _follow(self, store: TCPStore, nnodes: int) -> tuple[bool, str]:
        self.tail = MetricsTail(self.run_dir / "metrics.jsonl")
        self.progress = RunProgress()
        done_keys = [key_done(replica) for replica in range(nnodes)]
        self.beats: dict[int, tuple[int, float]] = {}  # replica -> (counter, when it last moved)

        def gone() -> str | None:
            hosts = self._gone_hosts(store, done_keys) if self.membership is not None else []
            return "; ".join(hosts) or None

        return follow(
            out=log,
            done=lambda: store.check(done_keys),
            supervisor=self.supervisor,
            progress=self.progress,
            tail=self.tail,
            failure=gone,
            each_poll=lambda: self._publish_replica_indices(store),
            stopped=lambda: self.stop_requested,
            progress_every_s=PROGRESS_EVERY_S,
        )

    def _gone_hosts(self, store: TCPStore, done_keys: list[str]) -> list[str]:
        """Hosts whose every unfinished replica has sent no heartbeat for host_timeout_s."""
        now = time.monotonic()
        for replica in range(len(done_keys)):
            count = int(store.add(key_beat(replica), 0))
            if self.beats.get(replica, (None, 0.0))[0] != count:
                self.beats[replica] = (count, now)
        gone = []
        for name, host in sorted(self.membership.hosts.items()):
            waiting = [r for r in host["replicas"] if not store.check([done_keys[r]])]
            silent = [now - self.beats.get(r, (0, self.started_monotonic))[1] for r in waiting]
            if waiting and min(silent) > self.host_timeout_s:
                gone.append(
                    f"host {name} ({host['address']}, replicas {waiting}) is gone: no heartbeat for {min(silent):.0f} s"
                )
        return gone

    def hosts_report(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            name: {
                "address": host["address"],
                "replicas": host["replicas"],
                "joins": host["joins"],
                "last_heard_s": round(
                    min(now - self.beats.get(r, (0, self.started_monotonic))[1] for r in host["replicas"]), 1
                ),
            }
            for name, host in sorted(self.membership.hosts.items())
        }

    def _publish_replica_indices(self, store: TCPStore) -> None:
        """Tells each worker container its replica index: Compose knows it, the container not."""
        for container in self.supervisor.workers():
            store.set(key_replica_of(container.id[:12]), str(compose_replica_index(container.labels)))

    def _finish(self, store: TCPStore, nnodes: int, rdzv_id: str, finished: bool, reason: str) -> int:
        self.progress.update(self.tail.read())
        report = cluster_summary(self.run_dir, self.progress, finished=finished, reason=reason)
        starts = {replica: int(store.add(key_starts(replica), 0)) for replica in range(nnodes)}
        report |= {
            "run": self.settings.run,
            "config": self.settings.config,
            "rdzv_id": rdzv_id,
            "workers": nnodes,
            "restarts": {str(replica): max(count - 1, 0) for replica, count in starts.items()},
            "seconds": round(time.time() - self.started, 1),
            "first_outer_step_s": (
                round(self.progress.first_outer_at - self.started, 1) if self.progress.first_outer_at else None
            ),
        }
        if self.membership is not None:
            report["hosts"] = self.hosts_report()
        if self.progress.elastic:  # every replica's membership changes, from the outer records
            report["membership"] = {str(r): self.progress.membership.get(r, []) for r in range(nnodes)}
        if self.run_dir.exists():  # atomic and strict JSON, as summary.json
            write_json(self.run_dir / "cluster.json", report)
        log(f"run {report['status']}: {json.dumps(report)}")
        return 0 if report["status"] == "ok" else 1


def main() -> int:
    try:
        coordinator = Coordinator(RunSettings.from_env(), dict(os.environ))

        def request_stop(_signum: int, _frame: Any) -> None:
            coordinator.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        return coordinator.run()
    except (ClusterError, gate.GateError) as error:
        log(f"error: {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
