"""Entry point of a worker container (`python -m orchestrator.node`): one torchrun node.

It finds this container's address and stable replica index, waits for the coordinator to publish
the world size and rendezvous id, runs torchrun for `trainer.worker`, and marks the replica done
in the coordinator's store when torchrun exits 0. It never talks to Docker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta

from torch.distributed import TCPStore

from orchestrator.cluster import (
    KEY_NNODES,
    KEY_RDZV_ID,
    KEY_RUN_DIR,
    ClusterError,
    RunSettings,
    connect_store,
    key_done,
    key_replica_of,
    key_starts,
    torchrun_command,
)

STORE_WAIT_S = 600.0


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


def main() -> int:
    env = dict(os.environ)
    settings = RunSettings.from_env(env)
    address = container_address()
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
    print(
        f"[node] replica {replica} of {nnodes} at {address}, start {start}, "
        f"rendezvous {settings.coordinator}:{settings.port} id {rdzv_id}",
        flush=True,
    )
    child_env = env | {
        "COMPOSER_REPLICA_ID": str(replica),
        "COMPOSER_RUN_DIR": run_dir,
    }
    command = torchrun_command(settings, nnodes=nnodes, rdzv_id=rdzv_id, local_addr=address)
    child = subprocess.Popen(command, env=child_env)
    # As PID 1 this process receives `docker stop`'s SIGTERM: hand it to torchrun, which stops
    # its workers cleanly, instead of dying and leaving them to the kernel.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: child.send_signal(received))
    code = child.wait()
    code = 128 - code if code < 0 else code  # killed by signal N: exit 128 + N, as a shell would
    if code == 0:
        store.set(key_done(replica), str(start))
    print(f"[node] replica {replica}: torchrun exited {code}", flush=True)
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClusterError as error:
        print(f"[node] error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
