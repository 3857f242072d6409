"""An elastic run across three emulated machines (orchestrator.testbed without Docker engines): each
host a network namespace with its own address on a bridge and its own disk (a private mount of its
own folder), the coordinator (`python -m orchestrator.coordinator`: the store behind the gate) on
h1, one `python -m orchestrator.node` per host reaching the store only through its authenticated
tunnel. Mid-run h3 is unplugged (its link down) and plugged back: h1 and h2 go on without it, h3's
replica is healed by a peer and the run ends with three equal replicas.

Needs root and network namespaces (no Docker); skips without them, and fails there under
COMPOSER_REQUIRE_DOCKER=1 as the other test-bed tests do.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.testbed import TestBed, TestBedError
from tests.support.docker_engine import unavailable
from tests.support.paths import REPO
from tests.support.strict_json import read_strict, read_strict_lines

pytestmark = [pytest.mark.integration]

PREFIX, SUBNET = "xtbe", "10.214.0"  # not the Docker bed's names: both may exist on one machine
SECRET = "pytest-elastic-across-0123456789abcdef"
ROUNDS = 60  # at 30 a quiet machine ended the run (0.5 s a round) before h3 was back
SETS = (
    "diloco.elastic=true",
    f"rounds={ROUNDS}",
    "diloco.quorum_timeout_s=60",
    "diloco.heartbeat_s=0.5",
    "diloco.heartbeat_timeout_s=3",
)
UNPLUGGED_S = 12.0


@pytest.fixture(scope="module")
def bed() -> Iterator[TestBed]:
    try:
        TestBed.check(engines=False)
    except TestBedError as error:
        unavailable(f"the multi-host test bed cannot run here: {error}")
    testbed = TestBed(3, engines=False, prefix=PREFIX, subnet=SUBNET)
    try:
        yield testbed.up()
    finally:
        testbed.down()


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
            children = [int(c) for task in tasks for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        found += children
        todo += children
    return found


def workers(node: subprocess.Popen) -> set[int]:
    """The trainer processes (not torchrun's agent) running under a node now."""
    found = set()
    for pid in descendants(node.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"trainer.worker" in argv and b"torch.distributed.run" not in argv:
            found.add(pid)
    return found


def test_an_unplugged_host_leaves_the_others_training_then_heals_and_finishes_with_equal_hashes(bed, tmp_path):
    secret = tmp_path / "run.secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    shared = tmp_path / "runs"  # the path every host uses; each sees its own folder there
    shared.mkdir()
    disks = {h: tmp_path / f"h{h}-disk" for h in (1, 2, 3)}
    for disk in disks.values():
        disk.mkdir()
    common = {
        "PYTHONPATH": str(REPO),
        "COMPOSER_CONFIG": "configs/test.yaml",
        "COMPOSER_RUN": "elastic-across",
        "COMPOSER_SET": " ".join(SETS),
        "COMPOSER_RDZV_PORT": "29400",
        "COMPOSER_RUNS_ROOT": str(shared),
        "COMPOSER_SECRET_FILE": str(secret),
        "OMP_NUM_THREADS": "1",
    }
    env = {k: v for k, v in os.environ.items() if k not in ("COMPOSER_SECRET", "GLOO_SOCKET_IFNAME")}
    logs = {name: tmp_path / f"{name}.log" for name in ("coordinator", "h1", "h2", "h3")}

    def start(host: int, argv: list[str], name: str, extra: dict[str, str]) -> subprocess.Popen:
        command = bed.hosts[host - 1].command(*argv, disk=(disks[host], shared))
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=env | common | extra,
            stdout=logs[name].open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    coordinator = start(
        1,
        [sys.executable, "-m", "orchestrator.coordinator"],
        "coordinator",
        {"COMPOSER_WORKERS": "3", "COMPOSER_GATE_BIND": bed.hosts[0].address},
    )
    deadline = time.monotonic() + 60
    while "reachable only through the gate" not in logs["coordinator"].read_text():
        assert coordinator.poll() is None and time.monotonic() < deadline, logs["coordinator"].read_text()
        time.sleep(0.2)
    nodes = {
        h: start(
            h,
            [sys.executable, "-m", "orchestrator.node"],
            f"h{h}",
            {
                "COMPOSER_COORDINATOR": bed.hosts[0].address,
                "COMPOSER_REPLICA_ID": str(h - 1),
                "COMPOSER_INTERFACE": "eth1",
                "COMPOSER_MAX_RESTARTS": "1",
            },
        )
        for h in (1, 2, 3)
    }
    processes = [coordinator, *nodes.values()]
    pids: dict[int, set[int]] = {h: set() for h in nodes}
    metrics = disks[1] / "elastic-across" / "metrics.jsonl"

    def outer_steps() -> list[dict]:
        if not metrics.exists():
            return []
        return [r for r in read_strict_lines(metrics) if r["event"] == "outer"]

    def watch(until, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not until():
            for h, node in nodes.items():
                pids[h] |= workers(node)
            dead = [p for p in processes if p.poll() is not None and p.returncode != 0]
            assert not dead and time.monotonic() < deadline, f"{what}:\n" + "\n".join(
                f"--- {name}\n{path.read_text()[-2500:]}" for name, path in logs.items()
            )
            time.sleep(0.2)

    try:
        watch(lambda: len(outer_steps()) >= 4, 300, "no outer step 4")
        bed.unplug(bed.hosts[2])
        unplugged_at = len(outer_steps())
        watch(lambda: len(outer_steps()) >= unplugged_at + 3, 120, "h1 and h2 stopped while h3 was away")
        time.sleep(max(0.0, UNPLUGGED_S - 3))
        bed.plug(bed.hosts[2])
        watch(lambda: all(p.poll() is not None for p in processes), 400, "the run did not finish")
        assert all(p.returncode == 0 for p in processes), [p.returncode for p in processes]
    finally:
        bed.plug(bed.hosts[2])
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    run_dir = disks[1] / "elastic-across"
    outer = sorted(outer_steps(), key=lambda r: r["outer_step"])
    assert [r["outer_step"] for r in outer] == list(range(1, ROUNDS + 1))
    left = [r["outer_step"] for r in outer if 2 in r["left"]]
    back = [r["outer_step"] for r in outer if 2 in r["joined"]]
    assert len(left) == 1 and len(back) == 1 and back[0] - left[0] >= 3, [
        (r["outer_step"], r["participant_ids"]) for r in outer
    ]
    for record in outer:  # h1 and h2 took every outer step; h3 all but those it was away for
        away = left[0] <= record["outer_step"] < back[0]
        assert record["participant_ids"] == ([0, 1] if away else [0, 1, 2]), record["outer_step"]
        assert len(set(record["replica_hashes"])) == 1
    assert next(r for r in outer if r["outer_step"] == back[0])["healed"] == [2]
    assert len(pids[1]) == 1 and len(pids[2]) == 1, pids  # h1's and h2's trainers never restarted
    summary = read_strict(run_dir / "summary.json")
    assert summary["status"] == "ok" and summary["final_replicas"] == [0, 1, 2]
    assert len(summary["replica_hashes"]) == 3 and len(set(summary["replica_hashes"])) == 1
    cluster = read_strict(run_dir / "cluster.json")
    assert cluster["status"] == "ok" and cluster["missing_outer_steps"] == []
    assert [e["change"] for e in cluster["membership"]["2"]] == ["left", "healed", "joined"]
    assert cluster["membership"]["0"] == cluster["membership"]["1"] == []
    # each host keeps its own replica's checkpoints; the books are on h1 only
    for host, replica in ((1, 0), (2, 1), (3, 2)):
        last = disks[host] / "elastic-across" / "checkpoints" / f"step-{ROUNDS:06d}"
        assert sorted(p.name for p in last.iterdir()) == [
            "COMPLETE",
            f"replica-{replica}.pt",
            f"replica-{replica}.safetensors",
        ]
    assert not (disks[2] / "elastic-across" / "summary.json").exists()
    # the store listens on h1's loopback only: every connection (heartbeats, quorums, the state
    # transfer's rendezvous) went through the gate, and a direct one from h2 is refused
    port = int(re.search(r"rendezvous store on 127\.0\.0\.1:(\d+)", logs["coordinator"].read_text())[1])
    probe = f"import socket; socket.create_connection(('{bed.hosts[0].address}', {port}), timeout=5)"
    assert subprocess.run(bed.hosts[1].command(sys.executable, "-c", probe), capture_output=True).returncode != 0
    assert "healed by replica 0" in logs["h3"].read_text()
    assert SECRET not in "".join(path.read_text() for path in logs.values())
    assert json.loads(json.dumps(cluster))  # strict JSON read back above
