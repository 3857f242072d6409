"""The gate in front of the rendezvous store (orchestrator.gate) and the coordinator's membership
rules, over real loopback sockets and a real TCPStore."""

from __future__ import annotations

import socket
import threading
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from orchestrator import gate
from orchestrator.cluster import ClusterError, route_interface
from orchestrator.coordinator import Membership

SECRET = b"correct horse battery staple 42"
CONFIG = {"seed": 0, "optim": {"lr": 0.001, "sft_steps": 20}, "diloco": {"sync_every": 2}}


def admit_all(request: dict, peer: str) -> dict:
    return {"ok": True, "echo": request, "peer_host": peer.split(":")[0]}


@pytest.fixture
def store_behind_gate():
    """A loopback-only TCPStore and a gate on another port in front of it."""
    store = gate.loopback_store(timeout_s=10)
    port = store.port
    logged: list[str] = []
    front = gate.Gate(SECRET, ("127.0.0.1", 0), port, admit_all, log=logged.append).start()
    yield store, front, logged
    front.close()


def test_a_tunnel_with_the_secret_reaches_the_store_and_sees_what_the_coordinator_wrote(store_behind_gate) -> None:
    store, front, logged = store_behind_gate
    store.set("composer/nnodes", "3")
    tunnel = gate.Tunnel(SECRET, ("127.0.0.1", front.port))
    client = TCPStore("127.0.0.1", tunnel.port, is_master=False, timeout=timedelta(seconds=10))
    assert client.get("composer/nnodes") == b"3"
    client.set("composer/done/1", "1")
    assert store.get("composer/done/1") == b"1"
    assert front.refused == 0 and logged == []


def test_the_store_behind_the_gate_is_reachable_on_loopback_only(store_behind_gate) -> None:
    store, _, _ = store_behind_gate
    try:
        _, address = route_interface("192.0.2.1")  # this machine's address on its default route
    except ClusterError:
        pytest.skip("no non-loopback address here")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, store.port), timeout=5)
    socket.create_connection(("127.0.0.1", store.port), timeout=5).close()


def test_a_wrong_secret_is_refused_by_name_and_logged_without_either_secret(store_behind_gate) -> None:
    _, front, logged = store_behind_gate
    wrong = b"wrong horse battery staple 4242"
    with pytest.raises(gate.GateError, match=r"refused this machine: wrong secret"):
        gate.request(wrong, ("127.0.0.1", front.port), {"kind": "ping"})
    assert front.refused == 1
    assert len(logged) == 1 and "refused 127.0.0.1:" in logged[0] and logged[0].endswith("wrong secret")
    assert SECRET.decode() not in logged[0] and wrong.decode() not in logged[0]


def test_a_tunnel_with_a_wrong_secret_never_reaches_the_store(store_behind_gate) -> None:
    store, front, _ = store_behind_gate
    store.set("composer/run_dir", "/app/runs/secret-run")
    tunnel = gate.Tunnel(b"wrong horse battery staple 4242", ("127.0.0.1", front.port))
    with pytest.raises((RuntimeError, TimeoutError)):
        TCPStore("127.0.0.1", tunnel.port, is_master=False, timeout=timedelta(seconds=3)).get("composer/run_dir")
    assert front.refused >= 1
    assert tunnel.failures and "wrong secret" in tunnel.failures[0]


def test_a_peer_that_does_not_hold_the_secret_cannot_pose_as_the_coordinator() -> None:
    """Mutual: the gate proves the secret too, so a joining machine never talks to an impostor."""
    impostor = socket.create_server(("127.0.0.1", 0))

    def answer_ok_to_anyone() -> None:
        peer, _ = impostor.accept()
        peer.sendall(f"{gate.PROTOCOL} {'ab' * 32}\n".encode())
        peer.recv(4096)
        peer.sendall(b"OK " + b"0" * 64 + b"\n")
        peer.close()

    threading.Thread(target=answer_ok_to_anyone, daemon=True).start()
    with pytest.raises(gate.GateError, match="does not hold this run's secret"):
        gate.request(SECRET, ("127.0.0.1", impostor.getsockname()[1]), {"kind": "ping"})
    impostor.close()


def test_an_unreachable_coordinator_is_an_error_naming_the_address_not_a_hang() -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(gate.GateError, match=rf"no coordinator answers at 127.0.0.1:{port} .*port {port}/tcp is open"):
        gate.request(SECRET, ("127.0.0.1", port), {"kind": "ping"}, timeout_s=2)


def test_the_secret_comes_from_a_file_or_the_environment_and_must_be_long_enough(tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET.decode() + "\n")
    assert gate.load_secret({}, path) == SECRET
    assert gate.load_secret({gate.SECRET_FILE_ENV: str(path)}) == SECRET
    assert gate.load_secret({gate.SECRET_ENV: SECRET.decode()}) == SECRET
    with pytest.raises(gate.GateError, match="no secret: set COMPOSER_SECRET"):
        gate.load_secret({})
    with pytest.raises(gate.GateError, match="has 5 characters; use at least 16"):
        gate.load_secret({gate.SECRET_ENV: "short"})
    with pytest.raises(gate.GateError, match="cannot read the run's secret from"):
        gate.load_secret({}, tmp_path / "missing")
    assert gate.fingerprint(SECRET) != gate.fingerprint(b"x" * 32) and SECRET.decode() not in gate.fingerprint(SECRET)


def join_request(
    host: str, workers: int = 1, image: str = "sha256:aaa source 1111", config: dict | None = None
) -> dict:
    return {"kind": "join", "host": host, "workers": workers, "image": image, "config": config or CONFIG}


def test_membership_gives_free_replicas_and_the_same_ones_to_a_host_that_comes_back() -> None:
    members = Membership(world=4, image="sha256:aaa source 1111", config=CONFIG)
    members.run_dir = "/app/runs/test"
    first = members.admit(join_request("h1", workers=2), "10.0.0.1:5000")
    second = members.admit(join_request("h2"), "10.0.0.2:5000")
    again = members.admit(join_request("h1", workers=2), "10.0.0.1:6000")
    assert (first["replicas"], second["replicas"], again["replicas"]) == ([0, 1], [2], [0, 1])
    assert (first["rejoined"], again["rejoined"], again["run_dir"]) == (False, True, "/app/runs/test")
    assert members.hosts["h1"]["joins"] == 2
    full = members.admit(join_request("h3", workers=2), "10.0.0.3:5000")
    assert full == {
        "ok": False,
        "error": "the run has 4 replicas and 1 are free (h1, h2 joined); this host asked for 2",
    }


def test_a_second_machine_with_a_known_host_name_is_refused_and_told_to_pick_its_own_name() -> None:
    members = Membership(world=3, image="sha256:aaa source 1111", config=CONFIG)
    assert members.admit(join_request("ubuntu"), "10.0.0.2:5000")["replicas"] == [0]
    twin = members.admit(join_request("ubuntu"), "10.0.0.3:5000")
    assert twin == {
        "ok": False,
        "error": "host name ubuntu is already in this run at 10.0.0.2; give this machine (10.0.0.3) its own "
        "--name (a host that comes back rejoins from its address)",
    }
    assert members.admit(join_request("ubuntu-2"), "10.0.0.3:5000")["replicas"] == [1]
    assert members.admit(join_request("ubuntu"), "10.0.0.2:7000")["rejoined"]  # the same machine, a new port


def test_the_coordinators_machine_holds_replica_zero_whoever_asks_first() -> None:
    members = Membership(world=3, image="sha256:aaa source 1111", config=CONFIG, own=("h1", 1, "10.0.0.1"))
    early = members.admit(join_request("h2"), "10.0.0.2:5000")
    own = members.admit(join_request("h1"), "10.0.0.1:5000")
    assert (early["replicas"], own["replicas"], own["rejoined"]) == ([1], [0], False)


def test_membership_takes_the_same_image_loaded_or_built_from_the_same_tree_and_refuses_another() -> None:
    members = Membership(world=3, image="sha256:aaa source 1111", config=CONFIG)
    assert members.admit(join_request("h2", image="sha256:aaa source 1111"), "10.0.0.2:5000")["ok"]  # docker load
    assert members.admit(join_request("h3", image="sha256:ccc source 1111"), "10.0.0.3:5000")["ok"]  # same tree
    other = Membership(world=2, image="sha256:aaa source 1111", config=CONFIG)
    refused = other.admit(join_request("h2", image="sha256:bbb source 2222"), "10.0.0.2:5000")
    assert refused == {
        "ok": False,
        "error": "image differs: this host runs sha256:bbb source 2222, the coordinator sha256:aaa source 1111",
    }


def test_membership_refuses_a_different_config_in_one_line_naming_the_key_and_both_values() -> None:
    members = Membership(world=2, image="sha256:aaa source 1111", config=CONFIG)
    changed = {**CONFIG, "optim": {"lr": 0.002, "sft_steps": 20}}
    config = members.admit(join_request("h2", config=changed), "10.0.0.2:5000")
    assert config["error"] == "config differs from the coordinator's at optim.lr (coordinator 0.001, this host 0.002)"
    assert not config["ok"] and members.hosts == {}
