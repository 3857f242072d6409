"""The run's front door across machines: a shared secret in front of torchrun's c10d store.

Why: the c10d TCPStore that torchrun's rendezvous uses has no authentication, and across machines
its port faces the network; anyone who reaches it could join the run or read it. So the store
listens on the coordinator's loopback only, and the coordinator's public port is a `Gate`: a TCP
relay that forwards a connection to the store only after a challenge-response proving that the
peer holds the run's secret (HMAC-SHA256, RFC 2104, `hmac` from the standard library). Each
joining machine reaches the store through a `Tunnel`: a loopback listener that opens an
authenticated connection to the gate for every connection torchrun makes, so torchrun itself
needs no change and sees `127.0.0.1:<port>` as its rendezvous endpoint.

The handshake (one line each way, then raw bytes):

    gate   -> peer: "COMPOSER-GATE/1 <gate nonce>\\n"               (32 random bytes, hex)
    peer   -> gate: "<peer nonce> <purpose> <mac_peer>\\n"          purpose: store | hello
    gate   -> peer: "OK <mac_gate>\\n"   or   "DENIED <why>\\n"
    mac_peer = HMAC(secret, "peer|" gate nonce "|" peer nonce "|" purpose)
    mac_gate = HMAC(secret, "gate|" gate nonce "|" peer nonce "|" purpose)

Both sides prove the secret (a peer never talks to an impostor coordinator), fresh nonces make a
recorded handshake useless, and the secret itself never crosses the wire. What it does not do:
encrypt or sign the bytes that follow (the store's keys and values travel in clear, and someone
on the path could hijack an authenticated connection), or guard the ports that only joined
members learn about: rank 0's process-group store and Gloo/NCCL's peer-to-peer connections,
which carry the tensors. Those need a private network (a VPN such as WireGuard) across
untrusted links; docs/deployment.md ("Across machines") says which ports to open to whom.

`hello` connections carry one JSON request and one JSON answer (`request`): a machine asks to
join with its image and config, and the coordinator answers with its replica indices or with a
one-line refusal naming what differs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from torch.distributed import TCPStore

PROTOCOL = "COMPOSER-GATE/1"
HANDSHAKE_TIMEOUT_S = 10.0
MAX_LINE = 1 << 20  # a hello carries a dumped config: a few KiB
SECRET_ENV = "COMPOSER_SECRET"
SECRET_FILE_ENV = "COMPOSER_SECRET_FILE"
MIN_SECRET_CHARS = 16


class GateError(RuntimeError):
    """The gate refused us, or could not be reached; the message says which and what to do."""


def load_secret(env: dict[str, str] | None = None, secret_file: str | Path | None = None) -> bytes:
    """The run's secret from `secret_file`, COMPOSER_SECRET_FILE or COMPOSER_SECRET (in that
    order), never from a command line, where `ps` would show it.

    Raises:
        GateError: none is set, the file is unreadable, or the secret is shorter than 16 characters.
    """
    env = dict(os.environ if env is None else env)
    path = secret_file or env.get(SECRET_FILE_ENV)
    if path:
        try:
            secret = Path(path).read_text().strip()
        except OSError as error:
            raise GateError(f"cannot read the run's secret from {path}: {error.strerror}") from None
        source = str(path)
    else:
        secret, source = env.get(SECRET_ENV, "").strip(), SECRET_ENV
        if not secret:
            raise GateError(f"no secret: set {SECRET_ENV} or {SECRET_FILE_ENV} (or pass --secret-file)")
    if len(secret) < MIN_SECRET_CHARS:
        raise GateError(f"the secret from {source} has {len(secret)} characters; use at least {MIN_SECRET_CHARS}")
    return secret.encode()


def new_secret() -> str:
    """A fresh run secret: 32 random bytes, URL-safe text."""
    return secrets.token_urlsafe(32)


def fingerprint(secret: bytes) -> str:
    """Eight hex digits that tell two secrets apart in a log without revealing either."""
    return hashlib.sha256(b"composer-secret-fingerprint|" + secret).hexdigest()[:8]


def _mac(secret: bytes, side: str, gate_nonce: str, peer_nonce: str, purpose: str) -> str:
    message = f"{side}|{gate_nonce}|{peer_nonce}|{purpose}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _read_line(sock: socket.socket) -> str:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("connection closed during the handshake")
        data += chunk
        if len(data) > MAX_LINE:
            raise ConnectionError("handshake line too long")
    return data[:-1].decode(errors="replace")


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes one way until either side closes, then close both."""
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _splice(a: socket.socket, b: socket.socket) -> None:
    a.settimeout(None)
    b.settimeout(None)
    threading.Thread(target=_pump, args=(a, b), daemon=True).start()
    threading.Thread(target=_pump, args=(b, a), daemon=True).start()


def _accept_forever(listener: socket.socket, handle: Callable[[socket.socket, str], None]) -> None:
    """Hand every accepted connection to `handle(sock, "host:port")` in its own thread, until
    the listener is closed."""
    while True:
        try:
            sock, address = listener.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(sock, f"{address[0]}:{address[1]}"), daemon=True).start()


def loopback_store(timeout_s: float = 60.0) -> TCPStore:
    """A TCPStore server that listens on 127.0.0.1 only, on a free port (`store.port`): torch's
    own server binds every interface, so it is handed a socket already bound to loopback."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    return TCPStore(
        "127.0.0.1",
        listener.getsockname()[1],
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout_s),
        master_listen_fd=listener.detach(),  # the store's for good
        use_libuv=False,  # the libuv server takes no listening socket
    )


class Gate:
    """The coordinator's public port: authenticates each connection, then relays it to the store
    on loopback (`store`) or answers a join request (`hello`: `on_hello(request, peer) -> answer`).

    Every refusal is logged with the peer's address and why (`log`); the secret never is.
    """

    def __init__(
        self,
        secret: bytes,
        bind: tuple[str, int],
        store_port: int,
        on_hello: Callable[[dict[str, Any], str], dict[str, Any]],
        log: Callable[[str], None] = print,
    ) -> None:
        self.secret, self.store_port, self.on_hello, self.log = secret, store_port, on_hello, log
        self.refused = 0
        self.listener = socket.create_server(bind, reuse_port=False)
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="gate", daemon=True)

    def start(self) -> Gate:
        self._thread.start()
        return self

    def close(self) -> None:
        self.listener.close()

    def _serve(self) -> None:
        _accept_forever(self.listener, self._admit)

    def _admit(self, peer: socket.socket, address: str) -> None:
        peer.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            gate_nonce = secrets.token_hex(32)
            peer.sendall(f"{PROTOCOL} {gate_nonce}\n".encode())
            parts = _read_line(peer).split(" ")
            if len(parts) != 3 or parts[1] not in ("store", "hello"):
                self._refuse(peer, address, "not a composer gate handshake")
                return
            peer_nonce, purpose, mac = parts
            if len(peer_nonce) < 32 or not hmac.compare_digest(
                mac, _mac(self.secret, "peer", gate_nonce, peer_nonce, purpose)
            ):
                self._refuse(peer, address, "wrong secret")
                return
            peer.sendall(f"OK {_mac(self.secret, 'gate', gate_nonce, peer_nonce, purpose)}\n".encode())
            if purpose == "hello":
                request = json.loads(_read_line(peer))
                answer = self.on_hello(request, address)
                peer.sendall((json.dumps(answer) + "\n").encode())
                peer.close()
                return
            store = socket.create_connection(("127.0.0.1", self.store_port), timeout=HANDSHAKE_TIMEOUT_S)
            _splice(peer, store)
        except (OSError, ValueError) as error:
            self.log(f"gate: connection from {address} dropped during the handshake ({error})")
            peer.close()

    def _refuse(self, peer: socket.socket, address: str, why: str) -> None:
        self.refused += 1
        self.log(f"gate: refused {address}: {why}")
        try:
            peer.sendall(f"DENIED {why}\n".encode())
        finally:
            peer.close()


def _open(secret: bytes, coordinator: tuple[str, int], purpose: str, timeout_s: float) -> socket.socket:
    """An authenticated connection to the gate at `coordinator`.

    Raises:
        GateError: nothing answers within `timeout_s` (unreachable, firewalled, not started), the
            peer is not a gate, the gate refused our secret, or the gate could not prove its own.
    """
    host, port = coordinator
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as error:
        raise GateError(
            f"no coordinator answers at {host}:{port} ({error.strerror or error}); check the address, that "
            f"the coordinator runs, and that port {port}/tcp is open on its host"
        ) from None
    try:
        sock.settimeout(max(timeout_s, HANDSHAKE_TIMEOUT_S))
        greeting = _read_line(sock).split(" ")
        if len(greeting) != 2 or greeting[0] != PROTOCOL:
            raise GateError(f"{host}:{port} is not a composer coordinator (it said {' '.join(greeting)[:60]!r})")
        gate_nonce, peer_nonce = greeting[1], secrets.token_hex(32)
        sock.sendall(f"{peer_nonce} {purpose} {_mac(secret, 'peer', gate_nonce, peer_nonce, purpose)}\n".encode())
        answer = _read_line(sock).split(" ", 1)
    except (OSError, ConnectionError) as error:
        sock.close()
        raise GateError(f"the coordinator at {host}:{port} closed the handshake ({error})") from None
    if answer[0] == "DENIED":
        sock.close()
        reason = answer[1] if len(answer) > 1 else "refused"
        raise GateError(f"the coordinator at {host}:{port} refused this machine: {reason}")
    expected = _mac(secret, "gate", gate_nonce, peer_nonce, purpose)
    if answer[0] != "OK" or len(answer) < 2 or not hmac.compare_digest(answer[1], expected):
        sock.close()
        raise GateError(f"{host}:{port} does not hold this run's secret: it is not this run's coordinator")
    return sock


def request(
    secret: bytes, coordinator: tuple[str, int], message: dict[str, Any], timeout_s: float = 30.0
) -> dict[str, Any]:
    """One authenticated JSON request to the gate (`hello`) and its JSON answer."""
    sock = _open(secret, coordinator, "hello", timeout_s)
    try:
        sock.sendall((json.dumps(message) + "\n").encode())
        return json.loads(_read_line(sock))
    except (OSError, ConnectionError, ValueError) as error:
        raise GateError(f"the coordinator at {coordinator[0]}:{coordinator[1]} did not answer ({error})") from None
    finally:
        sock.close()


class Tunnel:
    """A loopback port whose every connection is relayed, authenticated, to the gate's store.

    torchrun and `TCPStore` connect to `127.0.0.1:<port>` as if the store were local.
    """

    def __init__(self, secret: bytes, coordinator: tuple[str, int], timeout_s: float = 30.0) -> None:
        self.secret, self.coordinator, self.timeout_s = secret, coordinator, timeout_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.failures: list[str] = []
        threading.Thread(target=_accept_forever, args=(self.listener, self._relay), name="tunnel", daemon=True).start()

    def _relay(self, local: socket.socket, _address: str) -> None:
        try:
            remote = _open(self.secret, self.coordinator, "store", self.timeout_s)
        except GateError as error:
            self.failures.append(str(error))
            local.close()
            return
        _splice(local, remote)

    def close(self) -> None:
        self.listener.close()
