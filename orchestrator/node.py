"""Entry point of a worker container (`python -m orchestrator.node`): one torchrun node.

It finds this container's address and stable replica index, waits for the coordinator to publish
the world size and rendezvous id, runs torchrun for `trainer.worker`, and marks the replica done
in the coordinator's store when torchrun exits 0. It never talks to Docker.

Across machines (`python -m orchestrator join`, issue 16) the launcher also sets
COMPOSER_INTERFACE (the network interface the collectives bind to: its address is advertised to
the other nodes and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set to it) and
COMPOSER_SECRET_FILE (the run's secret, mounted read-only): the node then reaches the
coordinator's store only through an authenticated `orchestrator.gate.Tunnel`, and bumps a
heartbeat counter there so that the coordinator can name a host that is gone.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from torch.distributed import TCPStore

from orchestrator.cluster import (
    KEY_NNODES,
    KEY_RDZV_ID,
    KEY_RUN_DIR,
    ClusterError,
    RunSettings,
    connect_store,
    elastic_command,
    interface_address,
    key_beat,
    key_done,
    key_replica_of,
    key_starts,
    torchrun_command,
)
from orchestrator.gate import SECRET_ENV, SECRET_FILE_ENV, GateError, Tunnel, load_secret, request
from trainer.config import ConfigError, load_config
from trainer.run.placement import is_finished

STORE_WAIT_S = 600.0
BEAT_S = 5.0
GATE_TIMEOUT_S = 30.0


def container_address() -> str:
    """The container's IP: its hostname is a short id that other containers cannot resolve, so
    torchrun must advertise the address (`--local-addr`)."""
    return socket.gethostbyname(socket.gethostname())


def replica_index(store: TCPStore, env: dict[str, str]) -> int:
    """COMPOSER_REPLICA_ID when the launcher set it, else the index the Compose coordinator
    published for this container (its hostname is the short container id)."""
    if env.get("COMPOSER_REPLICA_ID"):
        try:
            return int(env["COMPOSER_REPLICA_ID"])
        except ValueError:
            raise ClusterError(f"COMPOSER_REPLICA_ID={env['COMPOSER_REPLICA_ID']!r} is not an integer") from None
    return int(store.get(key_replica_of(socket.gethostname())))


def choose_interface(env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """This node's address, and the environment that binds the collectives to COMPOSER_INTERFACE
    when it is set (logged: the wrong card is the most common multi-node failure)."""
    interface = env.get("COMPOSER_INTERFACE")
    if not interface:
        return container_address(), {}
    address = interface_address(interface)
    print(
        f"[node] interface {interface} ({address}): torchrun advertises it, Gloo and NCCL bind to it "
        "(GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)",
        flush=True,
    )
    return address, {"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface}


def through_gate(settings: RunSettings, env: dict[str, str]) -> RunSettings:
    """With a run secret, the store is reached through an authenticated tunnel on loopback: the
    settings torchrun and this node then use. Without one (one Docker host), unchanged."""
    if not (env.get(SECRET_FILE_ENV) or env.get(SECRET_ENV)):
        return settings
    secret = load_secret(env)
    gate = (settings.coordinator, settings.port)
    deadline = time.monotonic() + STORE_WAIT_S
    while True:  # fail fast on a refused secret; wait (bounded) for a coordinator that restarts
        try:
            request(secret, gate, {"kind": "ping"}, timeout_s=GATE_TIMEOUT_S)
            break
        except GateError as error:
            # "refused this machine" is the gate's answer; "(Connection refused)" only a coordinator
            # still starting, which is waited for like one that restarts
            if "refused this machine" in str(error) or "secret" in str(error) or time.monotonic() > deadline:
                raise ClusterError(str(error)) from None
            time.sleep(2.0)
    tunnel = Tunnel(secret, gate, timeout_s=GATE_TIMEOUT_S)
    print(f"[node] store through the gate at {gate[0]}:{gate[1]} (authenticated, tunnel 127.0.0.1:{tunnel.port})")
    return dataclasses.replace(settings, coordinator="127.0.0.1", port=tunnel.port)


def heartbeat(settings: RunSettings, replica: int) -> None:
    """Bump the replica's heartbeat counter every BEAT_S seconds, for as long as the node lives."""
    store = None
    while True:
        try:
            timeout = timedelta(seconds=30)
            store = store or TCPStore(settings.coordinator, settings.port, is_master=False, timeout=timeout)
            store.add(key_beat(replica), 1)
        except (RuntimeError, TimeoutError):
            store = None  # the coordinator restarts or the link is down: try again next beat
        time.sleep(BEAT_S)


def elastic_run(settings: RunSettings) -> bool:
    """Whether the run's config asks for elastic DiLoCo (`diloco.elastic`)."""
    try:
        return load_config(settings.config, list(settings.overrides)).diloco.elastic
    except ConfigError as error:
        raise ClusterError(str(error)) from None


def after_the_end(code: int, run_dir: Path, replica: int) -> int:
    """torchrun's exit status, or 0 when it failed after the run had ended.

    The trainer writes summary.json once every replica has finished (their final hashes are in
    it). A worker that dies after that, in a library's teardown, makes torchrun restart the group
    (the restarted trainers find the run done, `trainer.worker.place_run`), unless a peer's agent
    has already left and closed the rendezvous: then torchrun fails, and restarting the container
    could only fail again on the closed rendezvous. The run is over and its verdict is in the
    summary, which the coordinator reports; this node's part is done. (Across machines only the
    lead's host holds summary.json; the other hosts see the failure.)
    """
    if code != 0 and is_finished(run_dir):
        print(
            f"[node] replica {replica}: torchrun exited {code} after the run had ended "
            f"({run_dir / 'summary.json'} is written): this node is done",
            flush=True,
        )
        return 0
    return code


def main() -> int:
    env = dict(os.environ)
    env.pop(SECRET_ENV, None)  # torchrun and the trainer never need the secret
    settings = RunSettings.from_env(os.environ)
    address, bind_env = choose_interface(env)
    env |= bind_env
    settings = through_gate(settings, dict(os.environ))
    store = connect_store(settings.coordinator, settings.port, timeout_s=STORE_WAIT_S)
    store.set_timeout(timedelta(seconds=STORE_WAIT_S))
    print(f"[node] {socket.gethostname()} at {address}: joined the coordinator's store", flush=True)
    replica = replica_index(store, env)
    start = store.add(key_starts(replica), 1)
    nnodes = int(store.get(KEY_NNODES))
    rdzv_id = store.get(KEY_RDZV_ID).decode()
    run_dir = store.get(KEY_RUN_DIR).decode()  # the coordinator's choice, so both follow the same run
    if not 0 <= replica < nnodes:
        raise ClusterError(
            f"replica index {replica} is outside a world of {nnodes} workers; "
            "remove stale worker containers (docker compose down) and start again"
        )
    if settings.coordinator == "127.0.0.1" and (env.get(SECRET_FILE_ENV) or os.environ.get(SECRET_ENV)):
        threading.Thread(target=heartbeat, args=(settings, replica), name="heartbeat", daemon=True).start()
    print(
        f"[node] replica {replica} of {nnodes} at {address}, start {start}, "
        f"rendezvous {settings.coordinator}:{settings.port} id {rdzv_id}",
        flush=True,
    )
    child_env = env | {
        "COMPOSER_REPLICA_ID": str(replica),
        "COMPOSER_RUN_DIR": run_dir,
    }
    if elastic_run(settings):
        # Each replica its own world; the replicas meet in the coordinator's store (across machines
        # through this node's authenticated tunnel), so every connection still passes the gate.
        endpoint = f"{settings.coordinator}:{settings.port}"
        child_env |= {"COMPOSER_ELASTIC_STORE": endpoint, "COMPOSER_REPLICAS": str(nnodes)}
        command = elastic_command(settings)
    else:
        command = torchrun_command(settings, nnodes=nnodes, rdzv_id=rdzv_id, local_addr=address)
    child = subprocess.Popen(command, env=child_env)
    # As PID 1 this process receives `docker stop`'s SIGTERM: hand it to torchrun, which stops
    # its workers cleanly, instead of dying and leaving them to the kernel.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: child.send_signal(received))
    code = child.wait()
    code = 128 - code if code < 0 else code  # killed by signal N: exit 128 + N, as a shell would
    code = after_the_end(code, Path(run_dir), replica)
    if code == 0:
        store.set(key_done(replica), str(start))
        # set() does not wait for an answer, and across machines the tunnel that carries it runs
        # in this process's threads: read it back, so it has reached the store before we exit.
        store.get(key_done(replica))
    print(f"[node] replica {replica}: torchrun exited {code}", flush=True)
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClusterError as error:
        print(f"[node] error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
